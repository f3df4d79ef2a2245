"""The data set check a training command runs first, before the process group and Ray start.

Why: ``pretrain``, ``train`` and ``experiment`` start a process group and a Ray runtime (seconds to
minutes on a cluster) and ``pretrain`` trains a model before it first reads the entity tables; a data
set that lacks a file used to fail only then, and with a message about the step that tripped over it
(``spec file not found`` after Ray's start-up). :func:`check_dataset` reads file metadata only
(``spec.yaml``, the Parquet footers), so it costs well under a second even at 30M users, and every
error is one line: the path, what is wrong with it, and the command that fixes it.

Entity tables are required only by a job that reads them (:func:`entity_tables_reader`): ``pretrain``
(graph mining reads every entity's profile) and a model whose Structure Migrator starts ``U``/``I``
from the side fields or recomputes them (CSTWA with ``structure_migrator`` on, unless
``structure.sm_init=pretrained``); every other model (ESMM, the MoE family, AITM, ESCM2, ...) reads
impressions only and trains on a data set without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.entities import ENTITY_SIDES, FIX_HINT, entity_schema, entity_table_path
from cstwa_dist.data.spec import SPLITS, DatasetSpec
from cstwa_dist.data.validate import DataError, check_schema

if TYPE_CHECKING:
    from cstwa_dist.config import StructureConfig

__all__ = ["PRETRAIN_READS_ENTITIES", "check_dataset", "entity_tables_reader"]

MAKE_HINT = (
    "write it with `cstwa-dist synth --preset PRESET --out {dataset}` or an importer "
    "(`cstwa-dist import-aliccp`, `cstwa-dist import-csv`), or point --set data.dataset=DIR at one"
)
PRETRAIN_READS_ENTITIES = "pretrain mines the user/item graphs from every entity's profile"


def entity_tables_reader(model_name: str, structure_tables: bool, structure: StructureConfig) -> str | None:
    """Why training ``model_name`` reads the entity tables, or ``None`` if it does not.

    ``structure_tables``: whether the model (with the run's switches) has Structure Migrator tables,
    which the caller asks the registry (a layer above this one). The Migrator reads profiles to start
    ``U``/``I`` from the side fields (Eq. 8, ``structure.sm_init=fields``) and, in reading (b), at every
    recompute; started from the pre-trained representations it reads ``<graph_dir>`` instead.
    """
    if not structure_tables:
        return None
    if structure.sm_reading == "recomputed":
        return (
            f"model {model_name} recomputes U/I from every entity's profile (structure.sm_reading=recomputed)"
        )
    if structure.sm_init == "fields":
        return f"model {model_name} starts U/I from every entity's profile (structure.sm_init=fields)"
    return None


def check_dataset(dataset: str | Path, *, entities_for: str | None = None) -> DatasetSpec:
    """Checks that ``dataset`` holds what a training job reads; returns its spec.

    ``spec.yaml`` must load, every split (``train``, ``val``, ``test``) must hold Parquet files whose
    footers have the spec's columns, and, when ``entities_for`` says why the job reads them, both entity
    tables must be there with the spec's columns and one row per id. Raises ``FileNotFoundError`` (a
    missing file) or ``ValueError`` (a wrong one), one line each, naming the path and the fix.
    """
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise FileNotFoundError(
            f"{dataset}: no such data set folder (data.dataset); {MAKE_HINT.format(dataset=dataset)}"
        )
    spec_path = dataset / "spec.yaml"
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{spec_path} not found: {dataset} is not a complete data set (spec.yaml is written last); "
            + MAKE_HINT.format(dataset=dataset)
        )
    spec = DatasetSpec.load(spec_path)  # a SpecError (ValueError) names the file and the problem
    for split in SPLITS:
        files = sorted((dataset / split).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"{dataset / split}: no Parquet files (split {split!r} is missing); "
                + MAKE_HINT.format(dataset=dataset)
            )
        for path in files:
            try:
                check_schema(path, spec)
            except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, unreadable
                raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite the data set") from None
    if entities_for is not None:
        _check_entity_tables(dataset, spec, entities_for)
    return spec


def _check_entity_tables(dataset: Path, spec: DatasetSpec, reason: str) -> None:
    command = f"`{FIX_HINT.format(dataset=dataset)}`"
    fix = f"write them with {command}"
    refix = f"rewrite them with {command}"
    for side in ENTITY_SIDES:
        path = entity_table_path(dataset, side)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {reason}, and {dataset} has no entity tables (written before "
                f"they existed?); {fix}"
            )
        try:
            meta = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e}); {refix}") from None
        want = entity_schema(spec, side)
        got = meta.schema.to_arrow_schema()
        if got.names != want.names or [str(t) for t in got.types] != [str(t) for t in want.types]:
            raise DataError(
                f"{path}: columns {got.names}, but spec.yaml's {side} side needs {want.names} "
                f"(the spec changed since they were written?); {refix}"
            )
        rows = spec.field(want.names[0]).vocab_size
        if meta.num_rows != rows:
            raise DataError(f"{path}: {meta.num_rows} rows, but spec.yaml has {rows} {side} ids; {refix}")
