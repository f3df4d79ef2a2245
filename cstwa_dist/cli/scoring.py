"""Scoring command: ``score`` (an exported model over Parquet rows, predictions written as Parquet).

The handler imports Ray and the scoring module only when it runs; the driver itself never imports torch
(the actors load the model), so ``--help`` and the input checks stay light.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def cmd_score(args: argparse.Namespace) -> int:
    from cstwa_dist.export.score import ScoreOptions, score

    options = ScoreOptions(
        split=args.split,
        ids=args.ids,
        strict=args.strict,
        actors=args.actors,
        batch_size=args.batch_size,
        device=args.device,
        force=args.force,
    )
    report = score(args.model, args.input, args.out, options)
    unseen = {k: v for k, v in report["unseen"].items() if v}
    logger.info(
        "%d rows in, %d rows out, %.0f rows/s; unseen ids per field: %s",
        report["rows_in"],
        report["rows_out"],
        report["rows_per_s"],
        unseen or "none",
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers ``score`` on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "score",
        help="score Parquet rows with an exported model (Ray Data actor pool) into predictions Parquet",
        description="Stream a data set's split (ids are rows of its vocabulary, which must extend the "
        "model's) or Parquet files holding every model field (raw ids by default, mapped through the model's "
        "vocabulary) through an exported model on a pool of Ray actors; write <out>/part-*.parquet with the "
        "id columns as given, click/purchase where present and p_ctr, p_cvr, p_ctcvr (float32; a click-only "
        "model writes p_ctr), plus <out>/score.json (rows in/out, unseen ids per field, rate). An id the "
        "model never saw reads the field's unknown row (or a zero vector) and is counted, or stops the run "
        "with --strict. The output appears whole or not at all (docs/scoring.md).",
    )
    p.add_argument("--model", required=True, help="exported model folder (`cstwa-dist export`)")
    p.add_argument(
        "--input",
        required=True,
        help="a data set folder (reads its --split) or Parquet files: a file, a folder, or a quoted glob",
    )
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="data set split (default test)"
    )
    p.add_argument(
        "--ids",
        choices=["rows", "raw"],
        default=None,
        help="how Parquet files hold ids: raw ids mapped through the model's vocabulary (default for files) "
        "or rows as they are (the only choice for a data set folder)",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unseen id, naming file, row and field, instead of scoring it as unknown",
    )
    p.add_argument(
        "--actors", type=int, default=None, help="scoring actors, one model copy each (default: the cores)"
    )
    p.add_argument(
        "--batch-size", type=int, default=16384, help="rows per batch an actor scores (default 16384)"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu, or cuda (one GPU per actor)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out once the new one is whole")
    p.set_defaults(func=cmd_score)
