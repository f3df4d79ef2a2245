"""Ali-CCP importer: the raw Tianchi files -> the project's dataset layout, following the AITM protocol.

Input (method.md §6), four files without header in ``raw``:

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,purchase,common_feature_key,feature_count,
  feature_list`` — one impression per line;
* ``common_features_{train,test}.csv``: ``key,feature_count,feature_list`` — features shared by many
  impressions (the user profile of a request), joined to samples by ``common_feature_key``.

A feature list joins ``field\\x02feature_id\\x03value`` entries with ``\\x01``; ``feature_count`` must equal
the number of entries. ``feature_id`` is a global integer id (ids of all fields share one space).

Protocol (AITM, which the paper follows): keep the single-valued fields :data:`DEFAULT_FIELDS` (or
``fields``); the multi-valued ones (a field that appears more than once per sample, e.g. ``109_14``) are
not kept. Sides: 1xx fields are the user (``101`` = user id), 2xx the item (``205`` = item id), ``301``
and the crosses ``508 509 702 853`` the context — a cross mixes a user-side and an item-side field, so it
belongs to neither tower's representation ``r_u`` / ``r_i`` and is treated as part of the impression's
context. Column names are the raw field names (``"101"``, ``"205"``...), so a column traces back to the
raw data. Ids are counted on the *train* split (after the validation split is cut off, so no validation
line shapes the vocabulary); an id seen fewer than ``min_count`` times becomes 0 (unknown), the others
become ``1..V`` in increasing raw-id order (vocab size ``V + 1``). A field missing on a sample is 0.
Validation is a random ``val_fraction`` of the train file; the official test file is the test split.

Passes over ``sample_skeleton_train.csv``: a newline count (cheap; gives every chunk its first line
number), pass 1 counts ids of train lines (storing nothing per sample), pass 2 remaps and writes train and
val. The test file is read once (after pass 2, with the train vocabulary).

Memory: the one thing held is the common-features table of the file being joined, as compact numpy arrays:
sorted keys (fixed-width bytes) and an ``int64 [keys, kept fields present in the file]`` matrix of raw
ids — about ``key length + 8 x fields`` bytes per key, never the multi-valued lists. Plus the per-field id
counts of train (16 bytes per distinct id, merged in sorted arrays) and the kept-id arrays. Files are
read in byte-range chunks of whole lines (``chunk_bytes``), never whole. The peak RSS of the importing
process (and, in parallel, of the busiest Ray worker) is logged and stored in ``stats.json``
(``extra.peak_rss_mb``).

Parallel (``parallel=True``, or auto above :data:`PARALLEL_THRESHOLD_BYTES` of input): the same chunk
function runs as Ray tasks over the byte ranges, the common table is shared once through the object
store, and the driver consumes results in chunk order with a bounded window of tasks in flight. Ray core
tasks over byte ranges rather than ``ray.data.read_text``: a text dataset's rows do not carry their line
numbers, which both the quarantine and the validation split need. Everything that decides the output is a
function of the line (the validation split is a hash of ``(seed, line number)``, counts are merged
exactly, the writer cuts files by row count), so the parallel and the single-process paths write
identical files, whatever the chunk size.

Validation that loses nothing (shared machinery in :mod:`cstwa_dist.data.csv_import`). Reasons, the first
problem found in this order naming a line: ``wrong_column_count``; ``bad_label`` (click/purchase not 0/1);
``purchase_without_click``; ``bad_feature_list`` (an entry not ``field\\x02id\\x03value``, or
``feature_count`` disagreeing with the entries); ``non_integer_id`` (a kept field's id is not a
non-negative decimal integer; ids of fields that are not kept are checked for syntax only);
``repeated_field`` (a kept field more than once on a line, or both on the sample and in its common
features); ``unknown_common_key``; ``common_features_quarantined`` (the key's common line was itself
quarantined). Common-feature lines: ``wrong_column_count``, ``bad_key`` (empty key),
``bad_feature_list``, ``non_integer_id``, ``repeated_field``, ``duplicate_common_key`` (a key seen on an
earlier line, which is the one kept). Bad sample lines go to the quarantine of the split their line number
is assigned to; bad common lines to that of the file's split (train or test). Per file,
``input_lines = written + quarantined`` (for a common file, ``written`` = keys kept), asserted at the end
and recorded under ``extra.input_files``; each split also records its own share (``input_lines``,
``written``, ``quarantined``, ``quarantine``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstwa_dist.data.csv_import import (
    BAD_FEATURE_LIST,
    BAD_KEY,
    BAD_LABEL,
    COMMON_FEATURES_QUARANTINED,
    DUPLICATE_COMMON_KEY,
    NON_INTEGER_ID,
    PURCHASE_WITHOUT_CLICK,
    REPEATED_FIELD,
    UNKNOWN_COMMON_KEY,
    WRONG_COLUMN_COUNT,
    Quarantine,
    SplitAccumulator,
    check_accounting,
    finish_output,
    peak_rss_mb,
    prepare_output,
)
from cstwa_dist.data.spec import SPLITS, DatasetSpec, FieldSpec, SplitStats, save_stats
from cstwa_dist.data.synth import default_rows_per_file

logger = logging.getLogger(__name__)

USER_ID_FIELD = "101"
ITEM_ID_FIELD = "205"
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
ITEM_FIELDS = ("205", "206", "207", "210", "216")
CONTEXT_FIELDS = ("301", "508", "509", "702", "853")
DEFAULT_FIELDS: tuple[str, ...] = USER_FIELDS + ITEM_FIELDS + CONTEXT_FIELDS
MULTI_VALUED_FIELDS = ("109_14", "110_14", "127_14", "150_14")
FILES = {
    "skeleton_train": "sample_skeleton_train.csv",
    "common_train": "common_features_train.csv",
    "skeleton_test": "sample_skeleton_test.csv",
    "common_test": "common_features_test.csv",
}

DEFAULT_CHUNK_BYTES = 8 << 20  # ~35k skeleton lines: worth a task; parse lists of a chunk stay ~50 MB
PARALLEL_THRESHOLD_BYTES = 512 << 20  # below this a Ray runtime (2-3 s, ~2.5 GB) costs more than it saves
PROGRESS_EVERY_S = 10.0
_COUNT_MERGE_ENTRIES = 1 << 22  # pending (id, count) pairs per field before they are merged
_SKELETON_COLUMNS = 6
_COMMON_COLUMNS = 3
_LABEL_VALUES = frozenset(("0", "1"))
_ENTRY = "[^\x01\x02\x03]+\x02[^\x01\x02\x03]+\x03[^\x01\x02\x03]+"
_FEATURE_LIST = re.compile(f"{_ENTRY}(?:\x01{_ENTRY})*")
_MAX_ID_DIGITS = 18  # always fits int64
_MISSING = -1  # raw ids are non-negative, so -1 marks 'field absent' until the remap turns it into 0


def field_side(name: str) -> str:
    """Side of an Ali-CCP field: 1xx user, 2xx item, everything else (301, crosses 5xx-8xx) context."""
    head = name.split("_", 1)[0]
    if head.startswith("1"):
        return "user"
    if head.startswith("2"):
        return "item"
    return "context"


def _resolve_fields(fields: Iterable[str] | None) -> tuple[str, ...]:
    out = tuple(str(f) for f in (DEFAULT_FIELDS if fields is None else fields))
    if len(set(out)) != len(out):
        raise ValueError(f"fields has duplicates: {list(out)}")
    multi = [f for f in out if f in MULTI_VALUED_FIELDS]
    if multi:
        raise ValueError(f"fields {multi} are multi-valued; the layout holds one id per field and row")
    for need in (USER_ID_FIELD, ITEM_ID_FIELD):
        if need not in out:
            raise ValueError(f"fields must include {need!r} (user id 101, item id 205); got {list(out)}")
    if not any(field_side(f) == "context" for f in out):
        raise ValueError(f"fields need at least one context field (301 or a cross); got {list(out)}")
    return out


# --- chunks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
    """Whole lines ``[start, end)`` (bytes) of a file; ``first_line`` is the 1-based number of the first."""

    path: str
    start: int
    end: int
    first_line: int = 0


def _plan_chunks(path: Path, chunk_bytes: int) -> list[_Chunk]:
    """Byte ranges of about ``chunk_bytes``, each cut just after a newline (one seek + readline each)."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target)
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            if pos > bounds[-1]:
                bounds.append(pos)
            target = max(pos, target) + chunk_bytes
    bounds.append(size)
    return [_Chunk(str(path), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _read(chunk: _Chunk) -> bytes:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        return f.read(chunk.end - chunk.start)


def _lines_in(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _split_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


# --- parsing -----------------------------------------------------------------------------------------
def _kept_pattern(fields: tuple[str, ...]) -> re.Pattern[str]:
    """``(field, id)`` of kept fields; ``\\x02`` follows the name, so ``127`` never matches ``127_14``."""
    names = "|".join(re.escape(f) for f in sorted(fields, key=len, reverse=True))
    return re.compile(f"(?:^|\x01)({names})\x02([^\x03]*)")


def _check_feature_list(count: str, flist: str) -> str | None:
    """None if ``flist`` is well formed and has ``count`` entries, else what is wrong."""
    if not (count.isascii() and count.isdigit()):
        return f"feature_count {count!r} is not an integer"
    n = int(count)
    if not flist:
        return None if n == 0 else f"feature_count {n} but no entries"
    if _FEATURE_LIST.fullmatch(flist) is None:
        return "an entry is not field\\x02id\\x03value"
    entries = flist.count("\x01") + 1
    return None if entries == n else f"feature_count {n} but {entries} entries"


def _kept_ids(
    flist: str, pattern: re.Pattern[str], index: dict[str, int], row: list[int]
) -> tuple[str, str] | None:
    """Fills ``row`` with the kept fields' ids; returns (reason, detail) on a bad id or a repeat."""
    for name, fid in pattern.findall(flist):
        j = index[name]
        if not (fid.isascii() and fid.isdigit() and len(fid) <= _MAX_ID_DIGITS):
            return NON_INTEGER_ID, f"field {name}: id {fid!r}"
        if row[j] != _MISSING:
            return REPEATED_FIELD, f"field {name} appears more than once"
        row[j] = int(fid)
    return None


@dataclass
class _Bad:
    line: int
    reason: str
    raw: str
    detail: str


@dataclass
class _Samples:
    """Good sample lines of a chunk (after the per-line checks, before the join)."""

    line: np.ndarray  # int64 [n] 1-based line numbers
    click: np.ndarray  # int8 [n]
    purchase: np.ndarray  # int8 [n]
    keys: np.ndarray  # bytes [n]
    ids: np.ndarray  # int64 [n, F] raw ids, _MISSING where absent


def _parse_samples(lines: list[str], first_line: int, fields: tuple[str, ...]) -> tuple[_Samples, list[_Bad]]:
    pattern = _kept_pattern(fields)
    index = {f: j for j, f in enumerate(fields)}
    width = len(fields)
    good_lines: list[int] = []
    clicks: list[int] = []
    purchases: list[int] = []
    keys: list[bytes] = []
    flat: list[int] = []
    bad: list[_Bad] = []
    for k, text in enumerate(lines):
        no = first_line + k
        parts = text.split(",")
        if len(parts) != _SKELETON_COLUMNS:
            bad.append(
                _Bad(no, WRONG_COLUMN_COUNT, text, f"{len(parts)} columns, expected {_SKELETON_COLUMNS}")
            )
            continue
        _, click, purchase, key, count, flist = parts
        if click not in _LABEL_VALUES or purchase not in _LABEL_VALUES:
            bad.append(_Bad(no, BAD_LABEL, text, f"click={click!r} purchase={purchase!r}"))
            continue
        if click == "0" and purchase == "1":
            bad.append(_Bad(no, PURCHASE_WITHOUT_CLICK, text, "click=0 with purchase=1"))
            continue
        problem = _check_feature_list(count, flist)
        if problem is not None:
            bad.append(_Bad(no, BAD_FEATURE_LIST, text, problem))
            continue
        row = [_MISSING] * width
        found = _kept_ids(flist, pattern, index, row)
        if found is not None:
            bad.append(_Bad(no, found[0], text, found[1]))
            continue
        good_lines.append(no)
        clicks.append(click == "1")
        purchases.append(purchase == "1")
        keys.append(key.encode("utf-8", errors="surrogateescape"))
        flat.extend(row)
    n = len(good_lines)
    samples = _Samples(
        line=np.asarray(good_lines, dtype=np.int64),
        click=np.asarray(clicks, dtype=np.int8),
        purchase=np.asarray(purchases, dtype=np.int8),
        keys=np.asarray(keys, dtype=np.bytes_) if n else np.zeros(0, dtype="S1"),
        ids=np.asarray(flat, dtype=np.int64).reshape(n, width),
    )
    return samples, bad


@dataclass
class CommonTable:
    """The common-features table held in memory: sorted keys and the kept fields' raw ids per key.

    ``columns[c]`` is the index (in the import's field tuple) of ``values[:, c]``; only kept fields that
    occur in the common file get a column. ``bad_keys`` (sorted) are keys of quarantined common lines, so
    a sample pointing at one is reported as such rather than as an unknown key.
    """

    keys: np.ndarray  # bytes [K], sorted, unique
    values: np.ndarray  # int64 [K, C]
    columns: tuple[int, ...]
    bad_keys: np.ndarray  # bytes [B], sorted

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes + self.bad_keys.nbytes)


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each key in a sorted bytes array (exact match, any key width)."""
    if sorted_keys.size == 0 or keys.size == 0:
        return np.zeros(keys.size, dtype=np.int64), np.zeros(keys.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return pos, sorted_keys[pos] == keys


def _join(
    samples: _Samples, table: CommonTable, lines: list[str], first_line: int, fields: tuple[str, ...]
) -> tuple[np.ndarray, list[_Bad]]:
    """Fills the samples' ids from their common features in place; returns the mask of good rows."""
    pos, found = _lookup(table.keys, samples.keys)
    _, quarantined_key = _lookup(table.bad_keys, samples.keys)
    conflict = np.zeros(len(found), dtype=bool)
    conflict_field = np.full(len(found), -1, dtype=np.int64)
    rows = (
        table.values[pos] if table.values.shape[0] else np.zeros((len(found), len(table.columns)), np.int64)
    )
    for c, j in enumerate(table.columns):
        own, common = samples.ids[:, j], rows[:, c]
        both = found & (own != _MISSING) & (common != _MISSING)
        conflict_field[both & ~conflict] = j
        conflict |= both
        samples.ids[:, j] = np.where(found & (own == _MISSING), common, own)
    bad: list[_Bad] = []
    for k in np.flatnonzero(~found | conflict):
        no = int(samples.line[k])
        raw = lines[no - first_line]
        if not found[k]:
            key = samples.keys[k].decode("utf-8", errors="surrogateescape")
            if quarantined_key[k]:
                bad.append(
                    _Bad(no, COMMON_FEATURES_QUARANTINED, raw, f"common line of key {key!r} is quarantined")
                )
            else:
                bad.append(_Bad(no, UNKNOWN_COMMON_KEY, raw, f"key {key!r} not in the common features"))
        else:
            bad.append(
                _Bad(
                    no,
                    REPEATED_FIELD,
                    raw,
                    f"field {fields[conflict_field[k]]} on the sample and in its common features",
                )
            )
    return found & ~conflict, bad


def val_mask(lines: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True for lines of the train file assigned to validation: a splitmix64 hash of (seed, line number).

    A hash rather than a sequential RNG, so any chunk can decide its lines alone and every execution
    order gives the same split.
    """
    with np.errstate(over="ignore"):
        x = lines.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1342543DE82EF95)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < val_fraction


def remap(raw: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Raw ids -> dense ids: position in the sorted ``kept`` array + 1; anything else (rare, absent) -> 0."""
    if kept.size == 0:
        return np.zeros(raw.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(kept, raw), kept.size - 1)
    return np.where((kept[pos] == raw) & (raw != _MISSING), pos + 1, 0).astype(np.int64)


# --- chunk tasks (run in-process or as Ray tasks; pure functions of their arguments) ------------------
@dataclass(frozen=True)
class _Context:
    fields: tuple[str, ...]
    seed: int
    val_fraction: float  # 0 for the test file: every line is a test line
    table: CommonTable | None = None
    vocab: tuple[np.ndarray, ...] | None = None


def _line_splits(lines: np.ndarray, ctx: _Context) -> np.ndarray:
    """Per line: 0 = train/test (the file's own split), 1 = val."""
    if ctx.val_fraction <= 0:
        return np.zeros(lines.shape, dtype=np.int8)
    return val_mask(lines, ctx.seed, ctx.val_fraction).astype(np.int8)


def _task_lines(chunk: _Chunk, ctx: _Context) -> dict[str, Any]:
    return {"lines": _lines_in(_read(chunk)), "rss": peak_rss_mb()}


def _task_common(chunk: _Chunk, ctx: _Context) -> dict[str, Any]:
    """Parses common-feature lines: kept ids per key, bad lines, and each good line's byte offset."""
    data = _read(chunk)
    pattern = _kept_pattern(ctx.fields)
    index = {f: j for j, f in enumerate(ctx.fields)}
    width = len(ctx.fields)
    keys: list[bytes] = []
    flat: list[int] = []
    good_lines: list[int] = []
    offsets: list[int] = []
    bad: list[_Bad] = []
    bad_keys: list[bytes] = []
    offset = chunk.start
    raw_lines = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        raw_lines.pop()
    for k, raw in enumerate(raw_lines):
        no = chunk.first_line + k
        start = offset
        offset += len(raw) + 1
        text = raw.decode("utf-8", errors="surrogateescape")
        if text.endswith("\r"):
            text = text[:-1]
        parts = text.split(",")
        key = parts[0]
        problem: tuple[str, str] | None = None
        if len(parts) != _COMMON_COLUMNS:
            problem = WRONG_COLUMN_COUNT, f"{len(parts)} columns, expected {_COMMON_COLUMNS}"
        elif not key:
            problem = BAD_KEY, "empty key"
        else:
            detail = _check_feature_list(parts[1], parts[2])
            if detail is not None:
                problem = BAD_FEATURE_LIST, detail
        row = [_MISSING] * width
        if problem is None:
            problem = _kept_ids(parts[2], pattern, index, row)
        if problem is not None:
            bad.append(_Bad(no, problem[0], text, problem[1]))
            if key:
                bad_keys.append(key.encode("utf-8", errors="surrogateescape"))
            continue
        keys.append(key.encode("utf-8", errors="surrogateescape"))
        flat.extend(row)
        good_lines.append(no)
        offsets.append(start)
    n = len(keys)
    return {
        "keys": np.asarray(keys, dtype=np.bytes_) if n else np.zeros(0, dtype="S1"),
        "values": np.asarray(flat, dtype=np.int64).reshape(n, width),
        "lines": np.asarray(good_lines, dtype=np.int64),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "bad": bad,
        "bad_keys": bad_keys,
        "input_lines": len(raw_lines),
        "rss": peak_rss_mb(),
    }


def _good_samples(chunk: _Chunk, ctx: _Context) -> tuple[_Samples, np.ndarray, list[_Bad], int]:
    """Parse + join of a skeleton chunk: good samples, the mask of good rows, bad lines (in line order)."""
    lines = _split_lines(_read(chunk))
    samples, bad = _parse_samples(lines, chunk.first_line, ctx.fields)
    assert ctx.table is not None
    good, join_bad = _join(samples, ctx.table, lines, chunk.first_line, ctx.fields)
    bad = sorted(bad + join_bad, key=lambda b: b.line)
    return samples, good, bad, len(lines)


def _task_count(chunk: _Chunk, ctx: _Context) -> dict[str, Any]:
    """Pass 1: (unique raw ids, counts) per kept field over the chunk's good train lines."""
    samples, good, bad, n_lines = _good_samples(chunk, ctx)
    split = _line_splits(samples.line, ctx)
    train = good & (split == 0)
    counts = []
    for j in range(len(ctx.fields)):
        col = samples.ids[train, j]
        counts.append(np.unique(col[col != _MISSING], return_counts=True))
    return {
        "counts": counts,
        "rows": [int(train.sum()), int((good & (split == 1)).sum())],
        "first_bad": bad[0] if bad else None,
        "input_lines": n_lines,
        "rss": peak_rss_mb(),
    }


def _task_write(chunk: _Chunk, ctx: _Context) -> dict[str, Any]:
    """Pass 2: remapped columns of the chunk's good lines per split (0 = own split, 1 = val) + bad lines."""
    samples, good, bad, n_lines = _good_samples(chunk, ctx)
    assert ctx.vocab is not None
    split = _line_splits(samples.line, ctx)
    out = []
    for s in (0, 1):
        rows = good & (split == s)
        cols = {f: remap(samples.ids[rows, j], ctx.vocab[j]) for j, f in enumerate(ctx.fields)}
        cols["click"] = samples.click[rows]
        cols["purchase"] = samples.purchase[rows]
        out.append(cols)
    bad_split = _line_splits(np.asarray([b.line for b in bad], dtype=np.int64), ctx)
    return {
        "cols": out,
        "bad": list(zip(bad, bad_split.tolist(), strict=True)),
        "input_lines": n_lines,
        "rss": peak_rss_mb(),
    }


_TASKS = {"lines": _task_lines, "common": _task_common, "count": _task_count, "write": _task_write}


def _run_chunk(mode: str, chunk: _Chunk, ctx: _Context) -> dict[str, Any]:
    return _TASKS[mode](chunk, ctx)


class _Executor:
    """Runs chunk tasks in order: in this process, or as Ray tasks with a bounded window in flight.

    Results are always consumed in chunk order, so whatever runs them, the driver sees the same stream.
    """

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.worker_rss = 0.0
        if parallel:
            import ray

            self._ray = ray
            self._remote = ray.remote(num_cpus=1)(_run_chunk)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.window = max(2, 2 * cpus)

    def map(self, mode: str, chunks: list[_Chunk], ctx: _Context) -> Iterator[dict[str, Any]]:
        if not self.parallel:
            for c in chunks:
                yield _run_chunk(mode, c, ctx)
            return
        ray = self._ray
        ctx_ref = ray.put(ctx)  # the common table crosses to the workers once, zero-copy for arrays
        pending: deque[Any] = deque()
        try:
            for c in chunks:
                pending.append(self._remote.remote(mode, c, ctx_ref))
                if len(pending) >= self.window:
                    result = ray.get(pending.popleft())
                    self.worker_rss = max(self.worker_rss, result["rss"])
                    yield result
            while pending:
                result = ray.get(pending.popleft())
                self.worker_rss = max(self.worker_rss, result["rss"])
                yield result
        finally:
            for ref in pending:  # strict mode stopped early: do not leave work running
                ray.cancel(ref)


class _Progress:
    def __init__(self, what: str, total: int, enabled: bool) -> None:
        self.what, self.total = what, total
        self.level = logging.INFO if enabled else logging.DEBUG
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def step(self, lines: int) -> None:
        self.done += lines
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            logger.log(
                self.level,
                "%s: %d/%d lines (%.0f lines/s)",
                self.what,
                self.done,
                self.total,
                self.done / (now - self.t0),
            )

    def finish(self) -> float:
        dt = time.perf_counter() - self.t0
        logger.log(
            self.level,
            "%s: %d lines in %.1fs (%.0f lines/s)",
            self.what,
            self.done,
            dt,
            self.done / max(dt, 1e-9),
        )
        return dt


# --- driver ------------------------------------------------------------------------------------------
def _number_chunks(ex: _Executor, path: Path, chunk_bytes: int) -> tuple[list[_Chunk], int]:
    """Chunks with their first line numbers (a newline count per chunk), and the file's line count."""
    chunks = _plan_chunks(path, chunk_bytes)
    numbered, line = [], 1
    for c, res in zip(chunks, ex.map("lines", chunks, _Context((), 0, 0.0)), strict=True):
        numbered.append(_Chunk(c.path, c.start, c.end, line))
        line += res["lines"]
    return numbered, line - 1


def _first_duplicates(keys: np.ndarray, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, duplicate mask over the sorted order): a key repeated after its first line is a duplicate."""
    order = np.argsort(keys, kind="stable")  # ``lines`` ascend, so the first occurrence sorts first
    sk = keys[order]
    dup = np.zeros(len(sk), dtype=bool)
    if len(sk) > 1:
        dup[1:] = sk[1:] == sk[:-1]
    return order, dup


def _build_common(
    ex: _Executor,
    path: Path,
    split: str,
    fields: tuple[str, ...],
    chunk_bytes: int,
    quarantine: Quarantine,
    progress: bool,
) -> tuple[CommonTable, dict[str, int]]:
    chunks, n_lines = _number_chunks(ex, path, chunk_bytes)
    prog = _Progress(f"aliccp {path.name}", n_lines, progress)
    parts: dict[str, list[Any]] = {"keys": [], "values": [], "lines": [], "offsets": []}
    bad_keys: list[bytes] = []
    seen = 0
    strict_first: _Bad | None = None
    for res in ex.map("common", chunks, _Context(fields, 0, 0.0)):
        for name, lst in parts.items():
            lst.append(res[name])
        bad_keys += res["bad_keys"]
        seen += res["input_lines"]
        if res["bad"] and quarantine.strict:
            strict_first = res["bad"][0]
            break
        for b in res["bad"]:
            quarantine.add(split, str(path), b.line, b.reason, b.raw, b.detail)
        prog.step(res["input_lines"])
    if strict_first is None:
        prog.finish()
    keys = np.concatenate(parts["keys"]) if parts["keys"] else np.zeros(0, dtype="S1")
    values = np.concatenate(parts["values"]) if parts["values"] else np.zeros((0, len(fields)), np.int64)
    lines = np.concatenate(parts["lines"]) if parts["lines"] else np.zeros(0, np.int64)
    offsets = np.concatenate(parts["offsets"]) if parts["offsets"] else np.zeros(0, np.int64)
    del parts
    order, dup = _first_duplicates(keys, lines)
    dup_at = order[dup]
    dup_at = dup_at[np.argsort(lines[dup_at])]
    if quarantine.strict and (strict_first is not None or dup_at.size):
        if dup_at.size and (strict_first is None or lines[dup_at[0]] < strict_first.line):
            k = int(dup_at[0])
            strict_first = _Bad(int(lines[k]), DUPLICATE_COMMON_KEY, _raw_line(path, int(offsets[k])), "")
        assert strict_first is not None
        quarantine.add(
            split, str(path), strict_first.line, strict_first.reason, strict_first.raw, strict_first.detail
        )
    for k in dup_at.tolist():
        key = keys[k].decode("utf-8", errors="surrogateescape")
        quarantine.add(
            split,
            str(path),
            int(lines[k]),
            DUPLICATE_COMMON_KEY,
            _raw_line(path, int(offsets[k])),
            f"key {key!r}",
        )
    keep = order[~dup]  # sorted by key, first occurrence of each
    present = [j for j in range(len(fields)) if bool(np.any(values[keep, j] != _MISSING))]
    table = CommonTable(
        keys=keys[keep],
        values=np.ascontiguousarray(values[keep][:, present]),
        columns=tuple(present),
        bad_keys=np.unique(np.asarray(bad_keys, dtype=np.bytes_)) if bad_keys else np.zeros(0, dtype="S1"),
    )
    accounting = {
        "input_lines": n_lines,
        "written": int(table.keys.size),
        "quarantined": quarantine.file_total(str(path)),
    }
    logger.log(
        logging.INFO if progress else logging.DEBUG,
        "aliccp %s: %d keys, fields %s, table %.1f MiB",
        path.name,
        table.keys.size,
        [fields[j] for j in present],
        table.nbytes / 2**20,
    )
    return table, accounting


def _raw_line(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline().rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")


def _merge_counts(pending: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p[0] for p in pending])
    counts = np.concatenate([p[1] for p in pending])
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


def _count_pass(
    ex: _Executor,
    chunks: list[_Chunk],
    n_lines: int,
    ctx: _Context,
    path: Path,
    quarantine: Quarantine,
    progress: bool,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """Pass 1: exact id counts per field on the train lines, and the rows train/val will get."""
    merged: list[tuple[np.ndarray, np.ndarray]] = [
        (np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in ctx.fields
    ]
    pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in ctx.fields]
    sizes = [0] * len(ctx.fields)
    rows = [0, 0]
    prog = _Progress(f"aliccp {path.name} pass 1 (count ids)", n_lines, progress)
    for res in ex.map("count", chunks, ctx):
        if res["first_bad"] is not None and quarantine.strict:
            b = res["first_bad"]
            quarantine.add("train", str(path), b.line, b.reason, b.raw, b.detail)  # raises
        rows[0] += res["rows"][0]
        rows[1] += res["rows"][1]
        for j, uc in enumerate(res["counts"]):
            pending[j].append(uc)
            sizes[j] += uc[0].size
            if sizes[j] >= _COUNT_MERGE_ENTRIES:
                merged[j] = _merge_counts([merged[j], *pending[j]])
                pending[j], sizes[j] = [], 0
        prog.step(res["input_lines"])
    prog.finish()
    for j in range(len(ctx.fields)):
        if pending[j]:
            merged[j] = _merge_counts([merged[j], *pending[j]])
    return merged, rows


def _write_pass(
    ex: _Executor,
    chunks: list[_Chunk],
    n_lines: int,
    ctx: _Context,
    path: Path,
    splits: tuple[str, str],
    writers: dict[str, SplitAccumulator],
    quarantine: Quarantine,
    progress: bool,
    what: str,
) -> tuple[dict[str, int], dict[str, int]]:
    """Writes a skeleton file's good lines; returns lines seen per split and the file's accounting."""
    per_split = dict.fromkeys(splits, 0)
    written = 0
    prog = _Progress(f"aliccp {path.name} {what}", n_lines, progress)
    for res in ex.map("write", chunks, ctx):
        for b, s in res["bad"]:
            quarantine.add(splits[s], str(path), b.line, b.reason, b.raw, b.detail)
            per_split[splits[s]] += 1
        for s, cols in enumerate(res["cols"]):
            if s < len(splits) and len(cols["click"]):
                writers[splits[s]].write(cols)
                per_split[splits[s]] += len(cols["click"])
                written += len(cols["click"])
        prog.step(res["input_lines"])
    prog.finish()
    return per_split, {
        "input_lines": n_lines,
        "written": written,
        "quarantined": quarantine.file_total(str(path)),
    }


def import_aliccp(
    raw: Path,
    out: Path,
    *,
    min_count: int = 10,
    fields: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    parallel: bool | None = None,
    progress: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, SplitStats]:
    """Imports raw Ali-CCP from ``raw`` into ``out`` (module docstring: protocol, memory, validation).

    ``parallel=None`` runs Ray tasks when the four files together exceed
    :data:`PARALLEL_THRESHOLD_BYTES`; ``chunk_bytes`` only changes how work is cut, never the output.
    Returns the per-split statistics (also in ``<out>/stats.json``). Raises ``FileExistsError`` if
    ``out`` is a non-empty directory and, with ``strict``, a ``DataError`` at the first bad line.
    """
    raw, out = Path(raw), Path(out)
    kept = _resolve_fields(fields)
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    paths = {role: raw / name for role, name in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Ali-CCP raw files not found: {missing}; download and unpack the Tianchi data set (id 408)"
        )
    total = sum(p.stat().st_size for p in paths.values())
    if parallel is None:
        parallel = total > PARALLEL_THRESHOLD_BYTES
    logger.info(
        "import-aliccp %s -> %s: %.1f MiB raw, %s, fields %s, min_count=%d, val_fraction=%g, seed=%d",
        raw,
        out,
        total / 2**20,
        "parallel (Ray tasks)" if parallel else "single process",
        list(kept),
        min_count,
        val_fraction,
        seed,
    )
    t0 = time.perf_counter()
    tmp = prepare_output(out)
    try:
        if parallel:
            from cstwa_dist.data.reader import RayRuntime

            runtime: contextlib.AbstractContextManager[Any] = RayRuntime()
        else:
            runtime = contextlib.nullcontext()
        with runtime:
            ex = _Executor(parallel)
            stats, quarantine = _import(
                ex,
                paths,
                tmp,
                kept,
                int(min_count),
                float(val_fraction),
                int(seed),
                strict,
                progress,
                int(chunk_bytes),
            )
        dt = time.perf_counter() - t0
        rss = peak_rss_mb()
        lines = sum(s.extra["input_lines"] for s in stats.values())
        for s in stats.values():
            s.extra["peak_rss_mb"] = round(rss, 1)
            s.extra["peak_rss_mb_worker"] = round(ex.worker_rss, 1) if parallel else None
            s.extra["parallel"] = bool(parallel)
            s.extra["seconds"] = round(dt, 2)
            s.extra["lines_per_s"] = round(lines / max(dt, 1e-9), 1)
        save_stats(tmp / "stats.json", stats)
        finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quarantine.log_summary(f"import-aliccp {out}", out / "quarantine")
    logger.info(
        "import-aliccp -> %s: train/val/test %d/%d/%d rows, %d sample lines in %.1fs (%.0f lines/s), "
        "peak RSS %.0f MiB%s",
        out,
        stats["train"].rows,
        stats["val"].rows,
        stats["test"].rows,
        lines,
        dt,
        lines / max(dt, 1e-9),
        rss,
        f" (busiest Ray worker {ex.worker_rss:.0f} MiB)" if parallel else "",
    )
    return stats


def _import(
    ex: _Executor,
    paths: dict[str, Path],
    tmp: Path,
    fields: tuple[str, ...],
    min_count: int,
    val_fraction: float,
    seed: int,
    strict: bool,
    progress: bool,
    chunk_bytes: int,
) -> tuple[dict[str, SplitStats], Quarantine]:
    quarantine = Quarantine(tmp / "quarantine", strict=strict)
    files: dict[str, dict[str, int]] = {}

    # train file: common table, pass 1 (vocab), pass 2 (train + val)
    skel = paths["skeleton_train"]
    table, files[paths["common_train"].name] = _build_common(
        ex, paths["common_train"], "train", fields, chunk_bytes, quarantine, progress
    )
    chunks, n_train_lines = _number_chunks(ex, skel, chunk_bytes)
    ctx = _Context(fields, seed, val_fraction, table=table)
    counts, rows = _count_pass(ex, chunks, n_train_lines, ctx, skel, quarantine, progress)
    vocab = tuple(ids[c >= min_count] for ids, c in counts)
    spec = DatasetSpec(
        fields=tuple(
            FieldSpec(name=f, side=field_side(f), vocab_size=int(v.size) + 1)
            for f, v in zip(fields, vocab, strict=True)
        ),
        user_id=USER_ID_FIELD,
        item_id=ITEM_ID_FIELD,
    )
    vocab_info = {
        f: {"vocab_size": int(v.size) + 1, "raw_distinct": int(ids.size), "raw_kept": int(v.size)}
        for f, v, (ids, _) in zip(fields, vocab, counts, strict=True)
    }
    del counts
    logger.log(
        logging.INFO if progress else logging.DEBUG,
        "aliccp vocab (min_count=%d): %s",
        min_count,
        ", ".join(f"{f}={d['vocab_size']}" for f, d in vocab_info.items()),
    )
    writers = {
        s: SplitAccumulator(tmp / s, spec, default_rows_per_file(max(n, 1)), zero_is_unknown=True)
        for s, n in zip(("train", "val"), rows, strict=True)
    }
    ctx = _Context(fields, seed, val_fraction, table=table, vocab=vocab)
    share, files[skel.name] = _write_pass(
        ex,
        chunks,
        n_train_lines,
        ctx,
        skel,
        ("train", "val"),
        writers,
        quarantine,
        progress,
        "pass 2 (write)",
    )
    del table, ctx
    stats = {s: writers[s].close() for s in ("train", "val")}

    # test file: its own common table, one pass with the train vocabulary
    skel_t = paths["skeleton_test"]
    table, files[paths["common_test"].name] = _build_common(
        ex, paths["common_test"], "test", fields, chunk_bytes, quarantine, progress
    )
    chunks, n_test_lines = _number_chunks(ex, skel_t, chunk_bytes)
    writers["test"] = SplitAccumulator(
        tmp / "test", spec, default_rows_per_file(max(n_test_lines, 1)), zero_is_unknown=True
    )
    ctx = _Context(fields, seed, 0.0, table=table, vocab=vocab)
    share_t, files[skel_t.name] = _write_pass(
        ex, chunks, n_test_lines, ctx, skel_t, ("test", "test"), writers, quarantine, progress, "(write test)"
    )
    del table, ctx
    stats["test"] = writers["test"].close()
    share.update(share_t)
    quarantine.close()

    check_accounting(files)
    sources = {
        "train": [skel.name, paths["common_train"].name],
        "val": [skel.name],
        "test": [skel_t.name, paths["common_test"].name],
    }
    for split in SPLITS:
        s = stats[split]
        skel_name = sources[split][0]
        samples_bad = quarantine.counts(
            split, str(paths["skeleton_test" if split == "test" else "skeleton_train"])
        )
        s.extra.update(
            {
                # this split's share of the skeleton file's lines (val: lines hashed to val)
                "input_lines": share[split],
                "written": s.rows,
                "quarantined": sum(samples_bad.values()),
                "quarantine": samples_bad,
                "input_files": {name: files[name] for name in sources[split]},
                "source": skel_name,
            }
        )
        if split != "val":
            common = paths["common_test" if split == "test" else "common_train"]
            s.extra["quarantine_common_features"] = quarantine.counts(split, str(common))
        if s.extra["input_lines"] != s.rows + s.extra["quarantined"]:
            raise AssertionError(f"{split}: {s.extra['input_lines']} lines != written + quarantined (a bug)")
        if split == "train":
            s.extra.update(
                {"vocab": vocab_info, "min_count": min_count, "val_fraction": val_fraction, "seed": seed}
            )
    spec.save(tmp / "spec.yaml")
    return stats, quarantine


__all__ = [
    "CONTEXT_FIELDS",
    "DEFAULT_FIELDS",
    "ITEM_FIELDS",
    "MULTI_VALUED_FIELDS",
    "USER_FIELDS",
    "CommonTable",
    "field_side",
    "import_aliccp",
    "remap",
    "val_mask",
]
