"""Row-level shares of a Parquet split, planned from the footers alone.

Why row level: with whole files as the unit, a split of few large files leaves ranks idle (465M rows in
111 files on 64 ranks: 17 ranks ran 2,097 all-padding steps of 4,195). Here the unit of *shuffling* is a
Parquet row group (the smallest piece pyarrow reads without decoding more), and the unit of *sharing* is a
row: the epoch's sequence of row groups is cut into ``world_size`` contiguous row ranges
``[r*T//W, (r+1)*T//W)``, splitting a row group at a row offset where a cut falls inside it. So

* every rank gets ``floor(T/W)`` or ``ceil(T/W)`` rows, hence at most one step of padding per epoch at
  any world size (:func:`steps_per_epoch`);
* every row is in exactly one rank's share per epoch (the ranges partition ``[0, T)``);
* every rank computes every share from the same footers and ``(seed, epoch)``, without communication;
  the global real-row count of any step is known up front (:func:`step_rows`).

**Global shuffle.** With ``shuffle=True`` the list of row groups is permuted every epoch with a generator
seeded by *hashing* ``(seed, epoch)`` (:func:`order_rng`, a :class:`numpy.random.SeedSequence`), so each
epoch gives each rank a different, random set of row groups from anywhere in the split, and seed ``s``
epoch ``e`` never replays seed ``s+1`` epoch ``e-1`` (as ``seed + epoch`` did). Within a rank the rows
then pass through a local shuffle buffer seeded by hashing ``(seed, epoch, rank)`` (:func:`local_rng`;
see :mod:`cstwa_dist.data.stream`). ``shuffle=False`` keeps file order: rank ``r`` reads the ``r``-th
contiguous range, so predictions gathered in rank order come back in file order.

Memory per rank: a few int64 arrays of one entry per row group of the split (O(row groups), never
O(rows)), and one epoch's slice list for this rank.

:func:`read_slices` is the function Ray Data's read tasks run on the workers; it imports only pyarrow.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.data.validate import check_schema

__all__ = [
    "Slice",
    "SplitPlan",
    "dropout_key",
    "local_rng",
    "order_rng",
    "read_slices",
    "step_rows",
    "steps_per_epoch",
]

# spawn_key tags: the two generators of one (seed, epoch) are independent streams of one hash.
_ORDER_STREAM = 0
_LOCAL_STREAM = 1
_DROPOUT_STREAM = 2


def _entropy(seed: int) -> int:
    return int(seed) % (1 << 64)  # SeedSequence wants a non-negative int; -1 and 2**64-1 coincide


def order_rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator of the epoch's global row-group permutation: a hash of ``(seed, epoch)``."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed), spawn_key=(_ORDER_STREAM, epoch)))


def local_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """Generator of one rank's local shuffle buffer: a hash of ``(seed, epoch, rank)``."""
    return np.random.default_rng(
        np.random.SeedSequence(_entropy(seed), spawn_key=(_LOCAL_STREAM, epoch, rank))
    )


def dropout_key(seed: int, epoch: int, step: int, share: int) -> int:
    """The 63-bit key of one share's rows in training step ``step`` of ``epoch``: a hash of
    ``(seed, epoch, step, share)``. The model's dropout draws those rows' masks from it
    (:class:`cstwa_dist.models.blocks.KeyedDropout`), so a row gets the same mask whichever rank
    holds its share, and a resumed epoch draws what the uninterrupted one drew."""
    seq = np.random.SeedSequence(_entropy(seed), spawn_key=(_DROPOUT_STREAM, epoch, step, share))
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


