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

from cstwa_dist.data.aliccp.chunks import Chunk, plan_chunks, read_line_at
from cstwa_dist.data.aliccp.executor import ChunkExecutor
from cstwa_dist.data.aliccp.fields import MISSING
from cstwa_dist.data.aliccp.join import CommonTable, first_duplicates
from cstwa_dist.data.aliccp.parse import Bad, bytes_array
from cstwa_dist.data.aliccp.tasks import Context
from cstwa_dist.data.aliccp.vocab import IdCount, IdCounts
from cstwa_dist.data.progress import Progress
from cstwa_dist.data.quarantine import DUPLICATE_COMMON_KEY, Quarantine
from cstwa_dist.data.writer import SplitAccumulator

logger = logging.getLogger(__name__)


def number_chunks(ex: ChunkExecutor, path: Path, chunk_bytes: int) -> tuple[list[Chunk], int]:
    """Chunks with their first line numbers (a newline count per chunk), and the file's line count."""
    chunks = plan_chunks(path, chunk_bytes)
    numbered, line = [], 1
    for c, res in zip(chunks, ex.map("lines", chunks, Context((), 0, 0.0)), strict=True):
        numbered.append(Chunk(c.path, c.start, c.end, line))
        line += res["lines"]
    return numbered, line - 1


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
    chunks, n_lines = number_chunks(ex, path, chunk_bytes)
    prog = Progress(f"aliccp {path.name}", n_lines, progress, log=logger)
    parts: dict[str, list[Any]] = {"keys": [], "values": [], "lines": [], "offsets": []}
    bad_keys: list[bytes] = []
    strict_first: Bad | None = None
    for res in ex.map("common", chunks, Context(fields, 0, 0.0)):
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
            strict_first = Bad(int(lines[k]), DUPLICATE_COMMON_KEY, read_line_at(path, int(offsets[k])), "")
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
            read_line_at(path, int(offsets[k])),
            f"key {key!r}",
        )
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
    for res in ex.map("count", chunks, ctx):
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
    return per_split, quarantine.accounting(str(path), n_lines, written)
