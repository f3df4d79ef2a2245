"""Import of a preprocessed CSV layout into the dataset layout.

Why this importer exists: most public CVR benchmarks circulate already preprocessed as CSV, one column per
categorical field (already integer ids) plus ``click`` and ``purchase``. Only the field-to-side mapping and
the vocabulary sizes are missing, so they come from a spec file (:meth:`DatasetSpec.load`); the importer
only validates and re-encodes into ``<out>/{train,val,test}/part-NNNNN.parquet`` + ``spec.yaml`` +
``stats.json``.

Streaming: each file is read with ``pyarrow.csv.open_csv`` (an incremental reader), one record batch at a
time, so memory is bounded by a batch plus one bool per user and item id (distinct counts).

Validation that loses nothing (:mod:`cstwa_dist.data.quarantine`, shared with the Ali-CCP importer): a
bad line is counted, written to ``<out>/quarantine/<split>.jsonl`` with its line number and reason, or
(``strict``) raised; per file ``input_lines`` (excluding the header) = ``written`` + ``quarantined``.
Reasons here: ``wrong_column_count`` (found by the CSV parser), ``non_integer_id``,
``id_out_of_range`` (outside ``[0, vocab_size)``), ``bad_label`` (not 0/1), ``purchase_without_click``.
The first problem in column order (fields in spec order, then labels) names the line's reason.

Bad input stops before any row is written, with one line naming the file: a missing or empty file
(``file is empty (no header line)``), a header without a spec column, a file with a header but no data
rows (unless ``allow_empty_splits``). A UTF-8 byte-order mark before the header (spreadsheet exports
write one) is accepted and skipped. After each file, more than ``max_quarantine_fraction`` of its rows
quarantined fails the import (:mod:`cstwa_dist.data.quarantine`): a spec with the wrong vocabulary
quarantines most rows, and a data set built from the rest would be silently wrong.

Line numbers come from pyarrow's invalid-row callback (physical line numbers, exact with
``use_threads=False`` and no quoted newlines, which this importer does not accept) and from counting the
valid rows in between. For value problems the ``raw`` text is rebuilt from the parsed cells (quotes
removed); for column-count problems it is the parser's raw text.

Files are written by :class:`~cstwa_dist.data.writer.SplitAccumulator` inside
:func:`~cstwa_dist.data.quarantine.staged_import`, like the Ali-CCP importer's.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cstwa_dist.data.progress import Progress
from cstwa_dist.data.quarantine import (
    BAD_LABEL,
    DEFAULT_MAX_QUARANTINE_FRACTION,
    ID_OUT_OF_RANGE,
    NON_INTEGER_ID,
    PURCHASE_WITHOUT_CLICK,
    WRONG_COLUMN_COUNT,
    ImportRun,
    check_fraction,
    count_lines,
    staged_import,
)
from cstwa_dist.data.spec import LABELS, DatasetSpec, SplitStats
from cstwa_dist.data.validate import DataError
from cstwa_dist.data.writer import SplitAccumulator, default_rows_per_file

logger = logging.getLogger(__name__)

CSV_BLOCK_BYTES = 16 << 20  # bytes pyarrow parses per record batch: bounded memory, few Python calls
_INT_PATTERN = r"^-?[0-9]{1,18}$"  # 18 digits always fit in int64


# --- the CSV importer -------------------------------------------------------------------------------
def _line_of_valid_row(g: int, invalid: list[int], first: int = 2) -> int:
    """1-based physical line of the ``g``-th (0-based) valid data row, given the sorted invalid lines.

    Line ``L`` holds valid row ``L - first - #(invalid <= L)``; iterate to the fixed point (monotone).
    """
    line = first + g
    while True:
        nxt = first + g + bisect.bisect_right(invalid, line)
        if nxt == line:
            return line
        line = nxt


def _row_problems(
    batch: pa.RecordBatch, spec: DatasetSpec
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Vectorised checks of one batch of string cells.

    Returns a per-row problem code (0 = fine, else an index into the returned message list, first
    problem in column order wins), the messages, and the int columns (garbage where a row is bad).
    """
    n = batch.num_rows
    code = np.zeros(n, dtype=np.int32)
    messages = [""]
    ints: dict[str, np.ndarray] = {}

    def flag(mask: np.ndarray, reason: str, what: str) -> None:
        fresh = mask & (code == 0)
        if fresh.any():
            messages.append(f"{reason}|{what}")
            code[fresh] = len(messages) - 1

    empty = np.ones(n, dtype=bool)
    for name in [*spec.names, *LABELS]:
        empty &= pc.equal(batch.column(name), "").to_numpy(zero_copy_only=False)
    # An empty line parses as one row of empty cells: it really has one column, not len(header).
    flag(empty, WRONG_COLUMN_COUNT, "empty line")
    for name in [*spec.names, *LABELS]:
        col = batch.column(name)
        ok = pc.match_substring_regex(col, _INT_PATTERN).to_numpy(zero_copy_only=False)
        vals = pc.cast(pc.if_else(pa.array(ok), col, "0"), pa.int64()).to_numpy(zero_copy_only=False)
        ints[name] = vals
        if name in LABELS:
            flag(~ok | ((vals != 0) & (vals != 1)), BAD_LABEL, f"column {name!r} must be 0 or 1")
        else:
            vocab = spec.field(name).vocab_size
            flag(~ok, NON_INTEGER_ID, f"field {name!r} is not an integer")
            flag((vals < 0) | (vals >= vocab), ID_OUT_OF_RANGE, f"field {name!r} outside [0, {vocab})")
    flag((ints["click"] == 0) & (ints["purchase"] == 1), PURCHASE_WITHOUT_CLICK, "click=0 with purchase=1")
    return code, messages, ints


