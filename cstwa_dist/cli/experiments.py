"""Experiment commands: ``experiment`` (a grid of runs), ``experiment-summary`` and ``oracles``.

The three answer the paper's question rather than train one model: ``experiment`` runs the grid
(Table 2, Table 3, sweeps, variants; one process or under torchrun), ``experiment-summary`` compares
finished experiments, and ``oracles`` says how far any model could get on a data set, which the
reports print beside the models. Only ``experiment`` needs torch; the other two read files.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cstwa_dist.cli.common import add_config_args, emit_json
from cstwa_dist.registry import load_config, table2_models

logger = logging.getLogger(__name__)


def cmd_experiment(args: argparse.Namespace) -> int:
    from cstwa_dist.data.preflight import PRETRAIN_READS_ENTITIES, check_dataset
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.experiments.grid import cell_config, plan_cells, run_experiment
    from cstwa_dist.registry import get_model_spec

    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    models = args.models.split(",") if args.models else None
    if models is None and not args.ablation and not args.sweep and not args.variant:
        models = table2_models()
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    cells = plan_cells(models, seeds, args.ablation, args.sweep, args.variant, args.model_set)
    cfg = load_config(args.config, args.overrides)  # validates the config before any rank starts work
    # the data set too (each cell's, usually one): a cell that reads graphs has them mined by
    # `pretrain` first (unless already mined), which reads the entity tables; so do those cells'
    # Structure Migrators (sm_init=fields or reading b); other models read impressions only
    reasons: dict[str, str | None] = {}
    for cell in cells:
        ccfg = cell_config(cfg, cell, Path(args.out))
        mspec = get_model_spec(cell.model)
        migrates = mspec.needs_graphs(ccfg.model, ccfg.structure, settings=mspec.settings_in(ccfg))
        reasons[ccfg.data.dataset] = reasons.get(ccfg.data.dataset) or (
            PRETRAIN_READS_ENTITIES if migrates else None
        )
    for dataset, reason in reasons.items():
        check_dataset(dataset, entities_for=reason)
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        run_experiment(cfg, cells, args.out, args.model_set)
    return 0


def cmd_oracles(args: argparse.Namespace) -> int:
    """Prints (and with ``--out`` writes) the partial oracles and lookups as JSON; numpy + pyarrow only."""
    from cstwa_dist.experiments.oracles import graph_cluster_rate, partial_oracles
    from cstwa_dist.fs import atomic_write_json

    if not args.dataset.is_dir():
        raise FileNotFoundError(f"{args.dataset}: no such data set folder")
    result = {"oracles": partial_oracles(args.dataset, split=args.split)}
    if args.graph_dir is not None:
        result["graph_cluster_rate"] = graph_cluster_rate(args.graph_dir, args.dataset)
    emit_json(result)
    if args.out is not None:
        atomic_write_json(args.out, result, sort_keys=False)
        logger.info("oracles written to %s", args.out)
    return 0


def cmd_experiment_summary(args: argparse.Namespace) -> int:
    """Reads finished experiments' report.json files only (no data, no process group)."""
    from cstwa_dist.experiments.summary import load_reports, summarise

    summarise(load_reports(args.reports), args.out)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the experiment commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "experiment",
        help="the paper's experiments: Table 2 (models), Table 3 (--ablation), Figure 2 (--sweep)",
        description="Run a grid of training runs (model x overrides x seed) in one job and write "
        "<out>/report.json, <out>/report.md and, for sweeps, <out>/sweep_<param>.png. Cells whose "
        "metrics.json exists are not re-run, so a restarted experiment continues where it stopped. Run it "
        "as one process or under torchrun (launchers/torchrun.sh N experiment ...): every cell then uses "
        "N ranks. Structure (pre-training + kNN graphs) is mined once per seed and k.",
    )
    add_config_args(p)
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated registered models for Table 2 (default when no --ablation/--sweep: "
        f"{','.join(table2_models())})",
    )
    p.add_argument("--seeds", type=int, default=5, help="number of seeds per cell (default 5)")
    p.add_argument("--seed-base", type=int, default=0, help="first seed (seeds are base .. base+N-1)")
    p.add_argument(
        "--ablation", action="store_true", help="Table 3: MLP, each of SM/CP/CE alone, each pair, all three"
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="PARAM=V1,V2,...",
        help="Figure 2-style sweep of CSTWA over beta, gamma, layers, k (or any section.key); repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=MODEL:KEY=V[;KEY=V]",
        help="a named configuration of a model as its own row, e.g. "
        "'SM reading (b)=cstwa:structure.sm_reading=recomputed' (repeatable; overrides separated by ;)",
    )
    p.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="MODEL:KEY=V[;KEY=V]",
        help="settings of one model in every cell it runs in (Table 2, ablation, sweeps, variants), e.g. "
        "its hyper-parameters chosen on validation: 'cstwa:loss.gamma=2'; other models' cells are "
        "unchanged (and reused when finished); a sweep or variant that sets the same key wins (repeatable)",
    )
    p.add_argument("--out", required=True, help="experiment directory (cells, structure, reports)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "oracles",
        help="partial oracles and per-item lookups of a data set (AUC/GAUC), and the graphs' cluster rate",
        description="On the test split: Click/Purchase AUC and GAUC of the true click and purchase "
        "probabilities and of the user-item affinity (synthetic data only: from synth.json) and of the "
        "smoothed per-item train CTR and purchase-rate lookups (any data set); with --graph-dir, the share "
        "of the mined kNN graphs' neighbours in the same true cluster. Prints JSON; nothing is written into "
        "the data set.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="data set folder")
    p.add_argument(
        "--graph-dir", type=Path, default=None, help="a structure.graph_dir written by pretrain (optional)"
    )
    p.add_argument("--split", choices=["val", "test"], default="test", help="evaluated split (default test)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=cmd_oracles)

    p = sub.add_parser(
        "experiment-summary",
        help="one table and plot across experiments (e.g. one per conflict level): Purchase AUC per model",
        description="Reads the report.json of each experiment directory and writes summary.md, summary.json "
        "and purchase_vs_conflict.png under --out: per level every Table 2 / Table 3 row's Purchase AUC "
        "(mean ± std), its paired difference against that level's best baseline, whether it beats both "
        "per-item lookups, and the partial oracles and graph cluster rates beside them.",
    )
    p.add_argument(
        "reports",
        nargs="+",
        metavar="LABEL=DIR",
        help="experiment directories in plot order, each labelled (e.g. none=runs/fair/none)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for summary.md / .json / .png")
    p.set_defaults(func=cmd_experiment_summary)
