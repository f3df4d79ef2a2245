#!/usr/bin/env python3
"""Renders the Kubernetes manifests for one job on N nodes x G GPUs (or CPU ranks): one command.

    .venv/bin/python launchers/render_k8s.py --name retrain --nodes 8 --gpus-per-node 8 --image IMG \
        --config configs/aliccp.yaml --data-pvc data --runs-pvc runs --command "train --model cstwa" \
        --out runs/k8s/retrain

The work is in cstwa_dist/deploy/k8s.py (linted and tested with the package); this file only puts the
repository on sys.path, so the command runs from a checkout without the package installed (PyYAML is
the one dependency). `--help` lists every option; k8s/README.md explains the manifests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cstwa_dist.deploy.k8s import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
