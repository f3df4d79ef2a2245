"""Exported models: a training run's checkpoint as a self-contained ``torch.export`` folder that a
serving process loads without TorchRec, FBGEMM or this package (docs/export.md).

``exporter`` writes the folder (``cstwa-dist export``), ``artifact`` loads and checks it, ``module``
holds the plain-PyTorch lookups that replace TorchRec's collections, ``weight`` sizes an export from
a spec alone (``plan``).
"""
