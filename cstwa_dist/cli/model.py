"""Model commands: ``export`` (a training run's checkpoint → a folder a serving process loads).

Single-process, no process group and no Ray: the export reads the checkpoint tensor by tensor
(``cstwa_dist/export``; docs/export.md). Torch is imported by the handler only, so ``--help`` stays
light.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def cmd_export(args: argparse.Namespace) -> int:
    from cstwa_dist.export.artifact import ExportError
    from cstwa_dist.export.exporter import export_model
    from cstwa_dist.train.checkpoint import CheckpointRefused

    try:
        export_model(
            args.run_dir, args.out, checkpoint=args.checkpoint, force=args.force, dataset=args.dataset
        )
    except CheckpointRefused as e:  # one line and exit code 2, like every refused input
        raise ExportError(str(e)) from None
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the model commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "export",
        help="export a trained run as a torch.export model folder (no TorchRec needed to serve it)",
        description="Read the newest checkpoint of a `train` run (or --checkpoint), rebuild the model in "
        "one process with plain-PyTorch embedding tables, and write <out>/program.pt2 (ids [B, F] int64 -> "
        "probabilities), spec.yaml, vocab/ and manifest.json (sha256 of every file, source checkpoint, test "
        "metrics). Works for checkpoints of any world size. See docs/export.md.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run folder written by `train` (metrics.json)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (checkpoints/step-*) to export (default: the run's newest)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="model folder to write (must not exist or be empty)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out (swapped in once complete)"
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="the training data set's folder, if it moved since the run (default: the run's data.dataset)",
    )
    p.set_defaults(func=cmd_export)
