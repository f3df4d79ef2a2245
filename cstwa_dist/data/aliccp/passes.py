"""The driver's side of each pass over a file: consume the tasks' results in chunk order, quarantine the
bad lines, and build what the pass produces (the common table, the id counts, the written rows).

Why the driver does this and not the tasks: the quarantine files, the counts and the Parquet writer are
single streams whose order must be the file's, so they are fed by one process, in chunk order, whatever
ran the tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cstwa_dist.data.aliccp.chunks import Chunk, gzip_chunks, lines_in, plan_chunks, read_lines_at, with_data
from cstwa_dist.data.aliccp.executor import ChunkExecutor
from cstwa_dist.data.aliccp.fields import MISSING
from cstwa_dist.data.aliccp.join import CommonTable, first_duplicates
from cstwa_dist.data.aliccp.parse import Bad, bytes_array
from cstwa_dist.data.aliccp.release import check_release, warn_unterminated
from cstwa_dist.data.aliccp.tasks import Context
from cstwa_dist.data.aliccp.vocab import IdCount, IdCounts
from cstwa_dist.data.progress import Progress
from cstwa_dist.data.quarantine import DUPLICATE_COMMON_KEY, Quarantine, is_gzip
from cstwa_dist.data.writer import SplitAccumulator

logger = logging.getLogger(__name__)


def number_chunks(ex: ChunkExecutor, path: Path, chunk_bytes: int) -> tuple[list[Chunk], int, bool]:
    """Chunks with their first line numbers (a newline count per chunk), the file's line count, and
    whether its last byte is a newline (a file cut mid-line ends without one).

    A gzip file is numbered while it is decompressed (the driver has to read it in order anyway), and
    its chunks are kept without their bytes; each pass decompresses it again (:func:`with_data`).
    """
    if is_gzip(path):
        logger.info("%s is gzip: decompressing it once to number its lines (again in each pass)", path)
        numbered, line, last = [], 1, b"\n"
        for c in gzip_chunks(path, chunk_bytes):
            assert c.data is not None
            numbered.append(Chunk(c.path, c.start, c.end, line))
            line += lines_in(c.data)
            last = c.data[-1:]
        return numbered, line - 1, last == b"\n"
    chunks = plan_chunks(path, chunk_bytes)
    numbered, line = [], 1
    for c, res in zip(chunks, ex.map("lines", chunks, Context((), 0, 0.0)), strict=True):
        numbered.append(Chunk(c.path, c.start, c.end, line))
        line += res["lines"]
    return numbered, line - 1, _ends_with_newline(path)


def _ends_with_newline(path: Path) -> bool:
    """Whether a plain file's last byte is a newline (an empty file counts as ending cleanly)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _concat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(parts) if parts else empty


