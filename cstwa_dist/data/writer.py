"""Writing a data set: the one place that turns column chunks into the project's dataset layout.

Every producer of a data set (the generator :mod:`cstwa_dist.data.synth`, the importers
:mod:`cstwa_dist.data.csv_import` and :mod:`cstwa_dist.data.aliccp`) writes the same layout (``spec.py``):
``<out>/{train,val,test}/part-NNNNN.parquet`` with int64 feature columns in spec order and int8 ``click`` /
``purchase``, plus ``spec.yaml`` and ``stats.json``. They build it here so that the layout, the file cut
and the statistics cannot drift apart between them:

* :class:`SplitWriter` cuts a stream of column chunks into files of ``rows_per_file`` rows, by row count
  only, so the files are a function of the rows and of ``rows_per_file`` (never of the producer's
  parallelism); by default (:func:`default_rows_per_file`) a split gets about 8 files so several ranks get
  a share, with row groups of :data:`ROW_GROUP_ROWS`.
* :class:`SplitAccumulator` adds the split's Table-1 statistics (rows, rates, distinct users and items).
* :func:`write_metadata` writes the entity tables (:mod:`cstwa_dist.data.entities`: every user's and item's
  profile, scanned once here rather than on every training rank), then ``spec.yaml`` and ``stats.json``;
  :func:`dataset_complete` is the test a reader uses to skip regeneration.

A data set is always written inside :func:`cstwa_dist.fs.staged_directory` and renamed into place at the
end, so a crash never leaves a half data set that :func:`dataset_complete` would accept.

The quarantine and line accounting of the importers live next door in :mod:`cstwa_dist.data.quarantine`,
not here: the generator writes data that is valid by construction and has no input lines to account for,
so keeping input validation out of this module keeps the generator's dependencies to the layout alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.entities import entity_tables_complete, write_entity_tables
from cstwa_dist.data.spec import LABELS, SPLITS, DatasetSpec, SplitStats, save_stats

ROW_GROUP_ROWS = 1 << 15  # 32k rows: the reader's unit of global shuffle; a share cut reads <= 1 extra
TARGET_FILES = 8
MIN_FILE_ROWS = 4096
MAX_FILE_ROWS = 1 << 22


def default_rows_per_file(rows: int) -> int:
    """About ``TARGET_FILES`` files per split, each 4,096..4M rows: several ranks get a share of even
    a small split, and huge splits still give files big enough to read efficiently."""
    return int(min(MAX_FILE_ROWS, max(MIN_FILE_ROWS, math.ceil(rows / TARGET_FILES))))


def dataset_schema(spec: DatasetSpec) -> pa.Schema:
    """Parquet schema of a split: the spec's fields as int64 (ids), then the labels as int8 (0/1)."""
    return pa.schema([pa.field(n, pa.int64()) for n in spec.names] + [pa.field(n, pa.int8()) for n in LABELS])


