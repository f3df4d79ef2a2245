"""Ray Data streaming reader: one rank's row-level share of a Parquet split → fixed-size :class:`Batch`es.

Why it looks like this (docs/platform-notes.md, "Ray Data inside a torchrun job"):

* **One Ray runtime per node**, attached to by every rank (``runtime.py``).
* **Row-level shares planned from Parquet metadata** (:mod:`cstwa_dist.data.shares`): the epoch's
  sequence of row groups is cut into ``world_size`` contiguous ranges of ``floor`` or ``ceil(T/W)`` rows
  (a row group is split at a row offset where a cut falls inside it). Every rank computes every share
  from the footers, without communication; every row is read exactly once per epoch.
* **Equal steps, nothing dropped, nothing counted twice (padding policy).** Every rank runs exactly
  ``steps_per_epoch = ceil(ceil(T/W) / batch_size)`` batches of exactly ``batch_size`` rows, so no
  collective (DMP all-to-alls, all-reduces) can hang on a rank that ran out of data, and since shares
  differ by at most one row, no rank has more than one step of padding per epoch. Real rows carry
  ``mask=True``; a rank's last partial batch, and its one all-padding step if it has one, are filled with
  *copies of real rows of this rank* with ``mask=False`` (realistic ids for the lookups, weight 0 in the
  loss). A rank with no rows at all (fewer rows than ranks) pads with id 0 and labels 0, ``mask=False``,
  and logs a warning once. :meth:`SplitReader.step_rows` gives the global real-row count of any step from
  the plan, so the trainer needs no collective to normalise a loss.
* **Global shuffle between epochs, local shuffle within.** With ``shuffle=True`` the row groups are
  permuted per epoch with a hash of ``(seed, epoch)``, so every epoch gives every rank other rows from
  anywhere in the split; within the rank a shuffle buffer seeded by a hash of ``(seed, epoch, rank)``
  mixes a window of ``shuffle_buffer_rows`` rows (default 65,536: ``65,536 / rows`` of the rank's share,
  see :mod:`cstwa_dist.data.stream`). Blocks come back in plan order (``preserve_order``), so the same
  (seed, epoch) gives the same batches on every run. ``shuffle=False`` (validation, test) reads the split
  in file order, rank ``r`` the ``r``-th contiguous range: gathered in rank order, rows are in file order.
* **Shares: the same global batches at any world size** (``data.shares``). By default the split is cut
  into one share per rank, so the rows of a global batch depend on the world size. With ``shares = V``
  (a multiple of ``W``) the split is cut into ``V`` shares whatever ``W`` is; every share is read, shuffled
  (its buffer seeded by ``(seed, epoch, share)``) and padded on its own, in batches of ``B/k`` rows
  (``k = V/W`` shares per rank, ``B`` the rank's batch size), and a rank's batch of step ``i`` is its
  shares' ``i``-th batches in share order. So a step's global batch is every share's ``i``-th batch, the
  same rows in the same order for every ``W`` that divides ``V`` at the same global batch size ``W·B``,
  and each share's rows carry a dropout key hashed from ``(seed, epoch, step, share)``
  (``Batch.dropout_keys``; ``models/blocks.KeyedDropout``), so the masks follow the rows too. Steps per
  epoch are ``ceil(ceil(T/V) / (B/k))``. Cost: ``k`` Ray Data iterations and ``k`` shuffle buffers per rank.
* **A persistent, prefetching stream** (:mod:`cstwa_dist.data.stream`): a daemon producer thread per epoch
  runs the Ray Data iteration (a custom datasource over the plan's slices: ~0.1 s to the first block,
  where ``read_parquet`` planned the files again in 1–5 s every epoch) and builds finished batches (KJT,
  pinned memory on CUDA machines) into a queue of ``prefetch_batches``; once an epoch has been read, the
  next epoch's stream starts (``lookahead``), so its start-up overlaps the end of the current epoch. One
  reader serves every epoch or evaluation pass; :meth:`SplitReader.close` stops its threads.
* **Validation that loses nothing.** The schema of every file is checked from the footer at construction
  (and a split with no rows is an error there); each streamed block is checked with a few vectorised
  reductions; on failure the rank's slices of the epoch are re-scanned with pyarrow to name the first bad
  (file, row, field, value) in a :class:`DataError`, raised in the consumer. Bad rows are never dropped
  or clamped.

Memory per rank: O(row groups of the split) for the plan, one epoch's slice list, and per stream the
shuffle buffer of each of the rank's ``k`` shares (``k · shuffle_buffer_rows`` rows),
``prefetch_batches`` batches (plus the buffer's tail at the end of an epoch), at most two
streams (current and look-ahead); nothing O(rows of the split).
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from cstwa_dist.data.batch import Batch, batch_from_columns
from cstwa_dist.data.shares import Slice, SplitPlan, dropout_key, local_rng, step_rows, steps_per_epoch
from cstwa_dist.data.spec import LABELS, DatasetSpec, split_files
from cstwa_dist.data.stream import END, EpochStream, LocalShuffle, Prefetcher, Rebatcher, iter_blocks
from cstwa_dist.data.validate import DataError, check_batch, first_error_in
from cstwa_dist.runtime import quiet_ray_loggers

__all__ = [
    "DataError",
    "SplitReader",
    "measure_input_rate",
    "plan_shares",
]

log = logging.getLogger(__name__)

# Rows held by a rank's local shuffle buffer: mixes two row groups of the writer's size (32,768) and
# stays a few MB (a row is ~8 bytes per field); it is filled once before an epoch's first batch.
DEFAULT_SHUFFLE_BUFFER_ROWS = 65536
_SCAN_ROWS = 65536  # rows per record batch when locating a bad row


def plan_shares(
    files: list[Path], world_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = False
) -> list[list[Slice]]:
    """Every rank's slices of one epoch (:mod:`cstwa_dist.data.shares`), from the footers only."""
    plan = SplitPlan(files)
    order = plan.order(seed, epoch, shuffle)
    b = plan.bounds(world_size)
    return [plan.slices(order, b[r], b[r + 1]) for r in range(world_size)]


