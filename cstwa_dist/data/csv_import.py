"""Import of a preprocessed CSV layout into the dataset layout.

Why this importer exists: most public CVR benchmarks circulate already preprocessed as CSV, one column per
categorical field (already integer ids) plus ``click`` and ``purchase``. Only the field-to-side mapping and
the vocabulary sizes are missing, so they come from a spec file (:meth:`DatasetSpec.load`); the importer
only validates and re-encodes into ``<out>/{train,val,test}/part-NNNNN.parquet`` + ``spec.yaml`` +
``stats.json`` + an identity ``vocab/`` (the ids are rows; ``--vocab-from`` checks that no vocabulary
shrank since an earlier data set, ``docs/data-days.md``).

Streaming: each file is read with ``pyarrow.csv.open_csv`` (an incremental reader, a real CSV parser:
quoted cells and a quoted header such as R's ``write.csv`` default read as plain values), one record
batch at a time, so memory is bounded by a batch plus one bool per user and item id (distinct counts). A
gzip file (found by its magic bytes, whatever its name) is decompressed on the fly.

Validation that loses nothing (:mod:`cstwa_dist.data.quarantine`, shared with the Ali-CCP importer): a
bad line is counted, written to ``<out>/quarantine/<split>.jsonl`` with its line number and reason, or
(``strict``) raised; per file ``input_lines`` (excluding the header) = ``written`` + ``quarantined``.
Reasons here: ``wrong_column_count`` (found by the CSV parser), ``non_integer_id``,
``id_out_of_range`` (outside ``[0, vocab_size)``), ``bad_label`` (not 0/1), ``purchase_without_click``,
and ``truncated_line`` (the last line, without a final newline, fails a check: the file was cut
mid-line, which is also logged as a loud warning). The first problem in column order (fields in spec
order, then labels) names the line's reason.

Bad input stops before any row is written, with one line naming the file: a folder or a binary format
(zip/xlsx, Parquet, bzip2, xz, zstd) given as the file, a missing or empty file (``file is empty (no
header line)``), a header without a spec column, a column name given twice (which one to import is not
decided silently), a file with a header but no data rows (unless ``allow_empty_splits``), a gzip file
that cannot be read to its end. A UTF-8 byte-order mark before the header (spreadsheet exports write
one) is accepted and skipped. After each file, more than ``max_quarantine_fraction`` of its rows
quarantined fails the import (:mod:`cstwa_dist.data.quarantine`): a spec with the wrong vocabulary
quarantines most rows, and a data set built from the rest would be silently wrong.

Line numbers come from pyarrow's invalid-row callback (physical line numbers, exact with
``use_threads=False`` and one row per line) and from counting the valid rows in between. A line break
inside a quoted value (one row over several lines) would break both the line numbers and the accounting,
so it stops the import with the file and lines and what to do (:func:`_multiline_error`), wherever the
parser noticed it: a cell holding the break, a row cut inside its quotes, or the parser out of sync. For
value problems the ``raw`` text is rebuilt from the parsed cells (quotes removed); for column-count
problems it is the parser's raw text.

Files are written by :class:`~cstwa_dist.data.writer.SplitAccumulator` inside
:func:`~cstwa_dist.data.quarantine.staged_import`, like the Ali-CCP importer's.
"""

from __future__ import annotations

