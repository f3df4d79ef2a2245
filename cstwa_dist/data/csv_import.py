"""Import of a preprocessed CSV layout into the dataset layout, plus the pieces both importers share.

Why this importer exists: most public CVR benchmarks circulate already preprocessed as CSV, one column per
categorical field (already integer ids) plus ``click`` and ``purchase``. Only the field-to-side mapping and
the vocabulary sizes are missing, so they come from a spec file (:meth:`DatasetSpec.load`); the importer
only validates and re-encodes into ``<out>/{train,val,test}/part-NNNNN.parquet`` + ``spec.yaml`` +
``stats.json``.

Streaming: each file is read with ``pyarrow.csv.open_csv`` (an incremental reader), one record batch at a
time, so memory is bounded by a batch plus one bool per user and item id (distinct counts).

Validation that loses nothing (shared with the Ali-CCP importer, :mod:`cstwa_dist.data.aliccp`): a bad
line is never dropped silently nor repaired. It is counted by reason in ``stats.json``
(``extra.quarantine`` of its split), written with its file, 1-based line number, reason and raw text to
``<out>/quarantine/<split>.jsonl``, and summarised in the log; ``strict=True`` raises a
:class:`~cstwa_dist.data.validate.DataError` for the first one instead. Every input file balances:
``input_lines`` (excluding the header) = ``written`` + ``quarantined``, asserted before the data set is
renamed into place. Reasons here: ``wrong_column_count`` (found by the CSV parser), ``non_integer_id``,
``id_out_of_range`` (outside ``[0, vocab_size)``), ``bad_label`` (not 0/1), ``purchase_without_click``.
The first problem in column order (fields in spec order, then labels) names the line's reason.

Line numbers come from pyarrow's invalid-row callback (physical line numbers, exact with
``use_threads=False`` and no quoted newlines, which this importer does not accept) and from counting the
valid rows in between. For value problems the ``raw`` text is rebuilt from the parsed cells (quotes
removed); for column-count problems it is the parser's raw text.

Shared helpers (:class:`Quarantine`, :class:`SplitAccumulator`, output directory handling) live here
because the Ali-CCP importer builds on this generic one.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import resource
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cstwa_dist.data.spec import LABELS, SPLITS, DatasetSpec, SplitStats, save_stats
from cstwa_dist.data.synth import ROW_GROUP_ROWS, _SplitWriter, default_rows_per_file
from cstwa_dist.data.validate import DataError

logger = logging.getLogger(__name__)

# Quarantine reasons (the keys of ``extra.quarantine`` in stats.json).
WRONG_COLUMN_COUNT = "wrong_column_count"
BAD_FEATURE_LIST = "bad_feature_list"
NON_INTEGER_ID = "non_integer_id"
ID_OUT_OF_RANGE = "id_out_of_range"
BAD_LABEL = "bad_label"
PURCHASE_WITHOUT_CLICK = "purchase_without_click"
UNKNOWN_COMMON_KEY = "unknown_common_key"
COMMON_FEATURES_QUARANTINED = "common_features_quarantined"
DUPLICATE_COMMON_KEY = "duplicate_common_key"
REPEATED_FIELD = "repeated_field"
BAD_KEY = "bad_key"

CSV_BLOCK_BYTES = 16 << 20  # bytes pyarrow parses per record batch: bounded memory, few Python calls
_INT_PATTERN = r"^-?[0-9]{1,18}$"  # 18 digits always fit in int64


# --- shared pieces ---------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Quarantine:
    """Bad input lines: one JSONL file per split under ``<out>/quarantine``, counts by split/file/reason.

    ``strict=True`` makes :meth:`add` raise a :class:`DataError` instead of writing, so a pipeline that
    must not run on imperfect data stops at the first bad line with its file, line and reason.
    """

    def __init__(self, directory: Path, *, strict: bool) -> None:
        self.directory = directory
        self.strict = strict
        self.by_split: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        self.by_file: dict[str, Counter[str]] = {}
        self.by_split_file: dict[tuple[str, str], Counter[str]] = {}
        self._handles: dict[str, IO[str]] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, split: str, file: str, line: int, reason: str, raw: str, detail: str = "") -> None:
        if self.strict:
            suffix = f" ({detail})" if detail else ""
            raise DataError(f"{file} line {line}: {reason}{suffix}; raw line: {raw[:200]!r}")
        handle = self._handles.get(split)
        if handle is None:
            handle = self._handles[split] = open(self.directory / f"{split}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        record: dict[str, Any] = {"file": file, "line": int(line), "reason": reason, "raw": raw}
        if detail:
            record["detail"] = detail
        handle.write(json.dumps(record) + "\n")
        self.by_split[split][reason] += 1
        self.by_file.setdefault(file, Counter())[reason] += 1
        self.by_split_file.setdefault((split, file), Counter())[reason] += 1

    def file_total(self, file: str) -> int:
        return sum(self.by_file.get(file, Counter()).values())

    def counts(self, split: str, file: str) -> dict[str, int]:
        """Bad lines of one file that went to one split, by reason (sorted, JSON-ready)."""
        return dict(sorted(self.by_split_file.get((split, file), Counter()).items()))

    def close(self) -> None:
        """Closes the files and creates an empty one for every split without bad lines (a fixed layout)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        for split in SPLITS:
            (self.directory / f"{split}.jsonl").touch()

    def log_summary(self, what: str, directory: Path | None = None) -> None:
        """Logs the counts per split; ``directory`` is where the files are now (after the rename)."""
        directory = directory or self.directory
        for split in SPLITS:
            counts = self.by_split[split]
            if counts:
                logger.warning(
                    "%s: %d %s lines quarantined (%s) -> %s",
                    what,
                    sum(counts.values()),
                    split,
                    ", ".join(f"{r}={n}" for r, n in sorted(counts.items())),
                    directory / f"{split}.jsonl",
                )
        if not any(self.by_split.values()):
            logger.info("%s: no line quarantined", what)