def check_shares(shares: int | None, world_size: int, batch_size: int) -> int:
    """The number of shares a split is cut into: ``world_size`` when None (one share per rank), else
    ``shares``, which must be a multiple of ``world_size`` whose per-rank count divides ``batch_size``."""
    if shares is None or shares == 0:
        return world_size
    if shares < 0 or shares % world_size:
        raise ValueError(
            f"data.shares={shares} must be a positive multiple of the world size {world_size} (every rank "
            "reads the same number of shares)"
        )
    if batch_size % (shares // world_size):
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of the {shares // world_size} shares each rank "
            f"reads (data.shares={shares} over {world_size} ranks): every share contributes an equal part"
        )
    return shares


def locate_in_slices(paths: list[Path], slices: list[Slice], spec: DatasetSpec) -> DataError | None:
    """Scans ``slices`` in order with pyarrow; a DataError naming the first bad (file, row, field)."""
    columns = [*spec.names, *LABELS]
    for s in slices:
        table = pq.ParquetFile(paths[s.file]).read_row_group(s.row_group, columns=columns)
        table = table.slice(s.start, s.rows)
        err = first_error_in(table.to_batches(max_chunksize=_SCAN_ROWS), spec, paths[s.file], s.file_row)
        if err is not None:
            return err
    return None


def _own(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of one batch's columns, so the padding template does not keep a whole buffer alive."""
    return {k: np.array(v) for k, v in cols.items()}


def _numpy_columns(table: Any, columns: list[str]) -> dict[str, np.ndarray]:
    """Arrow → numpy (zero-copy for int columns without nulls; nulls become NaN, caught by check_batch)."""
    return {c: table.column(c).to_numpy() for c in columns}


@dataclass(frozen=True)
class _EpochSource:
    """Everything a producer thread needs for one rank's epochs, and nothing that refers to the reader
    (so a reader that is dropped can be finalised while its threads still hold this).

    The rank reads the shares ``[rank·k, (rank+1)·k)`` of ``shares`` (``k = shares / world_size``), each
    in batches of ``batch_size / k`` rows; its batch of a step is those ``k`` share batches in share
    order (module docstring, "Shares").
    """

    plan: SplitPlan
    spec: DatasetSpec
    split: str
    rank: int
    world_size: int
    batch_size: int
    seed: int
    shuffle: bool
    shuffle_buffer_rows: int
    prefetch_blocks: int
    pin: bool
    shares: int

    @property
    def columns(self) -> list[str]:
        return [*self.spec.names, *LABELS]

    @property
    def per_rank(self) -> int:
        return self.shares // self.world_size

    @property
    def share_batch(self) -> int:
        return self.batch_size // self.per_rank

    @property
    def own_shares(self) -> range:
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    @property
    def rows(self) -> int:
        return sum(self.plan.rank_rows(s, self.shares) for s in self.own_shares)

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.plan.total_rows, self.shares, self.share_batch)

    def slices(self, epoch: int) -> list[Slice]:
        return [sl for s in self.own_shares for sl in self.share_slices(epoch, s)]

    def share_slices(self, epoch: int, share: int) -> list[Slice]:
        return self.plan.rank_slices(share, self.shares, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def producer(self, epoch: Hashable) -> Callable[[Callable[[], None]], Iterator[Batch]]:
        assert isinstance(epoch, int)
        return lambda source_done: self.produce(epoch, source_done)

    def _padded(self, cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Fills ``n`` real rows up to the share batch by cycling over them (copies, not new data)."""
        idx = np.arange(self.share_batch) % n
        return {k: v[idx] for k, v in cols.items()}

    def _rows_stream(self, epoch: int, share: int, slices: list[Slice]) -> Iterator[dict[str, np.ndarray]]:
        """One share's validated rows of the epoch, in plan order, as numpy column chunks."""
        paths = self.plan.files
        seen = 0
        for table in iter_blocks(
            [str(p) for p in paths], slices, self.columns, prefetch_blocks=self.prefetch_blocks
        ):
            if table.num_rows == 0:
                continue
            cols = _numpy_columns(table, self.columns)
            reason = check_batch(cols, self.spec)
            if reason is not None:
                err = locate_in_slices(paths, slices, self.spec)
                # the scan applies the same rules, so it finds the row; still never train on the block
                raise err or DataError(f"{self.split} rank {self.rank} epoch {epoch}: {reason}")
            seen += table.num_rows
            yield cols
        expected = sum(s.rows for s in slices)
        if seen != expected:
            raise DataError(
                f"{self.split} rank {self.rank} share {share} epoch {epoch}: read {seen} rows but the "
                f"Parquet metadata of its slices says {expected}"
            )

    def share_batches(
        self, epoch: int, share: int, source_done: Callable[[], None]
    ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Exactly ``steps`` ``(columns, real rows)`` batches of ``share_batch`` rows of one share.

        The share's rows pass its own shuffle buffer, seeded by a hash of ``(seed, epoch, share)``; the
        last partial batch is padded with copies of its own real rows, a share with no rows with zeros.
        """
        steps = 0
        template: dict[str, np.ndarray] | None = None
        slices = self.share_slices(epoch, share)
        if slices:
            rng = local_rng(self.seed, epoch, share) if self.shuffle else None
            shuffle = LocalShuffle(self.shuffle_buffer_rows, rng)
            cut = Rebatcher(self.share_batch)
            for cols in self._rows_stream(epoch, share, slices):
                for mixed in shuffle.push(cols):
                    for b in cut.push(mixed):
                        template = _own(b) if template is None else template
                        yield b, self.share_batch
                        steps += 1
            source_done()  # the rest is in memory: the queue stops bounding this producer
            for mixed in shuffle.finish():
                for b in cut.push(mixed):
                    template = _own(b) if template is None else template
                    yield b, self.share_batch
                    steps += 1
            for b in cut.finish():
                n = len(b["click"])
                b = self._padded(b, n)
                template = _own(b) if template is None else template
                yield b, n
                steps += 1
        else:
            source_done()
        pad = template if template is not None else self._zeros()
        while steps < self.steps:  # at most one all-padding step (shares differ by <= 1 row)
            yield pad, 0
            steps += 1
        if steps != self.steps:
            raise RuntimeError(
                f"rank {self.rank} share {share} produced {steps} batches, expected {self.steps}"
            )

    def produce(self, epoch: int, source_done: Callable[[], None]) -> Iterator[Batch]:
        """Exactly ``steps`` batches of exactly ``batch_size`` rows (runs on the producer thread): step
        ``i`` of each own share, concatenated in share order."""
        shares = list(self.own_shares)
        pending = set(shares)

        def done(share: int) -> None:
            pending.discard(share)
            if not pending:
                source_done()

        streams = [self.share_batches(epoch, s, functools.partial(done, s)) for s in shares]
        try:
            for step, parts in enumerate(zip(*streams, strict=True)):
                cols = _concat_columns([c for c, _ in parts])
                mask = np.zeros(self.batch_size, dtype=bool)
                for j, (_, n) in enumerate(parts):
                    mask[j * self.share_batch : j * self.share_batch + n] = True
                yield batch_from_columns(
                    cols,
                    self.spec.names,
                    mask,
                    global_rows=step_rows(self.plan.total_rows, self.shares, self.share_batch, step),
                    pin=self.pin,
                    dropout_keys=tuple(dropout_key(self.seed, epoch, step, s) for s in shares),
                )
        finally:
            for it in streams:
                it.close()  # closes each share's Ray iteration if the consumer stopped early

    def _zeros(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(self.share_batch, dtype=np.int64) for k in self.columns}


def _concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _next_key(shuffle: bool, epochs: int | None, key: Hashable) -> Hashable | None:
    """The stream to look ahead to: the next epoch (none after the last of ``epochs``), or (no
    shuffle) the same rows again."""
    assert isinstance(key, int)
    if not shuffle:
        return key
    return key + 1 if epochs is None or key + 1 < epochs else None


class SplitReader:
    """Streams this rank's share of ``<dataset>/<split>/*.parquet`` as fixed-size, masked batches.

    See the module docstring for the share, padding, shuffle and validation policies. Construction reads
    only Parquet footers (schema check, row groups, plan); data is read by background threads, from the
    first :meth:`epoch` (or :meth:`prefetch`) on. One epoch at a time: starting an epoch stops the stream
    of the previous one. Use as a context manager, or call :meth:`close`, to stop the threads early.

    ``lookahead`` (default: ``shuffle``, i.e. training readers) starts epoch ``e+1`` as soon as epoch ``e``
    has been read; ``epochs`` (if given) stops it after the last epoch, so no epoch is read for nothing.
    Evaluation readers default to no look-ahead: a pass that is not consumed until after the next
    training epoch would hold Ray's read-ahead in the object store all that time; call :meth:`prefetch`
    to start the next pass when it is near. ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    """

    rows: int
    total_rows: int
    steps_per_epoch: int
    files: list[Path]

    def __init__(
        self,
        dataset: str | Path,
        split: str,
        spec: DatasetSpec,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        prefetch_batches: int = 2,
        shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
        lookahead: bool | None = None,
        epochs: int | None = None,
        pin_memory: bool | None = None,
        shares: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shares = check_shares(shares, world_size, batch_size)
        self.dataset = Path(dataset)
        self.split = split
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.prefetch_batches = prefetch_batches
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, 2 * batch_size)
        self.plan = SplitPlan(split_files(self.dataset, split), spec)
        self.files = self.plan.files
        if self.plan.total_rows == 0:
            raise DataError(
                f"dataset {self.dataset} split {split!r} has no rows ({len(self.files)} file(s), all "
                "empty): nothing to read; regenerate or re-import the data set"
            )
        self.total_rows = self.plan.total_rows
        self.shares = shares
        self._source = _EpochSource(
            plan=self.plan,
            spec=spec,
            split=split,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer_rows=self.shuffle_buffer_rows,
            prefetch_blocks=max(1, prefetch_batches),
            pin=torch.cuda.is_available() if pin_memory is None else pin_memory,
            shares=shares,
        )
        self.rows = self._source.rows
        self.steps_per_epoch = self._source.steps
        self._streams = Prefetcher(
            self._source.producer,
            max(1, prefetch_batches),
            lookahead=shuffle if lookahead is None else lookahead,
            next_key=functools.partial(_next_key, shuffle, epochs),
        )
        # Stops the threads when the reader is dropped without close(): nothing the threads or the
        # Prefetcher hold refers back to the reader.
        self._finalizer = weakref.finalize(self, self._streams.close, 1.0)
        quiet_ray_loggers()
        if self.rows == 0:
            log.warning(
                "rank %d/%d has no rows of split %r (%d rows for %d ranks): it will run %d "
                "all-padding steps per epoch",
                rank,
                world_size,
                split,
                self.total_rows,
                world_size,
                self.steps_per_epoch,
            )
        log.info(
            "rank %d: %s split %d/%d rows (%d row groups in %d files), %d steps/epoch of %d",
            rank,
            split,
            self.rows,
            self.total_rows,
            self.plan.num_units,
            len(self.files),
            self.steps_per_epoch,
            batch_size,
        )

    # --- plan ------------------------------------------------------------------------------------
    def _key(self, epoch: int) -> int:
        """Stream identity: without shuffle every epoch reads the same rows in the same order."""
        return epoch if self.shuffle else 0

    def slices(self, epoch: int) -> list[Slice]:
        """This rank's row-group slices of ``epoch``, in reading order (before the local shuffle)."""
        return self._source.slices(epoch)

    def step_rows(self, epoch: int, step: int) -> int:
        """Real rows of ``step`` summed over all ranks, from the plan (no communication).

        The same for every epoch (shares have fixed sizes); equals ``batch.global_rows``.
        """
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        return step_rows(self.total_rows, self.shares, self._source.share_batch, step)

    # --- streams ---------------------------------------------------------------------------------
    def prefetch(self, epoch: int) -> None:
        """Starts reading ``epoch`` in the background (e.g. the next validation pass); no-op if queued."""
        self._streams.prefetch(self._key(epoch))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Exactly ``steps_per_epoch`` batches of exactly ``batch_size`` rows (padding masked out).

        The stream starts when this is called (not at the first ``next``). Stopping early (``break``)
        is fine: the stream is stopped and the next call starts a new one.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        stream = self._streams.open(self._key(epoch))
        return self._consume(stream)

    def _consume(self, stream: EpochStream) -> Iterator[Batch]:
        try:
            for step in range(self.steps_per_epoch):
                batch = stream.get()
                if batch is END:
                    raise RuntimeError(f"input stream ended after {step} of {self.steps_per_epoch} batches")
                yield batch
            if stream.get() is not END:
                raise RuntimeError(f"input stream yielded more than {self.steps_per_epoch} batches")
        finally:
            self._streams.release(stream)

    def close(self) -> None:
        """Stops every producer thread (and their Ray iterations). The reader cannot be used after."""
        self._finalizer()

    def __enter__(self) -> SplitReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_input_rate(reader: SplitReader, epochs: int = 1) -> dict[str, Any]:
    """Input-only throughput of one reader: rows/s of real rows, with per-epoch timings.

    ``first_batch_s`` is the time from asking for an epoch to holding its first batch (the start-up
    on the critical path). The first epoch includes Ray worker start-up, so report
    ``rows_per_s_after_first`` when epochs > 1. ``rows_per_s_steady`` leaves out every epoch's first
    batch and the wait for it: the rate the stream sustains once running, comparable with the
    trainer's steady consumption rate.
    """
    per_epoch = []
    for e in range(epochs):
        t0 = time.perf_counter()
        real = 0
        steps = 0
        first = float("nan")
        first_rows = 0
        for b in reader.epoch(e):
            if steps == 0:
                first = time.perf_counter() - t0
                first_rows = int(b.mask.sum())
            real += int(b.mask.sum())
            steps += 1
        seconds = time.perf_counter() - t0
        per_epoch.append(
            {
                "epoch": e,
                "seconds": seconds,
                "first_batch_s": first,
                "rows": real,
                "steps": steps,
                "steady_rows": real - first_rows,
                "steady_s": seconds - first if steps else 0.0,
            }
        )
    total_s = sum(p["seconds"] for p in per_epoch)
    total_rows = sum(p["rows"] for p in per_epoch)
    out: dict[str, Any] = {
        "rank": reader.rank,
        "world_size": reader.world_size,
        "batch_size": reader.batch_size,
        "shuffle": reader.shuffle,
        "epochs": epochs,
        "rows": total_rows,
        "seconds": total_s,
        "rows_per_s": total_rows / total_s if total_s > 0 else float("nan"),
        "per_epoch": per_epoch,
    }
    steady_s = sum(p["steady_s"] for p in per_epoch)
    out["rows_per_s_steady"] = (
        sum(p["steady_rows"] for p in per_epoch) / steady_s if steady_s > 0 else float("nan")
    )
    if epochs > 1:
        rest = per_epoch[1:]
        rest_s = sum(p["seconds"] for p in rest)
        out["rows_per_s_after_first"] = sum(p["rows"] for p in rest) / rest_s if rest_s > 0 else float("nan")
    return out
