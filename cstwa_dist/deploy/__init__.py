"""Deployment renderers: Kubernetes manifests for multi-node jobs (``k8s.py``); no torch or Ray imports."""