import bisect
import csv
import io
import logging
import zlib
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
    TRUNCATED_LINE,
    WRONG_COLUMN_COUNT,
    ImportRun,
    check_fraction,
    check_text_input,
    damaged_gzip,
    is_gzip,
    open_input,
    scan_lines,
    staged_import,
)
from cstwa_dist.data.spec import LABELS, DatasetSpec, SplitStats
from cstwa_dist.data.validate import DataError
from cstwa_dist.data.vocab import VOCAB_DIR, VocabError, Vocabulary
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
    """The header of a CSV file, checked before anything is written: a file (not a folder, not a zip or
    other binary format), present, holding every spec field and both labels once, and followed by at
    least one line (unless ``allow_empty``).

    The header is parsed as CSV (Python's :mod:`csv`, same quoting rules as pyarrow's reader), so a
    quoted header (``"uid","iid",...``, R's ``write.csv`` default) reads as the plain names. A UTF-8
    byte-order mark is skipped (pyarrow's reader skips it too, so the column names agree); gzip is
    decompressed on the fly. A name given twice is an error: which column would be imported is not
    something to decide silently.
    """
    columns = [*spec.names, *LABELS]
    expected = f"expected a header like {','.join(columns)}"
    check_text_input(path, "a CSV file")
    try:
        with open_input(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
            has_rows = f.readline() != ""
    except (EOFError, OSError, zlib.error) as e:
        raise damaged_gzip(path, e) from e
    if not first.strip("\r\n"):
        what = "file is empty (no header line)" if not first else "line 1 is empty (no header line)"
        raise DataError(f"{path}: {what}; {expected}")
    if "\x00" in first:
        raise DataError(f"{path} line 1: holds NUL bytes, not CSV text (a binary file?); {expected}")
    header = next(csv.reader([first.rstrip("\r\n")]))
    seen: dict[str, int] = {}
    for j, name in enumerate(header):
        if name in seen:
            raise DataError(
                f"{path} line 1: column {name!r} appears twice (columns {seen[name] + 1} and {j + 1}); "
                "rename or drop one of them"
            )
        seen[name] = j
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} line 1: header lacks columns {missing}; header is {header}; {expected}")
    if not has_rows and not allow_empty:
        raise DataError(f"{path}: has a header but no data rows; every split needs rows")
    ignored = [c for c in header if c not in columns]
    if ignored:
        logger.warning("%s: columns %s are not in the spec and are not imported", path, ignored)
    return header


def _ends_inside_quotes(text: str) -> bool:
    """Whether a row's text ends inside a quoted value (RFC 4180: a quote opens only at a field's start,
    ``""`` inside is a literal quote), i.e. the parser cut the row at a line break inside the quotes."""
    inside, at_start, k = False, True, 0
    while k < len(text):
        ch = text[k]
        if inside:
            if ch == '"':
                if text[k + 1 : k + 2] == '"':
                    k += 1
                else:
                    inside = False
        elif ch == '"' and at_start:
            inside = True
        at_start = not inside and ch == ","
        k += 1
    return inside


def _multiline_error(path: Path, first: int, last: int | None) -> DataError:
    """The one error for a line break inside a quoted value, wherever the parser noticed it."""
    span = f"lines {first}-{last}" if last is not None else f"near line {first}"
    return DataError(
        f"{path} {span}: a quoted value holds a line break (one row spread over several lines); "
        "import-csv reads one row per line so that line numbers and the accounting stay exact: remove "
        "line breaks inside cells (or drop that column) and export again"
    )