def read_header(path: Path, spec: DatasetSpec, *, allow_empty: bool = False) -> list[str]:
    """The header of a CSV file, checked before anything is written: present, holding every spec field
    and both labels, and followed by at least one line (unless ``allow_empty``). A UTF-8 byte-order
    mark is skipped (pyarrow's reader skips it too, so the column names agree)."""
    columns = [*spec.names, *LABELS]
    expected = f"expected a header like {','.join(columns)}"
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
        has_rows = f.readline() != ""
    if not first.strip("\r\n"):
        what = "file is empty (no header line)" if not first else "line 1 is empty (no header line)"
        raise DataError(f"{path}: {what}; {expected}")
    header = first.rstrip("\r\n").split(",")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} line 1: header lacks columns {missing}; header is {header}; {expected}")
    if not has_rows and not allow_empty:
        raise DataError(f"{path}: has a header but no data rows; every split needs rows")
    ignored = [c for c in header if c not in columns]
    if ignored:
        logger.warning("%s: columns %s are not in the spec and are not imported", path, ignored)
    return header


def _import_csv_file(
    path: Path, split: str, spec: DatasetSpec, header: list[str], run: ImportRun, progress: bool
) -> SplitStats:
    """Streams one CSV file into the run's ``<split>`` folder; returns its stats (with its accounting)."""
    quarantine = run.quarantine
    input_lines = max(count_lines(path) - 1, 0)  # the header is not a data line
    columns = [*spec.names, *LABELS]

    invalid: list[int] = []  # physical line numbers of rows the parser rejected, in file order
    pending: list[tuple[int, str, str, str]] = []  # (line, reason, raw, detail) not yet quarantined

    def on_invalid(row: Any) -> str:
        if row.number is None:  # only with quoted newlines, which parse_options below exclude
            raise DataError(f"{path}: a malformed row without a line number: {row.text!r}")
        detail = f"{row.actual_columns} columns, expected {row.expected_columns}"
        invalid.append(row.number)  # the callback sees rows in file order (use_threads=False)
        pending.append((row.number, WRONG_COLUMN_COUNT, row.text, detail))
        return "skip"

    def flush(up_to: int | None) -> None:
        """Quarantines pending bad lines up to ``up_to`` in line order (strict: the first one raises)."""
        pending.sort()
        k = len(pending) if up_to is None else bisect.bisect_right(pending, (up_to, "\uffff"))
        for line, reason, raw, detail in pending[:k]:
            quarantine.add(split, str(path), line, reason, raw, detail)
        del pending[:k]

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(
            invalid_row_handler=on_invalid, newlines_in_values=False, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header},
            include_columns=columns,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    rows_per_file = default_rows_per_file(max(input_lines, 1))
    acc = SplitAccumulator(run.directory / split, spec, rows_per_file, zero_is_unknown=False)
    valid_seen = 0
    prog = Progress(f"csv {path.name} -> {split}", input_lines, progress, log=logger)
    for batch in reader:
        code, messages, ints = _row_problems(batch, spec)
        for k in np.flatnonzero(code):
            reason, detail = messages[code[k]].split("|", 1)
            raw = ",".join(str(batch.column(c)[int(k)].as_py()) for c in header if c in columns)
            pending.append((_line_of_valid_row(valid_seen + int(k), invalid), reason, raw, detail))
        if batch.num_rows:
            flush(_line_of_valid_row(valid_seen + batch.num_rows - 1, invalid))
        good = code == 0
        cols = {name: ints[name][good] for name in spec.names}
        cols.update({name: ints[name][good].astype(np.int8) for name in LABELS})
        acc.write(cols)
        valid_seen += batch.num_rows
        prog.step(valid_seen + len(invalid) - prog.done)  # lines the parser consumed, valid or not
    flush(None)
    stats = acc.close()
    prog.finish()
    accounting = quarantine.accounting(str(path), input_lines, stats.rows)
    stats.extra.update(accounting)
    stats.extra["source"] = str(path)
    stats.extra["quarantine"] = quarantine.counts(split)
    run.add_file(str(path), str(path), accounting)  # fails here if too much of the file was quarantined
    return stats


def import_csv(
    train: Path,
    val: Path,
    test: Path,
    spec: Path,
    out: Path,
    *,
    strict: bool = False,
    max_quarantine_fraction: float = DEFAULT_MAX_QUARANTINE_FRACTION,
    allow_empty_splits: bool = False,
    progress: bool = True,
) -> dict[str, SplitStats]:
    """Imports three preprocessed CSV files (header = spec field names + ``click`` + ``purchase``).

    ``spec`` is a spec.yaml (or a directory holding one) giving each field's side and vocab size; ids
    must already be integers in ``[0, vocab_size)`` (0 is a normal id here). Returns the per-split
    statistics, also written to ``<out>/stats.json``. See the module docstring for validation; the spec
    and all three headers are checked before anything is written.
    """
    train, val, test, out = Path(train), Path(val), Path(test), Path(out)
    max_quarantine_fraction = check_fraction(max_quarantine_fraction)
    dataset_spec = DatasetSpec.load(spec)
    sources = {"train": train, "val": val, "test": test}
    headers = {
        split: read_header(path, dataset_spec, allow_empty=allow_empty_splits)
        for split, path in sources.items()
    }
    with staged_import(
        out,
        strict=strict,
        command="import-csv",
        max_quarantine_fraction=max_quarantine_fraction,
        allow_empty_splits=allow_empty_splits,
    ) as run:
        stats = {
            split: _import_csv_file(path, split, dataset_spec, headers[split], run, progress)
            for split, path in sources.items()
        }
        run.finish(dataset_spec, stats, progress=progress)
    return stats