def build_common(
    ex: ChunkExecutor,
    path: Path,
    split: str,
    fields: tuple[str, ...],
    chunk_bytes: int,
    quarantine: Quarantine,
    progress: bool,
) -> tuple[CommonTable, dict[str, int]]:
    """Reads a common-features file into a :class:`CommonTable`; returns it and the file's accounting.

    A key on more than one line keeps its first line; the later ones are quarantined
    (``duplicate_common_key``), found only once every chunk is in, so in strict mode the first bad line
    of the file (a chunk's or a duplicate, whichever comes first) is the one raised.
    """
    chunks, n_lines, ends_with_newline = number_chunks(ex, path, chunk_bytes)
    check_release(path, n_lines)
    prog = Progress(f"aliccp {path.name}", n_lines, progress, log=logger)
    parts: dict[str, list[Any]] = {"keys": [], "values": [], "lines": [], "offsets": []}
    bad_keys: list[bytes] = []
    strict_first: Bad | None = None
    for res in ex.map("common", with_data(chunks), Context(fields, 0, 0.0)):
        for name, lst in parts.items():
            lst.append(res[name])
        bad_keys += res["bad_keys"]
        if res["bad"] and quarantine.strict:
            strict_first = res["bad"][0]
            break
        for b in res["bad"]:
            quarantine.add(split, str(path), b.line, b.reason, b.raw, b.detail)
        prog.step(res["input_lines"])
    if strict_first is None:
        prog.finish()
    keys = _concat(parts["keys"], np.zeros(0, dtype="S1"))
    values = _concat(parts["values"], np.zeros((0, len(fields)), np.int64))
    lines = _concat(parts["lines"], np.zeros(0, np.int64))
    offsets = _concat(parts["offsets"], np.zeros(0, np.int64))
    del parts
    order, dup = first_duplicates(keys, lines)
    dup_at = order[dup]
    dup_at = dup_at[np.argsort(lines[dup_at])]
    if quarantine.strict and (strict_first is not None or dup_at.size):
        if dup_at.size and (strict_first is None or lines[dup_at[0]] < strict_first.line):
            k = int(dup_at[0])
            raw = read_lines_at(path, [int(offsets[k])])[0]
            strict_first = Bad(int(lines[k]), DUPLICATE_COMMON_KEY, raw, "")
        assert strict_first is not None
        quarantine.add(
            split, str(path), strict_first.line, strict_first.reason, strict_first.raw, strict_first.detail
        )
    raws = read_lines_at(path, offsets[dup_at].tolist()) if dup_at.size else []  # ascending: lines ascend
    for k, raw in zip(dup_at.tolist(), raws, strict=True):
        key = keys[k].decode("utf-8", errors="surrogateescape")
        quarantine.add(split, str(path), int(lines[k]), DUPLICATE_COMMON_KEY, raw, f"key {key!r}")
    warn_unterminated(path, n_lines, ends_with_newline, quarantine)
    keep = order[~dup]  # sorted by key, first occurrence of each
    present = [j for j in range(len(fields)) if bool(np.any(values[keep, j] != MISSING))]
    table = CommonTable(
        keys=keys[keep],
        values=np.ascontiguousarray(values[keep][:, present]),
        columns=tuple(present),
        bad_keys=np.unique(bytes_array(bad_keys)),
    )
    logger.log(
        prog.level,
        "aliccp %s: %d keys, fields %s, table %.1f MiB",
        path.name,
        table.keys.size,
        [fields[j] for j in present],
        table.nbytes / 2**20,
    )
    return table, quarantine.accounting(str(path), n_lines, int(table.keys.size))


def count_pass(
    ex: ChunkExecutor,
    chunks: list[Chunk],
    n_lines: int,
    ctx: Context,
    path: Path,
    quarantine: Quarantine,
    progress: bool,
) -> tuple[list[IdCount], list[int]]:
    """Pass 1: exact id counts per field on the train lines, and the rows train/val will get.

    Bad lines are not quarantined here (pass 2 does it, once); strict mode raises at the first.
    """
    counts = IdCounts(len(ctx.fields))
    rows = [0, 0]
    prog = Progress(f"aliccp {path.name} pass 1 (count ids)", n_lines, progress, log=logger)
    for res in ex.map("count", with_data(chunks), ctx):
        if res["first_bad"] is not None and quarantine.strict:
            b = res["first_bad"]
            quarantine.add("train", str(path), b.line, b.reason, b.raw, b.detail)  # raises
        rows[0] += res["rows"][0]
        rows[1] += res["rows"][1]
        counts.add(res["counts"])
        prog.step(res["input_lines"])
    prog.finish()
    return counts.result(), rows


def write_pass(
    ex: ChunkExecutor,
    chunks: list[Chunk],
    n_lines: int,
    ctx: Context,
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
    prog = Progress(f"aliccp {path.name} {what}", n_lines, progress, log=logger)
    for res in ex.map("write", with_data(chunks), ctx):
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
    return per_split, quarantine.accounting(str(path), n_lines, written)
