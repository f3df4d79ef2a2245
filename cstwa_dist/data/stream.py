"""The machinery of the persistent, prefetching input stream: Ray Data source, local shuffle, producers.

* :class:`SliceDatasource` — a ``ray.data.Datasource`` whose read tasks read one rank's row-group slices
  (:func:`cstwa_dist.data.shares.read_slices`) in the plan's order. Why not ``ray.data.read_parquet``:
  it lists and plans the files again for every Dataset (1–5 s per epoch and per validation pass in this
  project; 1.1–1.2 s warm on the demo data) and cannot cut a row group at a row offset. Measured on the
  demo train split (300k rows, 2 CPUs, warm workers): this datasource gives its first block in
  0.05–0.15 s and reads the split in 0.1–0.15 s; ``ray.data.from_items(units).map_batches(read)`` in
  0.08–0.14 s and 0.21–0.26 s. Read tasks group slices up to :data:`TASK_ROWS` rows, because each task
  costs ~30 ms of scheduling; ``preserve_order`` keeps the blocks in task order, so a (seed, epoch, rank)
  always gives the same rows in the same order.
* :class:`LocalShuffle` — the rank's shuffle buffer (window below); :class:`Rebatcher` — cuts the row
  stream into fixed-size batches.
* :class:`EpochStream` — one epoch's producer: a daemon thread that runs the Ray Data iteration and builds
  finished :class:`~cstwa_dist.data.batch.Batch` objects (KJT, pinned memory) into a queue bounded by
  ``prefetch_batches``; :class:`Prefetcher` — at most one running and one look-ahead stream per reader,
  and starts epoch ``e+1``'s Ray Data iteration as soon as epoch ``e``'s has been read, so the next
  Dataset's start-up and shuffle-buffer fill overlap the end of the current epoch.

**Shuffle window.** A rank's buffer holds ``capacity`` rows (default 65,536); every time it is full it is
permuted and all but ``capacity // 2`` rows leave it, the rest stay to mix with the next rows. So a batch
is a uniform sample of a window of >= ``capacity`` consecutive rows of the rank's reading order
(``capacity / rows_per_rank`` of its share, ~``capacity * W / T`` of the split), and rows stay in the buffer
for two rounds on average. The global row-group permutation (:mod:`cstwa_dist.data.shares`) gives the
mixing across the whole split: the window is drawn from random row groups of any file.

**Errors never hang, early stops never leak.** Any exception in a producer (Ray task failure, a
:class:`~cstwa_dist.data.validate.DataError` naming file/row/field, a bug) is put in the queue and raised
in the consumer as the same exception object. A consumer that stops early (``break``) stops its stream:
the producer's blocked ``put`` returns, the Ray iteration is closed; producers are daemon threads and
:meth:`Prefetcher.close` stops them all.

Memory per rank and stream: the shuffle buffer (<= 2 x ``capacity`` rows while it is permuted), at most
``prefetch_batches`` finished batches while the source streams plus the buffer's tail as batches after
it ended, and Ray Data's own read-ahead in the node's object store; at most two streams per reader.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from cstwa_dist.data.shares import Slice, read_slices

__all__ = [
    "END",
    "EpochStream",
    "LocalShuffle",
    "Prefetcher",
    "Rebatcher",
    "SliceDatasource",
    "iter_blocks",
]

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]

TASK_ROWS = 1 << 17  # rows per Ray read task: each task costs ~30 ms to schedule, a block stays ~10 MB
_POLL_S = 0.5  # how often a blocked consumer checks that its producer is still alive


# --- Ray Data source -------------------------------------------------------------------------------
def _task_groups(slices: Sequence[Slice], task_rows: int) -> list[list[Slice]]:
    """Consecutive slices grouped into read tasks of about ``task_rows`` rows (at least one slice)."""
    groups: list[list[Slice]] = []
    rows = task_rows
    for s in slices:
        if rows + s.rows > task_rows and (not groups or groups[-1]):
            groups.append([])
            rows = 0
        groups[-1].append(s)
        rows += s.rows
    return groups


class SliceDatasource(Datasource):
    """Reads ``slices`` of ``paths`` (only ``columns``) in order: one read task per ~``task_rows`` rows."""

    def __init__(
        self,
        paths: Sequence[str],
        slices: Sequence[Slice],
        columns: Sequence[str],
        task_rows: int = TASK_ROWS,
    ):
        super().__init__()
        self.paths = [str(p) for p in paths]
        self.groups = _task_groups(list(slices), task_rows)
        self.columns = list(columns)
        self.row_bytes = 8 * len(self.columns)

    def get_name(self) -> str:
        return "ParquetSlices"

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.rows for g in self.groups for s in g) * self.row_bytes

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[ReadTask]:
        """One task per group, whatever ``parallelism`` asks: the groups are the plan's."""
        tasks = []
        for group in self.groups:
            files = sorted({s.file for s in group})
            local = {f: i for i, f in enumerate(files)}
            spec = [(local[s.file], s.row_group, s.start, s.stop) for s in group]
            rows = sum(s.rows for s in group)
            paths = [self.paths[f] for f in files]
            meta = BlockMetadata(
                num_rows=rows, size_bytes=rows * self.row_bytes, exec_stats=None, input_files=paths
            )
            tasks.append(ReadTask(functools.partial(read_slices, paths, spec, self.columns), meta))
        return tasks


