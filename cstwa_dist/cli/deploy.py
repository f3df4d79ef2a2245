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
from typing import TYPE_CHECKING

from cstwa_dist.cli.common import add_config_args
from cstwa_dist.registry import MODELS, load_config

if TYPE_CHECKING:
    from cstwa_dist.planner.dryrun import DryRun

logger = logging.getLogger(__name__)


def cmd_plan(args: argparse.Namespace) -> int:
    """Sharding dry run: no process group, no data, no table memory (the model is built on ``meta``).

    Ends with the verdict line (``planner/verdict.py``) and exits 1 when the job does not fit its caps
    (a rank over a cap, or no plan at all), after searching the smallest world size that fits.
    """
    from cstwa_dist.planner import dry_run, resolve_spec  # imports torch and TorchRec
    from cstwa_dist.planner.render import render_no_plan
    from cstwa_dist.planner.verdict import NoPlan, judge

    if args.search_up_to < 1:
        raise ValueError(f"--search-up-to must be >= 1, got {args.search_up_to}")
    cfg = load_config(args.config, args.overrides)
    spec, source = resolve_spec(args.spec, cfg.data.dataset)

    def plan_at(world_size: int) -> DryRun:
        return dry_run(
            cfg,
            spec,
            model_name=args.model,
            world_size=world_size,
            gpus_per_node=args.gpus_per_node,
            hbm_gb=args.hbm_gb,
            ddr_gb=args.ddr_gb,
            spec_source=source,
        )

    result: DryRun | NoPlan
    try:
        result = plan_at(args.world_size)
    except NoPlan as e:
        result = e
    verdict = judge(result, plan_at, limit=args.search_up_to)
    sys.stdout.write(render_no_plan(result) if isinstance(result, NoPlan) else result.render())
    sys.stdout.write(verdict.line + "\n")
    if args.json_out is not None:
        from dataclasses import asdict

        from cstwa_dist.fs import atomic_write_json

        if isinstance(result, NoPlan):
            report = {
                "world_size": result.world_size,
                "no_plan": result.reason,
                "tables": [asdict(t) for t in result.demands],
            }
        else:
            report = result.to_dict()
        report["verdict"] = asdict(verdict)
        atomic_write_json(args.json_out, report, sort_keys=False)
        logger.info("plan written to %s", args.json_out)
    return 0 if verdict.fits else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the deploy commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "plan",
        help="sharding dry run: the plan and per-rank memory at a world size, without training",
        description="Build the model on the meta device, plan its embedding tables with TorchRec's planner "
        "for --world-size ranks (no process group, no data, no GPU needed) and print every table's "
        "sharding type, kernel, ranks and bytes, then per rank: embedding storage, dense state and the "
        "row-sharded structure steps' peaks (mining in pretrain, the β update in train; formulas included). "
        "The last line is the verdict: 'fits', or 'does NOT fit' naming the ranks and tables over the caps "
        "(or the tables no rank can hold) and the smallest world size that fits; exit code 1 then.",
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
        "--search-up-to",
        type=int,
        default=4096,
        metavar="RANKS",
        help="when the plan does not fit, search the smallest world size that does up to this many ranks "
        "(default 4096; doubling, then bisecting, a re-plan per step)",
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
