"""Entity tables: every user's (item's) profile, written once with the data set, read shard-wise.

The representations ``r_u`` (Eq. 2, docs/method.md §1.2) are per *entity*, but the data holds impressions.
Profile fields are functions of the entity id, so one scan over the splits recovers them. That scan used
to run on every rank of every training job (a full rescan of the impressions and an ``[N, M]`` array per
rank: at 30M users an outage); now the process that writes the data set runs it once and stores the
result next to the splits, and a rank reads only the id range it owns:

``<dataset>/entities/user.parquet``, ``<dataset>/entities/item.parquet``
    dense and sorted by id: row ``i`` is entity id ``i``, all ``vocab_size`` ids present. Columns: the
    side's fields in ``spec.side_fields(side)`` order (id first, int64) and a bool ``seen`` (the id occurs
    in some impression). Row groups of :data:`ENTITY_ROW_GROUP_ROWS` rows (the last one shorter), so a
    range ``[lo, hi)`` costs only the row groups that overlap it.
``<dataset>/entities/entities.json``
    the report of the scan (rows, seen ids and conflicting ids per side); written last, so its presence
    means both tables are whole (:func:`entity_tables_complete`).

Semantics of the scan (unchanged from the per-rank scan it replaces): the splits are read in
``train, val, test`` order, files sorted, rows in file order, and when the data disagrees (a user seen
with two ages) the last value read wins and the number of such entities is logged as a warning. Ids never
seen keep their own id and 0 (unknown) in every other field. An id outside ``[0, vocab_size)`` is a
``ValueError`` naming the file, row group and row.

Every file is written through :func:`cstwa_dist.fs.atomic_path`, so a reader sees a whole table or none;
:func:`cstwa_dist.data.writer.write_metadata` calls :func:`write_entity_tables` before it writes
``spec.yaml`` and ``stats.json``, inside the writer's staging folder, so every producer of a data set
(generator, both importers) writes the tables and :func:`~cstwa_dist.data.writer.dataset_complete`
can require them. ``cstwa-dist entities --dataset DIR`` (re)writes them for a data set written before.
"""

from __future__ import annotations

import logging
import operator
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.progress import Progress
from cstwa_dist.data.spec import SPLITS, DatasetSpec, split_files
from cstwa_dist.fs import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

ENTITIES_DIR = "entities"
REPORT_NAME = "entities.json"
ENTITY_SIDES = ("user", "item")
SEEN = "seen"
# 1,048,576 rows per row group: a range read costs at most one row group of rows beyond the range (8 MiB
# per int64 column), and a 30M-id table has ~30 row groups, so the footer stays tiny.
ENTITY_ROW_GROUP_ROWS = 1 << 20

FIX_HINT = "cstwa-dist entities --dataset {dataset}"


def entity_table_path(dataset: str | Path, side: str) -> Path:
    """``<dataset>/entities/<side>.parquet``."""
    _check_side(side)
    return Path(dataset) / ENTITIES_DIR / f"{side}.parquet"


def entity_tables_complete(dataset: str | Path) -> bool:
    """True if both entity tables and the report are in place (the report is written last)."""
    d = Path(dataset) / ENTITIES_DIR
    return (d / REPORT_NAME).is_file() and all((d / f"{s}.parquet").is_file() for s in ENTITY_SIDES)


def _check_side(side: str) -> None:
    if side not in ENTITY_SIDES:
        raise ValueError(f"entity tables exist for sides {ENTITY_SIDES}, not {side!r}")


def _side_columns(spec: DatasetSpec, side: str) -> list[str]:
    return [f.name for f in spec.side_fields(side)]


def entity_schema(spec: DatasetSpec, side: str) -> pa.Schema:
    """The side's fields as int64 (``spec.side_fields`` order, id first), then ``seen`` as bool."""
    fields = _side_columns(spec, side)
    if SEEN in fields:
        raise ValueError(
            f"spec field {SEEN!r} is on the {side} side, but {SEEN!r} is the entity tables' own column; "
            "rename the field"
        )
    return pa.schema([pa.field(f, pa.int64()) for f in fields] + [pa.field(SEEN, pa.bool_())])