def steps_per_epoch(total_rows: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs: the largest share, ``ceil(T/W)`` rows, in batches of ``batch_size``."""
    return math.ceil(math.ceil(total_rows / world_size) / batch_size)


def step_rows(total_rows: int, world_size: int, batch_size: int, step: int) -> int:
    """Real rows of ``step`` summed over all ranks (each rank's share is ``floor`` or ``ceil(T/W)``).

    Independent of the epoch and the shuffle: only which rows, never how many, changes between epochs.
    """
    q, m = divmod(total_rows, world_size)  # m ranks hold q + 1 rows, the others q

    def real(share: int) -> int:
        return min(batch_size, max(0, share - step * batch_size))

    return (world_size - m) * real(q) + m * real(q + 1)


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of one row group of ``plan.files[file]``; ``file_row`` = the file row of
    ``start`` (so an error inside the slice can be reported with its row in the file)."""

    file: int
    row_group: int
    start: int
    stop: int
    file_row: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class SplitPlan:
    """The row groups of a split (from the footers) and the per-epoch row ranges of every rank.

    ``files`` keep the given (sorted) order; row groups with no rows are left out.
    """

    def __init__(self, files: Sequence[str | Path], spec: DatasetSpec | None = None):
        self.files = [Path(f) for f in files]
        unit_file, unit_rg, unit_rows, unit_offset = [], [], [], []
        for i, f in enumerate(self.files):
            meta = pq.read_metadata(f)  # footer only
            if spec is not None:
                check_schema(f, spec, meta.schema.to_arrow_schema())
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    unit_file.append(i)
                    unit_rg.append(g)
                    unit_rows.append(n)
                    unit_offset.append(offset)
                offset += n
        self.unit_file = np.asarray(unit_file, dtype=np.int64)
        self.unit_rg = np.asarray(unit_rg, dtype=np.int64)
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)
        self.unit_offset = np.asarray(unit_offset, dtype=np.int64)
        self.total_rows = int(self.unit_rows.sum())

    @property
    def num_units(self) -> int:
        return int(self.unit_rows.size)

    def order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        """The epoch's sequence of row groups: file order, or a permutation hashed from (seed, epoch)."""
        if not shuffle:
            return np.arange(self.num_units)
        return order_rng(seed, epoch).permutation(self.num_units)

    def bounds(self, world_size: int) -> list[int]:
        """Row offsets ``[r*T//W for r in 0..W]`` in the epoch's sequence: floor/ceil(T/W) rows each."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        return [r * self.total_rows // world_size for r in range(world_size + 1)]

    def rank_rows(self, rank: int, world_size: int) -> int:
        b = self.bounds(world_size)
        return b[rank + 1] - b[rank]

    def slices(self, order: np.ndarray, lo: int, hi: int) -> list[Slice]:
        """Rows ``[lo, hi)`` of the sequence ``order`` of row groups, as slices in sequence order."""
        if hi <= lo:
            return []
        rows = self.unit_rows[order]
        ends = np.cumsum(rows)
        first = int(np.searchsorted(ends, lo, side="right"))  # first unit that ends after lo
        out: list[Slice] = []
        pos = int(ends[first] - rows[first])
        for k in range(first, order.size):
            if pos >= hi:
                break
            n = int(rows[k])
            a, b = max(lo, pos) - pos, min(hi, pos + n) - pos
            u = int(order[k])
            out.append(
                Slice(
                    file=int(self.unit_file[u]),
                    row_group=int(self.unit_rg[u]),
                    start=a,
                    stop=b,
                    file_row=int(self.unit_offset[u]) + a,
                )
            )
            pos += n
        return out

    def rank_slices(self, rank: int, world_size: int, *, seed: int, epoch: int, shuffle: bool) -> list[Slice]:
        """This rank's rows of one epoch, in reading order."""
        b = self.bounds(world_size)
        return self.slices(self.order(seed, epoch, shuffle), b[rank], b[rank + 1])


def read_slices(
    paths: Sequence[str], slices: Sequence[tuple[int, int, int, int]], columns: Sequence[str]
) -> Iterator[pa.Table]:
    """Reads ``(path index, row group, start, stop)`` slices with pyarrow, one table per slice, in order.

    Runs inside Ray Data read tasks: pyarrow reads whole row groups, so a slice costs at most one row
    group of decoding (a share's first and last slices may be partial row groups).
    """
    opened: dict[int, pq.ParquetFile] = {}
    for p, g, a, b in slices:
        pf = opened.get(p)
        if pf is None:
            pf = opened[p] = pq.ParquetFile(paths[p])
        table = pf.read_row_group(g, columns=list(columns))
        if a != 0 or b != table.num_rows:
            table = table.slice(a, b - a)
        yield table
