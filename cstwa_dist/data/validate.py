"""Checks that a Parquet split matches its :class:`DatasetSpec`, without ever dropping or clamping a row.

Three levels, from cheap to exact:

* :func:`check_schema` reads only the Parquet footer: every spec field must be an integer column and the
  label columns ``click`` / ``purchase`` must be present (and integer). Run before training, so a wrong
  file fails in seconds instead of hours into an epoch.
* :func:`check_batch` is a vectorised check of one streamed batch (a few min/max reductions per column),
  cheap enough to run on every batch. It only says *that* a batch is bad: after Ray's shuffling a
  batch no longer knows which file and row its values came from.
* :func:`locate_first_error` re-scans files with pyarrow, in order, and returns a :class:`DataError`
  naming the first offending file, row (0-based within the file), field and value. It is only called
  after :func:`check_batch` failed, so its cost is paid once, on the way to raising.

A bad row is always an error: silently dropping it would change the label distribution the model is
fitted to, and clamping an id would train a wrong embedding row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.spec import LABELS, DatasetSpec

_SCAN_ROWS = 65536  # rows per pyarrow record batch when locating an error


class DataError(ValueError):
    """Data that does not match the spec; the message names file, row, field/column, value and problem."""


def check_schema(path: str | Path, spec: DatasetSpec, schema: pa.Schema | None = None) -> None:
    """Raises :class:`DataError` if a spec field or label column is missing or not an integer column.

    Uses the Parquet footer only (``schema`` may be passed when the caller already read it).
    """
    if schema is None:
        schema = pq.read_schema(path)
    present = set(schema.names)
    for kind, names in (("field", spec.names), ("label column", list(LABELS))):
        for name in names:
            if name not in present:
                raise DataError(
                    f"{path}: {kind} {name!r} is missing (column not found); columns are {schema.names}"
                )
            typ = schema.field(name).type
            if not pa.types.is_integer(typ):
                raise DataError(f"{path}: {kind} {name!r} has type {typ}, expected an integer type")


def check_batch(columns: Mapping[str, np.ndarray], spec: DatasetSpec) -> str | None:
    """Vectorised check of one batch; returns a short reason if anything is wrong, else None.

    Nulls do not survive as such through Ray's numpy conversion: an int column with nulls becomes
    float (NaN) or object, so any non-integer dtype counts as "null or non-integer".
    """
    for f in spec.fields:
        a = columns[f.name]
        if a.dtype.kind not in "iu":
            return f"field {f.name!r}: null or non-integer values (dtype {a.dtype})"
        if a.size and (a.min() < 0 or a.max() >= f.vocab_size):
            return f"field {f.name!r}: id outside [0, {f.vocab_size}) (min {a.min()}, max {a.max()})"
    for name in LABELS:
        a = columns[name]
        if a.dtype.kind not in "iu":
            return f"column {name!r}: null or non-integer values (dtype {a.dtype})"
        if a.size and (a.min() < 0 or a.max() > 1):
            return f"column {name!r}: label outside {{0, 1}} (min {a.min()}, max {a.max()})"
    click, purchase = columns["click"], columns["purchase"]
    if click.size and bool(np.any(purchase > click)):
        return "column 'purchase': purchase=1 on a row with click=0"
    return None


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def _scan_record_batch(rb: pa.RecordBatch, spec: DatasetSpec) -> tuple[int, str] | None:
    """First bad row of one record batch and the problem, ties broken by spec column order."""
    found: list[tuple[int, int, str]] = []  # (row, check order, message)
    order = 0

    def consider(mask: np.ndarray, describe) -> None:
        row = _first(mask)
        if row is not None:
            found.append((row, order, describe(row)))

    for f in spec.fields:
        col = rb.column(f.name)
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        vals = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        consider(nulls, lambda r, n=f.name: f"field {n!r}: null value (missing id)")
        order += 1
        consider(
            (vals < 0) & ~nulls,
            lambda r, n=f.name, v=vals, fs=f: (
                f"field {n!r}: id {v[r]} is negative, ids must be in [0, {fs.vocab_size})"
            ),
        )
        order += 1
        consider(
            vals >= f.vocab_size,
            lambda r, n=f.name, v=vals, fs=f: f"field {n!r}: id {v[r]} out of range [0, {fs.vocab_size})",
        )
        order += 1
    labels: dict[str, np.ndarray] = {}
    label_nulls: dict[str, np.ndarray] = {}
    for name in LABELS:
        col = rb.column(name)
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        vals = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        labels[name], label_nulls[name] = vals, nulls
        consider(nulls, lambda r, n=name: f"column {n!r}: null label")
        order += 1
        consider(
            (vals != 0) & (vals != 1),
            lambda r, n=name, v=vals: f"column {n!r}: label {v[r]} is not in {{0, 1}}",
        )
        order += 1
    click, purchase = labels["click"], labels["purchase"]
    consider(
        (click == 0) & (purchase == 1) & ~label_nulls["click"],
        lambda r: "column 'purchase': purchase=1 with click=0 (a purchase must follow a click)",
    )
    if not found:
        return None
    row, _, message = min(found)
    return row, message


def first_error_in(
    batches: Iterable[pa.RecordBatch], spec: DatasetSpec, path: str | Path, first_row: int = 0
) -> DataError | None:
    """The first bad row of ``batches`` (consecutive rows of ``path`` from row ``first_row``), or None.

    The one place that turns a scanned record batch into a located error (file, row, field), for a
    whole file here and for a rank's row-group slices in the reader.
    """
    offset = first_row
    for rb in batches:
        hit = _scan_record_batch(rb, spec)
        if hit is not None:
            row, message = hit
            return DataError(f"{path} row {offset + row} {message}")
        offset += rb.num_rows
    return None


def locate_first_error(files: Iterable[str | Path], spec: DatasetSpec) -> DataError | None:
    """Scans ``files`` in order with pyarrow; returns a DataError for the first bad row, or None."""
    columns = [*spec.names, *LABELS]
    for path in files:
        check_schema(path, spec)
        rbs = pq.ParquetFile(path).iter_batches(batch_size=_SCAN_ROWS, columns=columns)
        err = first_error_in(rbs, spec, path)
        if err is not None:
            return err
    return None