class _SideScan:
    """One side's profiles while the splits are scanned: ``[N, M]`` int64 plus two ``[N]`` bools."""

    def __init__(self, spec: DatasetSpec, side: str) -> None:
        self.side = side
        self.fields = _side_columns(spec, side)
        self.key = self.fields[0]  # the side's id field comes first
        self.n = spec.field(self.key).vocab_size
        self.prof = np.zeros((self.n, len(self.fields)), dtype=np.int64)
        self.prof[:, 0] = np.arange(self.n)
        self.seen = np.zeros(self.n, dtype=bool)
        self.conflict = np.zeros(self.n, dtype=bool)

    def add(self, cols: np.ndarray, path: Path, rg: int) -> None:
        """Folds one row group's ``[rows, M]`` values in; the last row of an id wins.

        A conflict is an id whose profile values differ anywhere: between rows of this row group (found
        after a stable sort by id) or between this row group and what was read before.
        """
        ids = cols[:, 0]
        if ids.size == 0:
            return
        bad = (ids < 0) | (ids >= self.n)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: row group {rg}, row {row}: {self.key} = {int(ids[row])} is outside "
                f"[0, {self.n}) (vocab_size in spec.yaml)"
            )
        order = np.argsort(ids, kind="stable")
        s, v = ids[order], cols[order]
        same = s[1:] == s[:-1]
        last = np.ones(s.size, dtype=bool)
        last[:-1] = ~same  # the last row of each id, in file order (stable sort)
        uid, rows = s[last], v[last]
        if v.shape[1] > 1:
            differ = same & (v[1:, 1:] != v[:-1, 1:]).any(axis=1)
            self.conflict[s[1:][differ]] = True
            again = self.seen[uid]
            if again.any():
                d = (self.prof[uid[again], 1:] != rows[again, 1:]).any(axis=1)
                self.conflict[uid[again][d]] = True
        self.prof[uid] = rows
        self.seen[uid] = True


def _scan(dataset: Path, spec: DatasetSpec, progress: bool) -> tuple[dict[str, _SideScan], int, int]:
    """One pass over every row group of the three splits (``train, val, test``, files sorted)."""
    scans = {side: _SideScan(spec, side) for side in ENTITY_SIDES}
    columns = [c for s in scans.values() for c in s.fields]
    files = [path for split in SPLITS for path in split_files(dataset, split)]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    prog = Progress(f"entities {dataset.name}: scan", total, progress, unit="rows", log=logger)
    for path in files:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} of spec.yaml")
        for rg in range(pf.num_row_groups):
            tbl = pf.read_row_group(rg, columns=columns)
            for scan in scans.values():
                cols = np.stack([tbl.column(f).to_numpy() for f in scan.fields], axis=1).astype(np.int64)
                scan.add(cols, path, rg)
            prog.step(tbl.num_rows)
    prog.finish()
    return scans, total, len(files)


def _write_table(path: Path, schema: pa.Schema, scan: _SideScan, row_group_rows: int) -> None:
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for a in range(0, scan.n, row_group_rows):
            b = min(scan.n, a + row_group_rows)
            arrays = [pa.array(np.ascontiguousarray(scan.prof[a:b, j])) for j in range(len(scan.fields))]
            arrays.append(pa.array(scan.seen[a:b]))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=row_group_rows)


def write_entity_tables(
    dataset: str | Path,
    spec: DatasetSpec,
    *,
    row_group_rows: int = ENTITY_ROW_GROUP_ROWS,
    progress: bool = True,
) -> dict[str, Any]:
    """Scans the three splits of ``dataset`` once and writes ``entities/{user,item}.parquet`` + the report.

    Runs where a data set is written (one process) or from ``cstwa-dist entities``; replaces existing
    tables (the report is removed first and written last, so :func:`entity_tables_complete` is false
    while a rewrite is under way). Returns the report, also written to ``entities/entities.json``:
    per side ``rows`` (= vocab_size), ``seen`` (ids in some impression), ``conflicts`` (ids with more
    than one profile) and ``fields``.

    Memory (this one process, never a training rank): ``Σ_sides N·(8·M + 2)`` bytes for the profiles,
    ``seen`` and conflict flags being built, plus one impression row group while scanning and one entity
    row group while writing.
    """
    dataset = Path(dataset)
    if int(row_group_rows) < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    schemas = {side: entity_schema(spec, side) for side in ENTITY_SIDES}
    t0 = time.perf_counter()
    scans, total, files = _scan(dataset, spec, progress)
    out = dataset / ENTITIES_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).unlink(missing_ok=True)
    report: dict[str, Any] = {
        "row_group_rows": int(row_group_rows),
        "impression_rows": int(total),
        "impression_files": files,
    }
    for side, scan in scans.items():
        _write_table(out / f"{side}.parquet", schemas[side], scan, int(row_group_rows))
        conflicts, seen = int(scan.conflict.sum()), int(scan.seen.sum())
        if conflicts:
            logger.warning(
                "%s: %d %ss have more than one profile in the data; the last one read is used",
                dataset,
                conflicts,
                side,
            )
        logger.info("%s: %s table: %d of %d ids seen in the data", dataset, side, seen, scan.n)
        report[side] = {"rows": scan.n, "seen": seen, "conflicts": conflicts, "fields": scan.fields}
    atomic_write_json(out / REPORT_NAME, report)
    logger.info("%s: entity tables written in %.1fs", dataset, time.perf_counter() - t0)
    return report


