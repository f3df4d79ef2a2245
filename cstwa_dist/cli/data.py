"""Data commands: ``synth``, ``import-aliccp``, ``import-csv`` and ``entities``.

Everything that writes a data set folder (the layout training reads) lives here. They are
single-process tools that never import torch: the importers stream CSV with pyarrow (``import-aliccp``
fans out over Ray tasks on large input), so a data set can be prepared on a machine without the
training stack.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_QUARANTINE_HELP = (
    "fail the import, writing nothing, if more than this share of any input file's (or split's) lines "
    "is quarantined (default 0.01: a sound export has no or a few stray bad lines; more means a wrong "
    "spec, vocabulary, file or format, and a data set built from the rest would be silently biased); "
    "0 fails on any bad line after the full pass, 1 never fails; the bad lines are then kept in "
    "<out>.quarantine/"
)


def _log_stats(stats: dict[str, Any]) -> None:
    """One line per split, so that a data set that came out empty or skewed shows at once."""
    for split, st in stats.items():
        logger.info(
            "%s: %d rows, click %.4f, purchase %.5f, %d users, %d items",
            split,
            st.rows,
            st.click_rate,
            st.purchase_rate,
            st.users,
            st.items,
        )


def cmd_synth(args: argparse.Namespace) -> int:
    from cstwa_dist.data.synth import generate, preset_with

    preset = preset_with(args.preset, conflict=args.conflict, profile_leakage=args.profile_leakage)
    _log_stats(
        generate(
            preset,
            args.scale,
            args.seed,
            args.out,
            rows_per_file=args.rows_per_file,
            name=args.preset,
            day=args.day,
            growth=args.growth,
            drift=args.drift,
        )
    )
    return 0


def cmd_import_aliccp(args: argparse.Namespace) -> int:
    from cstwa_dist.data.aliccp import import_aliccp

    # the parallel path starts (or attaches to) a Ray runtime itself
    stats = import_aliccp(
        args.raw,
        args.out,
        min_count=args.min_count,
        fields=args.fields,
        val_fraction=args.val_fraction,
        seed=args.seed,
        strict=args.strict,
        max_quarantine_fraction=args.max_quarantine_fraction,
        parallel=args.parallel,
        vocab_from=args.vocab_from,
    )
    _log_stats(stats)
    return 0


def cmd_import_csv(args: argparse.Namespace) -> int:
    from cstwa_dist.data.csv_import import import_csv

    stats = import_csv(
        args.train,
        args.val,
        args.test,
        args.spec,
        args.out,
        strict=args.strict,
        max_quarantine_fraction=args.max_quarantine_fraction,
        vocab_from=args.vocab_from,
    )
    _log_stats(stats)
    return 0


def cmd_entities(args: argparse.Namespace) -> int:
    from cstwa_dist.data.entities import ENTITY_SIDES, write_entity_tables
    from cstwa_dist.data.spec import DatasetSpec

    if not args.dataset.is_dir():
        raise FileNotFoundError(f"{args.dataset}: no such data set folder")
    report = write_entity_tables(args.dataset, DatasetSpec.load(args.dataset))
    for side in ENTITY_SIDES:
        r = report[side]
        logger.info(
            "%s: %d rows, %d seen, %d with conflicting profiles", side, r["rows"], r["seen"], r["conflicts"]
        )
    return 0


def _add_quarantine_args(p: argparse.ArgumentParser, unit: str) -> None:
    """``--strict`` and ``--max-quarantine-fraction``: how both importers treat bad input."""
    p.add_argument(
        "--strict", action="store_true", help=f"fail at the first bad {unit} instead of quarantining it"
    )
    p.add_argument("--max-quarantine-fraction", type=float, default=0.01, metavar="F", help=_QUARANTINE_HELP)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers the data commands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "synth",
        help="generate a synthetic dataset (a test instrument, not evidence)",
        description="Write <out>/{train,val,test}/*.parquet, spec.yaml and stats.json from "
        "the generative model documented in the README.",
    )
    p.add_argument("--preset", required=True, choices=["fair", "demo", "aliccp-like", "industrial-like"])
    p.add_argument(
        "--conflict",
        choices=["none", "moderate", "strong"],
        default=None,
        help="click/purchase conflict level: net effect of click-bait on purchases over all impressions "
        "none / -1 / -2 per unit of bait (default: the preset's, i.e. none)",
    )
    p.add_argument(
        "--profile-leakage",
        type=float,
        default=None,
        help="probability that each cluster-linked profile field takes its cluster's value (default: the "
        "preset's)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiplies rows, users and items (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed = same files)")
    p.add_argument("--out", required=True, help="output dataset directory (must not exist or be empty)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per parquet file (default: auto)")
    p.add_argument(
        "--day",
        type=int,
        default=1,
        help="which day of the (preset, scale, seed) world to write (default 1: the historical output); "
        "a later day keeps every earlier id as the same entity, appends new users and items and draws "
        "new impressions, so its identity vocabulary extends the day before's",
    )
    p.add_argument(
        "--growth",
        type=float,
        default=0.1,
        help="users and items grow by (1 + growth)^(day - 1) over day 1 (default 0.1)",
    )
    p.add_argument(
        "--drift",
        type=float,
        default=0.05,
        help="size of each day's random-walk step of every user's and item's taste vector (default 0.05)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "import-aliccp",
        help="import raw Ali-CCP (Tianchi dataset 408) into the dataset layout (AITM protocol)",
        description="Stream sample_skeleton_{train,test}.csv and common_features_{train,test}.csv, join "
        "them, "
        "keep the single-valued fields, remap ids seen fewer than --min-count times in train to 0, split "
        "validation off train, keep the official test file. Bad lines are counted in stats.json and written "
        "with file, line and reason to <out>/quarantine/<split>.jsonl (or stop the run with --strict).",
    )
    p.add_argument(
        "--raw",
        required=True,
        type=Path,
        help="folder with sample_skeleton_{train,test}.csv and common_features_{train,test}.csv "
        "(or .csv.gz, read as they are)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="dataset folder to create (must not exist or be empty)"
    )
    p.add_argument(
        "--min-count", type=int, default=10, help="ids seen fewer times in train become 0 (unknown)"
    )
    p.add_argument(
        "--fields",
        nargs="+",
        default=None,
        metavar="FIELD",
        help="Ali-CCP field ids to keep (default: the AITM single-valued set of docs/method.md §6); an id "
        "not documented there is an error that lists the valid ones",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train lines used as validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    _add_quarantine_args(p, "line")
    p.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="process chunks as Ray tasks (default: automatic above 512 MiB of raw input); the "
        "output is identical either way",
    )
    p.add_argument(
        "--vocab-from",
        type=Path,
        default=None,
        metavar="PREV_DATASET",
        help="an earlier import-aliccp data set (e.g. yesterday's): its raw ids keep their rows, ids new "
        "here (--min-count applies to them only) are appended after them in raw-id order, so a model "
        "trained on it can be warm-started; refused (exit 2) without its vocab/ or with other fields",
    )
    p.set_defaults(func=cmd_import_aliccp)

    p = sub.add_parser(
        "import-csv",
        help="import preprocessed CSV files (header: spec fields + click + purchase)",
        description="Stream three CSV files (a header of field names plus click and purchase columns) into "
        "the dataset layout, with sides and vocabulary sizes from a spec file. Bad rows are quarantined "
        "like import-aliccp's.",
    )
    for name in ("--train", "--val", "--test"):
        p.add_argument(name, required=True, type=Path, help=f"CSV file of the {name[2:]} split")
    p.add_argument(
        "--spec", required=True, type=Path, help="spec.yaml: fields, sides, vocab sizes, id fields"
    )
    p.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    p.add_argument(
        "--vocab-from",
        type=Path,
        default=None,
        metavar="PREV_DATASET",
        help="an earlier data set of the same fields: refused (exit 2) unless every vocab size of --spec is "
        "at least that data set's (ids are rows here, so rows stay comparable across days)",
    )
    _add_quarantine_args(p, "row")
    p.set_defaults(func=cmd_import_csv)

    p = sub.add_parser(
        "entities",
        help="(re)write a data set's entity tables <dataset>/entities/ (for data sets written before them)",
        description="Scan the impressions of an existing data set once and write entities/user.parquet and "
        "entities/item.parquet (every id's profile: its side's fields, dense by id, plus seen) and "
        "entities/entities.json. synth and the importers write them with every new data set; training reads "
        "them by id range and fails on a data set without them, naming this command.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="data set folder (with spec.yaml)")
    p.set_defaults(func=cmd_entities)
