"""``cstwa-dist <command>``: one entry point whose subcommands follow the data flow of a retrain.

data (``synth``, ``import-aliccp``, ``import-csv``; ``entities`` completes an older data set) →
structure (``pretrain``) → models (``train``, ``experiment``) → results (``report``) → shipping
(``export``, ``score``); docs/method.md, "Pipeline at a glance", maps each step to the method. Run any
training command as one process or under ``torchrun --nproc_per_node=N``; the same code path runs
either way. ``synth``, the importers, ``entities``, ``report`` and ``export`` are single-process tools.

One module per command group registers its commands (``add_parsers``) with their handlers:
``data``, ``training`` (with ``report``), ``model`` (``export``), ``scoring`` (``score``),
``experiments`` (with ``experiment-summary`` and ``oracles``), ``bench``, ``deploy`` (``plan``) and
``doctor`` (the GPU node check);
``common`` holds the options and output helpers more than one group uses, ``tables`` the ``report``
tables. A new command goes into its group's module and nowhere else.

Only light modules are imported at the top (the registry names its builders as strings), so that
``--help``, the importers and ``report`` never pay for importing torch and TorchRec; each handler
imports what it needs when it runs (tests/unit/test_layout.py checks ``--help`` of every command).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from cstwa_dist import __version__
from cstwa_dist.cli import bench, data, deploy, doctor, experiments, model, scoring, training

logger = logging.getLogger("cstwa_dist")

# In the order ``--help`` lists them: the data flow of a retrain, then the tools around it.
GROUPS = (data, training, model, scoring, experiments, bench, deploy, doctor)


def setup_logging(verbose: bool = False) -> None:
    """Rank 0 logs INFO; other ranks only warnings, so torchrun output stays readable."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    # The root logger stays at WARNING: FBGEMM and faiss log chatty INFO lines through it.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("cstwa_dist").setLevel(level)
    for noisy in ("torchrec", "ray", "fbgemm_gpu", "torch.distributed", "faiss"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; also what the Kubernetes renderer parses a job's command with."""
    parser = argparse.ArgumentParser(
        prog="cstwa-dist",
        description="Distributed CSTWA: synthetic data, structure mining, training and evaluation of "
        "post-click conversion-rate models on TorchRec + Ray Data + Faiss. Training commands run as one "
        "process or under torchrun --nproc_per_node=N.",
    )
    parser.add_argument("--version", action="version", version=f"cstwa-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no trace
        logger.error("%s: %s", type(e).__name__, e)
        return 2
