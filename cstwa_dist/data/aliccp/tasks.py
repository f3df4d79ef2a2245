"""The chunk tasks: pure functions of (chunk, context), run in this process or as Ray tasks.

Why pure: everything that decides the output is a function of the line (the validation split is a hash
of the line number, counts are merged exactly, the writer cuts files by row count), so a task may run
anywhere, in any order, and the driver — which consumes results in chunk order — sees the same stream
either way. Each result carries the peak RSS of the process that made it, so the busiest Ray worker's
memory can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cstwa_dist.data.aliccp.chunks import Chunk, lines_in, read_chunk, split_lines, strip_bom
from cstwa_dist.data.aliccp.join import CommonTable, join
from cstwa_dist.data.aliccp.parse import Bad, Samples, mark_truncated, parse_common, parse_samples
from cstwa_dist.data.aliccp.split import line_splits
from cstwa_dist.data.aliccp.vocab import chunk_counts, remap
from cstwa_dist.data.progress import peak_rss_mb


@dataclass(frozen=True)
class Context:
    """What every chunk of one pass shares (put in the object store once per pass)."""

    fields: tuple[str, ...]
    seed: int
    val_fraction: float  # 0 for the test file: every line is a test line
    table: CommonTable | None = None
    vocab: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # (sorted raw ids, rows) per field

    def splits(self, lines: np.ndarray) -> np.ndarray:
        """Per line: 0 = the file's own split, 1 = val."""
        return line_splits(lines, self.seed, self.val_fraction)


def task_lines(chunk: Chunk, ctx: Context) -> dict[str, Any]:
    """The chunk's line count (to number the chunks' first lines)."""
    return {"lines": lines_in(read_chunk(chunk)), "rss": peak_rss_mb()}


def task_common(chunk: Chunk, ctx: Context) -> dict[str, Any]:
    """Parses common-feature lines: kept ids per key, bad lines, and each good line's byte offset."""
    result = parse_common(read_chunk(chunk), chunk.start, chunk.first_line, ctx.fields)
    result["rss"] = peak_rss_mb()
    return result


def good_samples(chunk: Chunk, ctx: Context) -> tuple[Samples, np.ndarray, list[Bad], int]:
    """Parse + join of a skeleton chunk: good samples, the mask of good rows, bad lines (in line order)."""
    data, _ = strip_bom(read_chunk(chunk), chunk.start)
    lines = split_lines(data)
    samples, bad = parse_samples(lines, chunk.first_line, ctx.fields)
    assert ctx.table is not None
    good, join_bad = join(samples, ctx.table, lines, chunk.first_line, ctx.fields)
    bad = mark_truncated(
        sorted(bad + join_bad, key=lambda b: b.line), chunk.first_line + len(lines) - 1, data
    )
    return samples, good, bad, len(lines)


def task_count(chunk: Chunk, ctx: Context) -> dict[str, Any]:
    """Pass 1: (unique raw ids, counts) per kept field over the chunk's good train lines."""
    samples, good, bad, n_lines = good_samples(chunk, ctx)
    split = ctx.splits(samples.line)
    train = good & (split == 0)
    return {
        "counts": chunk_counts(samples.ids[train]),
        "rows": [int(train.sum()), int((good & (split == 1)).sum())],
        "first_bad": bad[0] if bad else None,
        "input_lines": n_lines,
        "rss": peak_rss_mb(),
    }


def task_write(chunk: Chunk, ctx: Context) -> dict[str, Any]:
    """Pass 2: remapped columns of the chunk's good lines per split (0 = own split, 1 = val) + bad lines."""
    samples, good, bad, n_lines = good_samples(chunk, ctx)
    assert ctx.vocab is not None
    split = ctx.splits(samples.line)
    out = []
    for s in (0, 1):
        rows = good & (split == s)
        cols = {f: remap(samples.ids[rows, j], *ctx.vocab[j]) for j, f in enumerate(ctx.fields)}
        cols["click"] = samples.click[rows]
        cols["purchase"] = samples.purchase[rows]
        out.append(cols)
    bad_split = ctx.splits(np.asarray([b.line for b in bad], dtype=np.int64))
    return {
        "cols": out,
        "bad": list(zip(bad, bad_split.tolist(), strict=True)),
        "input_lines": n_lines,
        "rss": peak_rss_mb(),
    }


TASKS = {"lines": task_lines, "common": task_common, "count": task_count, "write": task_write}


def run_chunk(mode: str, chunk: Chunk, ctx: Context) -> dict[str, Any]:
    """One task by name: the single function the executor ships to Ray (one remote definition)."""
    return TASKS[mode](chunk, ctx)
