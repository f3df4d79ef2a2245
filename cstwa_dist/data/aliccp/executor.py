"""Runs chunk tasks in order: in this process, or as Ray tasks with a bounded window in flight.

Why Ray core tasks with a window rather than ``ray.data``: results must come back in chunk order (line
numbers, the quarantine and the writer depend on it), and a bounded window keeps at most ``2 x CPUs``
results in memory while every core stays busy. The driver consumes the same ordered stream whatever runs
the tasks, so the parallel and the single-process imports write identical files.

Ray (and the runtime, which brings torch along) is imported only when ``parallel`` is set: a small import
costs no Ray start-up (2-3 s, ~2.5 GB), see ``docs/platform-notes.md``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cstwa_dist.data.aliccp.chunks import Chunk

ChunkFn = Callable[[str, Chunk, Any], dict[str, Any]]


class ChunkExecutor(contextlib.AbstractContextManager["ChunkExecutor"]):
    """``fn(mode, chunk, ctx)`` over chunks, results in chunk order; a context manager that holds a Ray
    runtime (attached or private, :class:`cstwa_dist.runtime.RayRuntime`) while parallel.

    ``fn`` must be a module-level function (Ray ships it by reference); every result is a dict with an
    ``rss`` entry (the peak RSS of the process that ran it), from which :attr:`worker_rss` is kept.
    """

    def __init__(self, fn: ChunkFn, parallel: bool) -> None:
        self.fn = fn
        self.parallel = parallel
        self.worker_rss = 0.0
        self.window = 1
        self._stack = contextlib.ExitStack()
        self._ray: Any = None
        self._remote: Any = None

    def __enter__(self) -> ChunkExecutor:
        if self.parallel:
            import ray

            from cstwa_dist.runtime import RayRuntime

            self._stack.enter_context(RayRuntime())
            self._ray = ray
            self._remote = ray.remote(num_cpus=1)(self.fn)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.window = max(2, 2 * cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def map(self, mode: str, chunks: Iterable[Chunk], ctx: Any) -> Iterator[dict[str, Any]]:
        """Results of ``fn(mode, chunk, ctx)`` in chunk order; ``chunks`` is consumed lazily (a gzip
        file's chunks carry their bytes, so only the window's are in memory)."""
        if not self.parallel:
            for c in chunks:
                yield self.fn(mode, c, ctx)
            return
        ray = self._ray
        ctx_ref = ray.put(ctx)  # the common table crosses to the workers once, zero-copy for arrays
        pending: deque[Any] = deque()
        try:
            for c in chunks:
                pending.append(self._remote.remote(mode, c, ctx_ref))
                if len(pending) >= self.window:
                    yield self._take(pending.popleft())
            while pending:
                yield self._take(pending.popleft())
        finally:
            for ref in pending:  # strict mode stopped early: do not leave work running
                ray.cancel(ref)

    def _take(self, ref: Any) -> dict[str, Any]:
        result = self._ray.get(ref)
        self.worker_rss = max(self.worker_rss, result["rss"])
        return result
