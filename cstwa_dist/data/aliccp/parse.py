"""Parsing of raw Ali-CCP lines: per-line checks and the kept fields' raw ids, before any join.

Formats (``docs/method.md §6``), no header: ``sample_skeleton_*.csv`` lines are ``sample_id,click,purchase,
common_feature_key,feature_count,feature_list``; ``common_features_*.csv`` lines are
``key,feature_count,feature_list``. A feature list joins ``field\\x02feature_id\\x03value`` entries with
``\\x01``; ``feature_count`` must equal the number of entries; ``feature_id`` is a global integer id.

Everything here is a pure function of the lines and the kept fields, so a chunk can be parsed by any
process in any order. The first problem found names a line (the order is in the package docstring).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from cstwa_dist.data.aliccp.chunks import strip_bom
from cstwa_dist.data.aliccp.fields import MISSING
from cstwa_dist.data.quarantine import (
    BAD_FEATURE_LIST,
    BAD_KEY,
    BAD_LABEL,
    NON_INTEGER_ID,
    PURCHASE_WITHOUT_CLICK,
    REPEATED_FIELD,
    TRUNCATED_LINE,
    WRONG_COLUMN_COUNT,
)

SKELETON_COLUMNS = 6
COMMON_COLUMNS = 3
_LABEL_VALUES = frozenset(("0", "1"))
_ENTRY = "[^\x01\x02\x03]+\x02[^\x01\x02\x03]+\x03[^\x01\x02\x03]+"
_FEATURE_LIST = re.compile(f"{_ENTRY}(?:\x01{_ENTRY})*")
_MAX_ID_DIGITS = 18  # always fits int64


@dataclass
class Bad:
    """A line to quarantine: its 1-based number, reason, raw text and what exactly is wrong."""

    line: int
    reason: str
    raw: str
    detail: str


@dataclass
class Samples:
    """Good sample lines of a chunk (after the per-line checks, before the join)."""

    line: np.ndarray  # int64 [n] 1-based line numbers
    click: np.ndarray  # int8 [n]
    purchase: np.ndarray  # int8 [n]
    keys: np.ndarray  # bytes [n]
    ids: np.ndarray  # int64 [n, F] raw ids, MISSING where absent


def bytes_array(values: list[bytes]) -> np.ndarray:
    """Fixed-width bytes array of ``values`` (an empty list gives an empty ``S1`` array, not ``S0``)."""
    return np.asarray(values, dtype=np.bytes_) if values else np.zeros(0, dtype="S1")


def mark_truncated(bad: list[Bad], last_line: int, data: bytes) -> list[Bad]:
    """``bad`` (in line order) with the last line re-labelled :data:`TRUNCATED_LINE` when ``data`` (the
    file's last chunk) ends without a newline and that line failed a check: a file cut mid-line, whose
    parser reason alone (a wrong column count, a bad feature list) would hide that the file is cut."""
    if data and not data.endswith(b"\n") and bad and bad[-1].line == last_line:
        b = bad[-1]
        bad[-1] = Bad(
            b.line, TRUNCATED_LINE, b.raw, f"no newline at the end of the file; {b.reason}: {b.detail}"
        )
    return bad


def check_feature_list(count: str, flist: str) -> str | None:
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


class KeptIds:
    """Extracts the kept fields' ids from a feature list with one regex for all fields.

    Ids of fields that are not kept are never converted (only the list's syntax is checked), which is
    most of the entries of a real line.
    """

    def __init__(self, fields: tuple[str, ...]) -> None:
        names = "|".join(re.escape(f) for f in sorted(fields, key=len, reverse=True))
        # ``\x02`` follows the name, so ``127`` never matches ``127_14``
        self.pattern = re.compile(f"(?:^|\x01)({names})\x02([^\x03]*)")
        self.index = {f: j for j, f in enumerate(fields)}
        self.width = len(fields)

    def extract(self, flist: str) -> tuple[list[int], tuple[str, str] | None]:
        """(raw id per kept field, MISSING where absent; (reason, detail) on a bad id or a repeat)."""
        row = [MISSING] * self.width
        for name, fid in self.pattern.findall(flist):
            j = self.index[name]
            if not (fid.isascii() and fid.isdigit() and len(fid) <= _MAX_ID_DIGITS):
                return row, (NON_INTEGER_ID, f"field {name}: id {fid!r}")
            if row[j] != MISSING:
                return row, (REPEATED_FIELD, f"field {name} appears more than once")
            row[j] = int(fid)
        return row, None


def parse_samples(lines: list[str], first_line: int, fields: tuple[str, ...]) -> tuple[Samples, list[Bad]]:
    """Sample lines -> the good ones as arrays (ids not yet joined) and the bad ones in line order."""
    kept = KeptIds(fields)
    good_lines: list[int] = []
    clicks: list[int] = []
    purchases: list[int] = []
    keys: list[bytes] = []
    flat: list[int] = []
    bad: list[Bad] = []
    for k, text in enumerate(lines):
        no = first_line + k
        parts = text.split(",")
        if len(parts) != SKELETON_COLUMNS:
            bad.append(
                Bad(no, WRONG_COLUMN_COUNT, text, f"{len(parts)} columns, expected {SKELETON_COLUMNS}")
            )
            continue
        _, click, purchase, key, count, flist = parts
        if click not in _LABEL_VALUES or purchase not in _LABEL_VALUES:
            bad.append(Bad(no, BAD_LABEL, text, f"click={click!r} purchase={purchase!r}"))
            continue
        if click == "0" and purchase == "1":
            bad.append(Bad(no, PURCHASE_WITHOUT_CLICK, text, "click=0 with purchase=1"))
            continue
        problem = check_feature_list(count, flist)
        if problem is not None:
            bad.append(Bad(no, BAD_FEATURE_LIST, text, problem))
            continue
        row, found = kept.extract(flist)
        if found is not None:
            bad.append(Bad(no, found[0], text, found[1]))
            continue
        good_lines.append(no)
        clicks.append(click == "1")
        purchases.append(purchase == "1")
        keys.append(key.encode("utf-8", errors="surrogateescape"))
        flat.extend(row)
    n = len(good_lines)
    samples = Samples(
        line=np.asarray(good_lines, dtype=np.int64),
        click=np.asarray(clicks, dtype=np.int8),
        purchase=np.asarray(purchases, dtype=np.int8),
        keys=bytes_array(keys),
        ids=np.asarray(flat, dtype=np.int64).reshape(n, kept.width),
    )
    return samples, bad


def parse_common(data: bytes, start: int, first_line: int, fields: tuple[str, ...]) -> dict[str, Any]:
    """Common-feature lines (``data`` starts at byte ``start``, line ``first_line``): kept ids per key,
    bad lines (and their keys, so samples pointing at them are reported as such), and each good line's
    number and byte offset (a duplicate key is found later, across chunks, and quarantined by offset)."""
    kept = KeptIds(fields)
    keys: list[bytes] = []
    flat: list[int] = []
    good_lines: list[int] = []
    offsets: list[int] = []
    bad: list[Bad] = []
    bad_keys: list[bytes] = []
    data, start = strip_bom(data, start)
    offset = start
    raw_lines = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        raw_lines.pop()
    for k, raw in enumerate(raw_lines):
        no = first_line + k
        line_start = offset
        offset += len(raw) + 1
        text = raw.decode("utf-8", errors="surrogateescape")
        if text.endswith("\r"):
            text = text[:-1]
        parts = text.split(",")
        key = parts[0]
        problem: tuple[str, str] | None = None
        row: list[int] = []
        if len(parts) != COMMON_COLUMNS:
            problem = WRONG_COLUMN_COUNT, f"{len(parts)} columns, expected {COMMON_COLUMNS}"
        elif not key:
            problem = BAD_KEY, "empty key"
        else:
            detail = check_feature_list(parts[1], parts[2])
            if detail is not None:
                problem = BAD_FEATURE_LIST, detail
        if problem is None:
            row, problem = kept.extract(parts[2])
        if problem is not None:
            bad.append(Bad(no, problem[0], text, problem[1]))
            if key:
                bad_keys.append(key.encode("utf-8", errors="surrogateescape"))
            continue
        keys.append(key.encode("utf-8", errors="surrogateescape"))
        flat.extend(row)
        good_lines.append(no)
        offsets.append(line_start)
    bad = mark_truncated(bad, first_line + len(raw_lines) - 1, data)
    return {
        "keys": bytes_array(keys),
        "values": np.asarray(flat, dtype=np.int64).reshape(len(keys), kept.width),
        "lines": np.asarray(good_lines, dtype=np.int64),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "bad": bad,
        "bad_keys": bad_keys,
        "input_lines": len(raw_lines),
    }