def _import_csv_file(
    path: Path, split: str, spec: DatasetSpec, header: list[str], run: ImportRun, progress: bool
) -> SplitStats:
    """Streams one CSV file into the run's ``<split>`` folder; returns its stats (with its accounting)."""
    quarantine = run.quarantine
    physical, ends_with_newline = scan_lines(path)
    input_lines = max(physical - 1, 0)  # the header is not a data line
    cut_line = None if ends_with_newline else physical  # a bad last line here: the file was cut mid-line
    columns = [*spec.names, *LABELS]

    invalid: list[int] = []  # physical line numbers of rows the parser rejected, in file order
    pending: list[tuple[int, str, str, str]] = []  # (line, reason, raw, detail) not yet quarantined
    torn: list[int] = []  # lines where a row ends inside quotes: a line break in a quoted value

    def on_invalid(row: Any) -> str:
        if row.number is None:  # only with newlines_in_values, which parse_options below exclude
            raise DataError(f"{path}: a malformed row without a line number: {row.text!r}")
        if _ends_inside_quotes(row.text) and row.number != cut_line:  # a quoted value cut at a line break
            torn.append(row.number)
        detail = f"{row.actual_columns} columns, expected {row.expected_columns}"
        invalid.append(row.number)  # the callback sees rows in file order (use_threads=False)
        pending.append((row.number, WRONG_COLUMN_COUNT, row.text, detail))
        return "skip"

    def flush(up_to: int | None) -> None:
        """Quarantines pending bad lines up to ``up_to`` in line order (strict: the first one raises)."""
        pending.sort()
        k = len(pending) if up_to is None else bisect.bisect_right(pending, (up_to, "\uffff"))
        for line, reason, raw, detail in pending[:k]:
            if line == cut_line:
                reason, detail = TRUNCATED_LINE, f"no newline at the end of the file; {reason}: {detail}"
            quarantine.add(split, str(path), line, reason, raw, detail)
        del pending[:k]

    # Every column is read (as text), ignored ones too, so that a line break inside any quoted value is
    # seen: with ``newlines_in_values=False`` the parser may join such a row, cut it in two, or lose
    # sync, and each of these ends in the one error of :func:`_multiline_error`.
    source = pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None)

    def fail(e: BaseException) -> DataError:
        """A reader exception as one line naming the file (pyarrow's own message names no file)."""
        if isinstance(e, pa.ArrowInvalid) and "out of sync" in str(e):
            return _multiline_error(path, valid_seen + len(invalid) + 2, None)
        if is_gzip(path):
            return damaged_gzip(path, e)
        return DataError(f"{path}: not readable as CSV after line {valid_seen + len(invalid) + 1}: {e}")

    valid_seen = 0
    try:
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_invalid, newlines_in_values=False, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, EOFError, OSError, zlib.error) as e:
        raise fail(e) from e
    rows_per_file = default_rows_per_file(max(input_lines, 1))
    acc = SplitAccumulator(run.directory / split, spec, rows_per_file, zero_is_unknown=False)
    prog = Progress(f"csv {path.name} -> {split}", input_lines, progress, log=logger)
    batches = iter(reader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowInvalid, EOFError, OSError, zlib.error) as e:
            raise fail(e) from e
        broken = np.zeros(batch.num_rows, dtype=bool)
        for name in header:
            broken |= pc.match_substring_regex(batch.column(name), "[\r\n]").to_numpy(zero_copy_only=False)
        if broken.any():
            k = int(np.flatnonzero(broken)[0])
            first = _line_of_valid_row(valid_seen + k, invalid)
            if not torn or first < torn[0]:
                extra = sum(str(batch.column(c)[k].as_py()).count("\n") for c in header)
                raise _multiline_error(path, first, first + extra)
        if torn:
            raise _multiline_error(path, torn[0], torn[0] + 1)
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
    source.close()
    if torn:
        raise _multiline_error(path, torn[0], torn[0] + 1)
    flush(None)
    if quarantine.by_file.get(str(path), {}).get(TRUNCATED_LINE):
        logger.warning(
            "%s ends mid-line: its last line (%d) has no newline and does not parse, so the file is "
            "TRUNCATED (an interrupted copy or export?); that line is quarantined as %s and the rows "
            "before it are imported: export or copy the file again for the full data",
            path,
            physical,
            TRUNCATED_LINE,
        )
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
    vocab_from: Path | None = None,
) -> dict[str, SplitStats]:
    """Imports three preprocessed CSV files (header = spec field names + ``click`` + ``purchase``).

    ``spec`` is a spec.yaml (or a directory holding one) giving each field's side and vocab size; ids
    must already be integers in ``[0, vocab_size)`` (0 is a normal id here). Returns the per-split
    statistics, also written to ``<out>/stats.json``. See the module docstring for validation; the spec
    and all three headers are checked before anything is written.

    The ids are rows, so the data set's vocabulary (``<out>/vocab/``) is identity over the spec's sizes.
    ``vocab_from`` (an earlier data set of the same fields, e.g. yesterday's import): refused unless every
    field's vocabulary size is at least that data set's (ids never shrink away), so rows stay comparable.
    """
    train, val, test, out = Path(train), Path(val), Path(test), Path(out)
    max_quarantine_fraction = check_fraction(max_quarantine_fraction)
    dataset_spec = DatasetSpec.load(spec)
    vocabulary = Vocabulary.identity(dataset_spec)
    if vocab_from is not None:
        check_grows(vocabulary, Vocabulary.load(vocab_from), str(vocab_from))
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
        vocabulary.save(run.directory / VOCAB_DIR)
        run.finish(dataset_spec, stats, progress=progress)
    return stats


def check_grows(vocabulary: Vocabulary, previous: Vocabulary, source: str) -> None:
    """Refuses a ``--vocab-from`` data set that this import's identity vocabulary does not extend."""
    if set(previous.fields) != set(vocabulary.fields):
        raise VocabError(
            f"--vocab-from {source}: its fields {sorted(previous.fields)} differ from the spec's "
            f"{sorted(vocabulary.fields)}"
        )
    try:
        vocabulary.check_extends(previous)
    except VocabError as e:
        raise VocabError(
            f"--vocab-from {source}: {e}; give the spec vocabulary sizes at least as large"
        ) from None
