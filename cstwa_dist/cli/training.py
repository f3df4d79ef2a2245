"""Training commands: ``pretrain`` (structure), ``train`` (one model) and ``report`` (its results).

``pretrain`` and ``train`` run as one process or under ``torchrun --nproc_per_node=N`` on the same
code path; ``report`` is their reader, grouped with them because it presents exactly what ``train``
writes (``metrics.json``) and imports numpy only, never torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cstwa_dist.cli.common import add_config_args
from cstwa_dist.registry import MODELS, get_model_spec, load_config, trainable_models

logger = logging.getLogger(__name__)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cstwa_dist.data.preflight import PRETRAIN_READS_ENTITIES, check_dataset

    cfg = load_config(args.config, args.overrides)
    # before the process group, Ray and the pre-training: a missing file fails in a second, not after
    check_dataset(cfg.data.dataset, entities_for=PRETRAIN_READS_ENTITIES)
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.train.pretrain import pretrain_run, pretrain_structure
    from cstwa_dist.train.warmstart import resolve_source

    if args.init_from:  # a missing or unusable source fails now, not after the runtime starts
        resolve_source(pretrain_run(args.init_from))
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        pretrain_structure(cfg, init_from=args.init_from)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cstwa_dist.data.preflight import check_dataset, entity_tables_reader

    overrides = [
        *args.overrides,
        *([f"train.resume={args.resume}"] if args.resume else []),
        *([f"train.init_from={args.init_from}"] if args.init_from else []),
    ]
    cfg = load_config(args.config, overrides)
    # entity tables only for a model that reads them (ESMM and the other baselines do not)
    mspec = get_model_spec(args.model)
    migrates = bool(mspec.structure_tables(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)))
    check_dataset(cfg.data.dataset, entities_for=entity_tables_reader(args.model, migrates, cfg.structure))
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.train.trainer import train
    from cstwa_dist.train.warmstart import resolve_source

    if cfg.train.init_from:  # a missing or unusable source fails now, not after the runtime starts
        resolve_source(cfg.train.init_from)
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        train(cfg, args.model, run_dir=args.run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Prints the runs' test metrics (of each run's selected epoch) and writes reliability plots.

    Two tables (:func:`~cstwa_dist.cli.tables.report_tables`): ranking and calibration. Each run dir
    gets ``reliability_<task>.png`` (the decile table as ``.txt`` without matplotlib). Imports numpy
    only (and matplotlib for the plots), never torch.
    """
    from cstwa_dist.cli.tables import report_tables
    from cstwa_dist.train.metrics import TASKS, write_reliability

    rows: list[tuple[Path, dict[str, Any]]] = []
    for d in args.runs:
        path = Path(d) / "metrics.json" if Path(d).is_dir() else Path(d)
        if not path.exists():
            logger.error("no metrics.json at %s", path)
            return 1
        rows.append((path.parent, json.loads(path.read_text())))
    sys.stdout.write(report_tables(rows))
    for run, m in rows:
        for t in TASKS:
            try:
                out = write_reliability(m, t, run)
            except OSError as e:  # a read-only run dir still gets its table printed
                logger.warning("could not write the %s reliability plot into %s: %s", t, run, e)
                continue
            if out is not None:
                logger.info("reliability plot %s", out)
    return 0


def _model_list(names: list[str]) -> str:
    """Every model with its registry description, so that ``train --help`` documents the choices."""
    return "; ".join(f"{n}: {MODELS[n].description}" for n in names)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the training commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "pretrain",
        help="pre-train the CTR MLP and build the user/item kNN graphs",
        description="Train the plain CTR MLP for structure.pretrain_epochs; then every rank reads r_u and "
        "r_i of its own block of users and items out of the sharded tables, the blocks are searched against "
        "each other with Faiss IVF on a ring of row shards (structure.knn, nlist, nprobe, pq_m; "
        "structure.knn=exact for the exact reference), and each rank writes its rows of the kNN graphs "
        "(top-k, negatives clamped, D^-1/2 A D^-1/2) to structure.graph_dir for `train`, with recall@k "
        "against exact search in structure.json.",
    )
    add_config_args(p)
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PREV",
        help="warm start (docs/retrain.md): the CTR MLP starts from a previous pre-training: its "
        "structure.graph_dir (the pretrain/ run in it), that run folder or one of its checkpoints. Rows "
        "of ids known there are copied exactly (the data set's vocabulary must extend that run's: "
        "import the new day with --vocab-from), new rows and the optimizer state start fresh; the "
        "graphs are mined for the new data as always",
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "train",
        help="train and evaluate one model; writes <run_dir>/metrics.json",
        description="Train a registered model with DistributedModelParallel and evaluate Click "
        "and Purchase AUC over all impressions of the eval split.",
    )
    add_config_args(p)
    p.add_argument(
        "--model",
        required=True,
        choices=trainable_models(),
        metavar="MODEL",
        help=f"registered model: {_model_list(trainable_models())}",
    )
    p.add_argument(
        "--run-dir", default=None, help="where metrics.json goes (default: <train.run_dir>/<model>)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|never|DIR",
        help="continue from a checkpoint: auto = the newest complete one under train.checkpoint_dir "
        "(default <run dir>/checkpoints), or a checkpoint folder (same as --set train.resume=...)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="warm start a fresh run (docs/retrain.md) from a previous run of the same model: its run "
        "folder, one of its checkpoints, or an exported model folder whose source checkpoint still "
        "exists. Embedding rows of ids known there and the dense layers are copied exactly (the data "
        "set's vocabulary must extend that run's: import the new day with --vocab-from); new rows and "
        "the optimizer state start fresh. A resume from this run's own checkpoint takes precedence "
        "(same as --set train.init_from=...)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "report", help="print the Click/Purchase AUC, GAUC and calibration tables of finished runs"
    )
    p.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    p.set_defaults(func=cmd_report)