def read_entity_rows(
    dataset: str | Path, spec: DatasetSpec, side: str, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Profiles ``[hi-lo, M_side]`` int64 (``spec.side_fields`` order) and ``seen`` ``[hi-lo]`` bool of
    the ids ``[lo, hi)`` of ``side``, reading only the row groups of ``entities/<side>.parquet`` that
    overlap the range.

    Per-rank memory: the result, ``(hi-lo)·(M+1)`` values, plus at most one row group
    (:data:`ENTITY_ROW_GROUP_ROWS` rows) in flight, because row groups are read one at a time and copied
    into the result; never O(N) unless the range is. Raises ``FileNotFoundError`` if the table is
    missing (a data set written before entity tables), ``ValueError`` if it does not match the spec
    (rows or columns) or the range is outside ``[0, N]``.
    """
    dataset = Path(dataset)
    path = entity_table_path(dataset, side)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the data set {dataset} was written by an older version of cstwa-dist, "
            f"before entity tables; write them with `{FIX_HINT.format(dataset=dataset)}`"
        )
    schema = entity_schema(spec, side)
    fields = schema.names[:-1]
    n = spec.field(fields[0]).vocab_size
    fix = (
        "; the spec changed since the tables were written? rewrite them with "
        f"`{FIX_HINT.format(dataset=dataset)}`"
    )
    pf = pq.ParquetFile(path)
    got = [(f.name, str(f.type)) for f in pf.schema_arrow]
    want = [(f.name, str(f.type)) for f in schema]
    if got != want:
        raise ValueError(f"{path}: columns {got}, but spec.yaml's {side} side needs {want}{fix}")
    meta = pf.metadata
    if meta.num_rows != n:
        raise ValueError(
            f"{path}: {meta.num_rows} rows, but spec.yaml's {fields[0]} has vocab_size {n} "
            f"(one row per id){fix}"
        )
    try:
        lo, hi = operator.index(lo), operator.index(hi)
    except TypeError:
        raise ValueError(f"{path}: row range [{lo!r}, {hi!r}) must be integers") from None
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"{path}: row range [{lo}, {hi}) is outside [0, {n}] ({side} ids)")
    prof = np.empty((hi - lo, len(fields)), dtype=np.int64)
    seen = np.empty(hi - lo, dtype=bool)
    start = 0
    for rg in range(meta.num_row_groups):
        end = start + meta.row_group(rg).num_rows
        a, b = max(lo, start), min(hi, end)
        if a < b:
            tbl = pf.read_row_group(rg, columns=schema.names)
            for j, f in enumerate(fields):
                prof[a - lo : b - lo, j] = tbl.column(f).to_numpy()[a - start : b - start]
            seen[a - lo : b - lo] = tbl.column(SEEN).to_numpy()[a - start : b - start]
            del tbl
            ids = prof[a - lo : b - lo, 0]
            wrong = np.flatnonzero(ids != np.arange(a, b))
            if wrong.size:
                row = a + int(wrong[0])
                raise ValueError(
                    f"{path}: row {row} (row group {rg}) holds {fields[0]} = {int(ids[wrong[0]])}; the table "
                    f"must be dense and sorted by id{fix}"
                )
        start = end
        if start >= hi:
            break
    return prof, seen
