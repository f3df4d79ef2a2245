"""Deploy commands: ``plan``, the sharding dry run that sizes a job before it is deployed.

``plan`` trains nothing; it answers what a deployment has to choose: how many ranks, GPUs per node and
how much memory each rank needs, which is what the Kubernetes renderer (``launchers/render_k8s.py``)
asks for with ``--nodes``, ``--gpus-per-node`` and ``--memory``. So it sits here, in the group for
commands that take a model from this machine to a cluster, rather than with the training commands;
commands that export or serve a trained model belong here as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cstwa_dist.cli.common import add_config_args
from cstwa_dist.registry import MODELS, load_config

logger = logging.getLogger(__name__)


def cmd_plan(args: argparse.Namespace) -> int:
    """Sharding dry run: no process group, no data, no table memory (the model is built on ``meta``)."""
    from cstwa_dist.planner import dry_run, resolve_spec  # imports torch and TorchRec

    cfg = load_config(args.config, args.overrides)
    spec, source = resolve_spec(args.spec, cfg.data.dataset)
    result = dry_run(
        cfg,
        spec,
        model_name=args.model,
        world_size=args.world_size,
        gpus_per_node=args.gpus_per_node,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        spec_source=source,
    )
    sys.stdout.write(result.render())
    if args.json_out is not None:
        from cstwa_dist.fs import atomic_write_json

        atomic_write_json(args.json_out, result.to_dict(), sort_keys=False)
        logger.info("plan written to %s", args.json_out)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the deploy commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "plan",
        help="sharding dry run: the plan and per-rank memory at a world size, without training",
        description="Build the model on the meta device, plan its embedding tables with TorchRec's planner "
        "for --world-size ranks (no process group, no data, no GPU needed) and print every table's "
        "sharding type, kernel, ranks and bytes, then per rank: embedding storage, dense state and the "
        "row-sharded structure steps' peaks (mining in pretrain, the β update in train; formulas included).",
    )
    add_config_args(p)
    p.add_argument("--world-size", type=int, required=True, help="number of ranks to plan for")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="plan CUDA ranks, this many per node (default 0: CPU ranks on one node)",
    )
    p.add_argument("--hbm-gb", type=float, default=None, help="HBM per GPU in GiB (default: TorchRec's 32)")
    p.add_argument(
        "--ddr-gb", type=float, default=None, help="host memory per rank in GiB (default: TorchRec's 128)"
    )
    p.add_argument(
        "--model",
        default="cstwa",
        choices=sorted(MODELS),
        metavar="MODEL",
        help=f"registered model (default cstwa): {', '.join(sorted(MODELS))}",
    )
    p.add_argument(
        "--spec",
        default=None,
        help="spec.yaml or dataset folder, or synth:PRESET[:SCALE] (default: <data.dataset>/spec.yaml, "
        "else the synth preset that folder is named after, e.g. data/industrial-like)",
    )
    p.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the report as JSON",
    )
    p.set_defaults(func=cmd_plan)