class SplitWriter:
    """Cuts a stream of column chunks into ``part-NNNNN.parquet`` files of ``rows_per_file`` rows.

    Each :meth:`write` call writes its rows as row groups of at most :data:`ROW_GROUP_ROWS` that never
    span a call or a file, so where the caller's chunks end is part of the file bytes; a caller whose
    chunks are not fixed by its own definition goes through :class:`SplitAccumulator`, which aligns them.
    """

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int) -> None:
        self.directory = directory
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.files = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, cols: dict[str, np.ndarray]) -> None:
        n = len(cols["click"])
        start = 0
        while start < n:
            if self._writer is None:
                path = self.directory / f"part-{self.files:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema)
                self.files += 1
                self._in_file = 0
            take = min(n - start, self.rows_per_file - self._in_file)
            table = pa.Table.from_arrays(
                [pa.array(cols[f.name][start : start + take], type=f.type) for f in self.schema],
                schema=self.schema,
            )
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self._in_file += take
            start += take
            if self._in_file >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class SplitAccumulator:
    """Writes one split's column chunks to Parquet files and gathers the split's Table-1 statistics.

    ``zero_is_unknown`` says whether id 0 stands for 'unknown' (Ali-CCP after frequency filtering); such
    rows are then left out of the distinct user/item counts, which otherwise count every id.

    With ``align_row_groups`` (the importers), rows are buffered into whole row groups
    (:data:`ROW_GROUP_ROWS`) before they reach the writer, so the files depend only on the sequence of
    rows, not on how the caller's chunks cut it (the Ali-CCP importer's parallel and single-process paths
    write byte-identical files, whatever the chunk size). The generator passes ``False``: its chunks are
    fixed by its own definition (a multiple of the row group) and its files have always been cut from them
    directly, so buffering would move row-group boundaries and change the bytes of existing data sets.
    """

    def __init__(
        self,
        directory: Path,
        spec: DatasetSpec,
        rows_per_file: int,
        *,
        zero_is_unknown: bool,
        align_row_groups: bool = True,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.spec = spec
        self.schema = dataset_schema(spec)
        self.rows_per_file = rows_per_file
        self.zero_is_unknown = zero_is_unknown
        self.align_row_groups = align_row_groups
        self._writer = SplitWriter(directory, self.schema, rows_per_file)
        self._seen_users = np.zeros(spec.num_users, dtype=bool)
        self._seen_items = np.zeros(spec.num_items, dtype=bool)
        self.rows = self.clicks = self.purchases = 0
        self.unknown_users = self.unknown_items = 0
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0

    def _flush(self, final: bool) -> None:
        if not self._buffer:
            return
        cols = {k: np.concatenate([c[k] for c in self._buffer]) for k in self._buffer[0]}
        full = self._buffered if final else (self._buffered // ROW_GROUP_ROWS) * ROW_GROUP_ROWS
        if full:
            self._writer.write({k: v[:full] for k, v in cols.items()})
        rest = {k: v[full:] for k, v in cols.items()}
        self._buffered -= full
        self._buffer = [rest] if self._buffered else []

    def write(self, cols: dict[str, np.ndarray]) -> None:
        n = len(cols["click"])
        if n == 0:
            return
        if self.align_row_groups:
            self._buffer.append(cols)
            self._buffered += n
            if self._buffered >= ROW_GROUP_ROWS:
                self._flush(final=False)
        else:
            self._writer.write(cols)
        users, items = cols[self.spec.user_id], cols[self.spec.item_id]
        self._seen_users[users] = True
        self._seen_items[items] = True
        self.unknown_users += int(np.count_nonzero(users == 0))
        self.unknown_items += int(np.count_nonzero(items == 0))
        self.rows += n
        self.clicks += int(cols["click"].sum(dtype=np.int64))
        self.purchases += int(cols["purchase"].sum(dtype=np.int64))

    def close(self) -> SplitStats:
        """Finishes the files (an empty split still gets one empty file, so the layout is complete)."""
        self._flush(final=True)
        self._writer.close()
        files = self._writer.files
        if files == 0:
            pq.write_table(self.schema.empty_table(), self.directory / "part-00000.parquet")
            files = 1
        if self.zero_is_unknown:
            self._seen_users[0] = False
            self._seen_items[0] = False
        extra: dict[str, Any] = {
            "clicks": self.clicks,
            "purchases": self.purchases,
            "files": files,
            "rows_per_file": self.rows_per_file,
        }
        if self.zero_is_unknown:
            extra["rows_unknown_user"] = self.unknown_users
            extra["rows_unknown_item"] = self.unknown_items
        return SplitStats(
            rows=self.rows,
            click_rate=self.clicks / self.rows if self.rows else 0.0,
            purchase_rate=self.purchases / self.rows if self.rows else 0.0,
            users=int(self._seen_users.sum()),
            items=int(self._seen_items.sum()),
            extra=extra,
        )


def write_metadata(
    directory: Path, spec: DatasetSpec, stats: dict[str, SplitStats], *, progress: bool = True
) -> None:
    """Writes the entity tables, then ``spec.yaml`` and ``stats.json``: what :func:`dataset_complete`
    looks for.

    Every producer of a data set ends here once its splits are closed, so the one scan of the written
    impressions that builds ``entities/`` (:func:`cstwa_dist.data.entities.write_entity_tables`) happens
    for all of them, in the single writing process, before the files that mark the data set complete.
    The impression files are not touched.
    """
    write_entity_tables(directory, spec, progress=progress)
    spec.save(directory / "spec.yaml")
    save_stats(directory / "stats.json", stats)


def dataset_complete(out: str | Path) -> bool:
    """True if ``out`` holds a finished data set (spec.yaml, stats.json, the three split dirs and the
    entity tables).

    Safe as a 'skip generation' test because every writer renames the data set into place
    (:func:`cstwa_dist.fs.staged_directory`) only after every file is written. A data set written before
    entity tables existed is not complete: ``make run`` regenerates its demo data, and
    ``cstwa-dist entities --dataset DIR`` completes any other one in place.
    """
    out = Path(out)
    return (
        (out / "spec.yaml").is_file()
        and (out / "stats.json").is_file()
        and all((out / s).is_dir() for s in SPLITS)
        and entity_tables_complete(out)
    )