class SplitAccumulator:
    """Writes one split's column chunks to Parquet files and gathers the split's Table-1 statistics.

    ``zero_is_unknown`` says whether id 0 stands for 'unknown' (Ali-CCP after frequency filtering); such
    rows are then left out of the distinct user/item counts, which otherwise count every id.

    Rows are buffered into whole row groups (:data:`ROW_GROUP_ROWS`) before they reach the writer, so the
    files depend only on the sequence of rows, not on how the caller's chunks cut it (the Ali-CCP
    importer's parallel and single-process paths write byte-identical files).
    """

    def __init__(
        self,
        directory: Path,
        spec: DatasetSpec,
        rows_per_file: int,
        *,
        zero_is_unknown: bool,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.spec = spec
        self.schema = pa.schema(
            [pa.field(n, pa.int64()) for n in spec.names] + [pa.field(n, pa.int8()) for n in LABELS]
        )
        self.rows_per_file = rows_per_file
        self.zero_is_unknown = zero_is_unknown
        self._writer = _SplitWriter(directory, self.schema, rows_per_file)
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
        self._buffer.append(cols)
        self._buffered += n
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush(final=False)
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


def prepare_output(out: Path) -> Path:
    """A fresh sibling temp directory for ``out``; refuses to overwrite an existing data set."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not an empty directory; importers never overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_output(tmp: Path, out: Path) -> None:
    """Renames the finished data set into place, so a crash never leaves a half data set at ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} appeared while importing; the import is left in {tmp}")
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def count_lines(path: Path, block: int = 16 << 20) -> int:
    """Physical lines of a file (a last line without newline counts), read in blocks: bounded memory."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while data := f.read(block):
            n += data.count(b"\n")
            last = data[-1:]
    return n + (0 if last == b"\n" else 1)


def check_accounting(files: dict[str, dict[str, int]]) -> None:
    """The identity the importers promise: every input line is written or quarantined, per file."""
    for name, acc in files.items():
        if acc["input_lines"] != acc["written"] + acc["quarantined"]:
            raise AssertionError(
                f"{name}: {acc['input_lines']} input lines != {acc['written']} written + "
                f"{acc['quarantined']} quarantined; the importer lost or invented lines (a bug)"
            )


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


def _import_csv_file(
    path: Path,
    split: str,
    spec: DatasetSpec,
    tmp: Path,
    quarantine: Quarantine,
    progress: bool,
) -> tuple[SplitStats, dict[str, int]]:
    """Streams one CSV file into ``tmp/<split>``; returns its stats and its line accounting."""
    input_lines = max(count_lines(path) - 1, 0)  # the header is not a data line
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split(",")
    columns = [*spec.names, *LABELS]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} line 1: header lacks columns {missing}; header is {header}")
    ignored = [c for c in header if c not in columns]
    if ignored:
        logger.warning("%s: columns %s are not in the spec and are not imported", path, ignored)

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
    acc = SplitAccumulator(tmp / split, spec, rows_per_file, zero_is_unknown=False)
    valid_seen = 0
    t0 = last_log = time.perf_counter()
    level = logging.INFO if progress else logging.DEBUG
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
        now = time.perf_counter()
        if now - last_log > 10:
            last_log = now
            done = valid_seen + len(invalid)
            logger.log(
                level, "csv %s: %d/%d lines (%.0f lines/s)", path.name, done, input_lines, done / (now - t0)
            )
    flush(None)
    stats = acc.close()
    dt = time.perf_counter() - t0
    accounting = {
        "input_lines": input_lines,
        "written": stats.rows,
        "quarantined": quarantine.file_total(str(path)),
    }
    logger.log(
        level,
        "csv %s -> %s: %d rows in %.1fs (%.0f lines/s)",
        path,
        split,
        stats.rows,
        dt,
        input_lines / max(dt, 1e-9),
    )
    return stats, accounting


def import_csv(
    train: Path, val: Path, test: Path, spec: Path, out: Path, *, strict: bool = False, progress: bool = True
) -> dict[str, SplitStats]:
    """Imports three preprocessed CSV files (header = spec field names + ``click`` + ``purchase``).

    ``spec`` is a spec.yaml (or a directory holding one) giving each field's side and vocab size; ids
    must already be integers in ``[0, vocab_size)`` (0 is a normal id here). Returns the per-split
    statistics, also written to ``<out>/stats.json``. See the module docstring for validation.
    """
    train, val, test, out = Path(train), Path(val), Path(test), Path(out)
    dataset_spec = DatasetSpec.load(spec)
    sources = {"train": train, "val": val, "test": test}
    for p in sources.values():
        if not p.is_file():
            raise FileNotFoundError(f"CSV file not found: {p}")
    t0 = time.perf_counter()
    tmp = prepare_output(out)
    try:
        quarantine = Quarantine(tmp / "quarantine", strict=strict)
        stats: dict[str, SplitStats] = {}
        files: dict[str, dict[str, int]] = {}
        for split, path in sources.items():
            s, acc = _import_csv_file(path, split, dataset_spec, tmp, quarantine, progress)
            files[str(path)] = acc
            s.extra.update(acc)
            s.extra["source"] = str(path)
            s.extra["quarantine"] = dict(sorted(quarantine.by_split[split].items()))
            stats[split] = s
        quarantine.close()
        check_accounting(files)
        rss = peak_rss_mb()
        for s in stats.values():
            s.extra["peak_rss_mb"] = round(rss, 1)
        dataset_spec.save(tmp / "spec.yaml")
        save_stats(tmp / "stats.json", stats)
        finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quarantine.log_summary(f"import-csv {out}", out / "quarantine")
    logger.info(
        "import-csv -> %s: train/val/test %d/%d/%d rows in %.1fs, peak RSS %.0f MiB",
        out,
        stats["train"].rows,
        stats["val"].rows,
        stats["test"].rows,
        time.perf_counter() - t0,
        rss,
    )
    return stats