def iter_blocks(
    paths: Sequence[str],
    slices: Sequence[Slice],
    columns: Sequence[str],
    *,
    prefetch_blocks: int = 2,
    task_rows: int = TASK_ROWS,
) -> Iterator[pa.Table]:
    """The slices' rows as Arrow tables, in slice order, read by Ray Data tasks."""
    source = SliceDatasource(paths, slices, columns, task_rows)
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(source.groups)))
    ctx = ds.context  # per-dataset copy: these settings do not leak into other datasets
    ctx.execution_options.preserve_order = True  # reproducible order for a given (seed, epoch, rank)
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.enable_auto_log_stats = False
    it = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=max(1, prefetch_blocks))
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # shuts Ray's executor down when the consumer stops early
            close()


# --- local shuffle and fixed-size batches ------------------------------------------------------------
def _concat(parts: list[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rows(cols: Columns) -> int:
    return len(next(iter(cols.values())))


class LocalShuffle:
    """A rank's shuffle buffer (window: module docstring); ``rng=None`` passes rows through in order."""

    def __init__(self, capacity: int, rng: np.random.Generator | None):
        self.capacity = max(2, int(capacity))
        self.rng = rng
        self._parts: list[Columns] = []
        self._rows = 0

    def push(self, cols: Columns) -> Iterator[Columns]:
        if self.rng is None:
            yield cols
            return
        self._parts.append(cols)
        self._rows += _rows(cols)
        if self._rows >= self.capacity:
            buf = _concat(self._parts)
            perm = self.rng.permutation(self._rows)
            keep = self.capacity // 2
            out, rest = perm[: self._rows - keep], perm[self._rows - keep :]
            self._parts = [{k: v[rest] for k, v in buf.items()}]
            self._rows = keep
            yield {k: v[out] for k, v in buf.items()}

    def finish(self) -> Iterator[Columns]:
        if self._rows:
            buf = _concat(self._parts)
            assert self.rng is not None
            perm = self.rng.permutation(self._rows)
            yield {k: v[perm] for k, v in buf.items()}
        self._parts, self._rows = [], 0


class Rebatcher:
    """Cuts a stream of row chunks into chunks of exactly ``batch_size`` rows (the last may be short)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._parts: list[Columns] = []
        self._rows = 0

    def push(self, cols: Columns) -> Iterator[Columns]:
        self._parts.append(cols)
        self._rows += _rows(cols)
        if self._rows < self.batch_size:
            return
        buf = _concat(self._parts)
        n, b = self._rows, self.batch_size
        full = n - n % b
        for lo in range(0, full, b):
            yield {k: v[lo : lo + b] for k, v in buf.items()}
        self._parts = [{k: v[full:] for k, v in buf.items()}] if full < n else []
        self._rows = n - full

    def finish(self) -> Iterator[Columns]:
        if self._rows:
            yield _concat(self._parts)
        self._parts, self._rows = [], 0


# --- producer threads --------------------------------------------------------------------------------
class _End:
    def __repr__(self) -> str:
        return "END"


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


END = _End()  # what EpochStream.get returns after the last batch

# produce(source_done) -> batches: called on the producer thread; calls source_done() once the Ray
# iteration has ended (what is left is in memory), after which the queue stops bounding the producer.
Producer = Callable[[Callable[[], None]], Iterator[Any]]


class EpochStream:
    """One epoch's batches, produced by a daemon thread into a bounded queue.

    The bound (``maxsize``) holds while the source streams; after ``source_done`` the producer only turns
    rows already in memory (the shuffle buffer's tail) into batches, so it no longer waits for the
    consumer and the reader can start the next epoch's source.
    """

    def __init__(
        self,
        key: Hashable,
        produce: Producer,
        maxsize: int,
        on_source_done: Callable[[EpochStream], None] | None = None,
    ):
        self.key = key
        self._produce = produce
        self._maxsize = max(1, int(maxsize))
        self._on_source_done = on_source_done
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._bounded = True
        self.source_done = False
        self.finished = False  # the consumer received the end of the stream
        self._thread = threading.Thread(target=self._run, name=f"cstwa-input-{key}", daemon=True)
        self._thread.start()

    # producer side
    def _mark_source_done(self) -> None:
        with self._cond:
            self._bounded = False
            self.source_done = True
            self._cond.notify_all()
        if self._on_source_done is not None:
            self._on_source_done(self)

    def _put(self, item: Any, bounded: bool = True) -> bool:
        with self._cond:
            while bounded and self._bounded and len(self._items) >= self._maxsize and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        gen = self._produce(self._mark_source_done)
        try:
            for item in gen:
                if not self._put(item):
                    return
            self._put(END, bounded=False)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            self._put(_Failure(exc), bounded=False)
        finally:
            try:
                gen.close()  # closes the Ray iteration if the consumer stopped early
            except Exception:  # noqa: BLE001  (e.g. Ray already shut down at exit: nothing left to close)
                log.debug("closing input stream %r failed", self.key, exc_info=True)

    # consumer side
    def get(self) -> Any:
        """The next batch, or :data:`END` after the last one; raises the producer's exception."""
        with self._cond:
            while not self._items:
                if self._stopped:
                    raise RuntimeError(f"input stream {self.key!r} was stopped (a newer epoch was started)")
                if not self._thread.is_alive() and not self._items:
                    raise RuntimeError(f"input stream {self.key!r}: producer thread ended without a result")
                self._cond.wait(timeout=_POLL_S)
            item = self._items.popleft()
            self._cond.notify_all()
        if isinstance(item, _Failure):
            self.finished = True
            raise item.exc
        if item is END:
            self.finished = True
        return item

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._items.clear()
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Prefetcher:
    """The streams of one reader: the one being consumed and at most one started ahead of it.

    ``make(key)`` returns the producer of one epoch (no reference to the reader, so a reader that is
    dropped can be finalised). With ``lookahead``, when the consumed stream's source ends, the stream of
    ``next_key(key)`` is started (unless it is None); :meth:`prefetch` starts one explicitly (e.g. the
    next validation pass).
    """

    def __init__(
        self,
        make: Callable[[Hashable], Producer],
        maxsize: int,
        *,
        lookahead: bool,
        next_key: Callable[[Hashable], Hashable | None],
    ):
        self._make = make
        self._maxsize = maxsize
        self._lookahead = lookahead
        self._next_key = next_key
        self._lock = threading.Lock()
        self._current: EpochStream | None = None
        self._ahead: EpochStream | None = None
        self._closed = False

    def _start(self, key: Hashable) -> EpochStream:
        return EpochStream(key, self._make(key), self._maxsize, self._source_done)

    def _source_done(self, stream: EpochStream) -> None:
        with self._lock:
            if self._closed or not self._lookahead or stream is not self._current or stream.stopped:
                return
            if self._ahead is None:
                self._look_ahead(stream.key)

    def _look_ahead(self, key: Hashable) -> None:
        nxt = self._next_key(key)
        if nxt is not None:
            self._ahead = self._start(nxt)

    def open(self, key: Hashable) -> EpochStream:
        """The stream of ``key`` (the look-ahead one if it matches); stops any other stream."""
        with self._lock:
            if self._closed:
                raise RuntimeError("reader is closed")
            if self._current is not None:
                self._current.stop()
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.key == key and not ahead.stopped:
                stream = ahead
            else:
                if ahead is not None:
                    ahead.stop()
                stream = self._start(key)
            self._current = stream
            if self._lookahead and stream.source_done:
                self._look_ahead(key)
            return stream

    def prefetch(self, key: Hashable) -> None:
        """Starts ``key``'s stream in the background unless it is already the look-ahead one."""
        with self._lock:
            if self._closed or (self._ahead is not None and self._ahead.key == key):
                return
            if self._ahead is not None:
                self._ahead.stop()
            self._ahead = self._start(key)

    def release(self, stream: EpochStream) -> None:
        """The consumer is done with ``stream`` (finished or stopped early)."""
        stream.stop()
        with self._lock:
            if stream is self._current and not stream.source_done:
                self._current = None  # an early stop: nothing to look ahead from

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            streams = [s for s in (self._current, self._ahead) if s is not None]
            self._current = self._ahead = None
        for s in streams:
            s.stop()
        for s in streams:
            if not s.join(timeout):
                log.warning("input stream %r did not stop within %.0f s (daemon thread left)", s.key, timeout)
