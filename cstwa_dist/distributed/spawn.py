"""Start ``world`` local ranks of one process group, run a function on each, collect what it returns.

Why: the multi-rank code paths (DistributedModelParallel, the row-sharded graph, the distributed kNN)
only run for real in several processes sharing a process group. The 2-rank tests and the ``bench
knn`` / ``bench propagate`` benchmarks need that on one machine without ``torchrun``, with each
rank's return value back in the calling process and a failing rank's traceback as the error. This is
the one harness they share (in the spirit of TorchRec's ``MultiProcessTestBase``), so that the
environment a rank sees and the way a failure surfaces are written once.

What each rank gets:

* a fresh interpreter (the ``spawn`` start method: nothing forked from the caller, whose torch, Ray
  or OpenMP threads would not survive a fork);
* torchrun's variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (all ranks are
  local), ``MASTER_ADDR=127.0.0.1`` and a ``MASTER_PORT`` free at the time of the call;
* ``threads`` intra-op threads for torch and for Faiss (whose OpenMP pool is its own: left alone, every
  rank's Faiss would use every core);
* the default process group, from :func:`~cstwa_dist.distributed.env.init_distributed` with
  ``backend`` (``None``: what a real run picks, NCCL where CUDA is visible and rank ``r`` on GPU
  ``r``, else gloo). The function may call ``init_distributed()`` itself to get its
  :class:`~cstwa_dist.distributed.env.DistEnv`: the call is idempotent. After the function returns,
  the group is torn down with a barrier.

The function is called as ``fn(rank, world, *args)``; it and its arguments must be picklable (``fn``
defined at module level), and a calling script needs the ``if __name__ == "__main__":`` guard (each
rank re-imports it). Its return value is pickled in the rank with the standard pickler, so a
torch tensor travels as a copy rather than through torch's shared-memory hand-over (which needs the
sending process alive when the caller unpickles it), and an unpicklable result fails as that rank's
error instead of vanishing. Results travel through one pipe: return summaries and modest arrays, and
write bulk data to files.

Failures: when a rank raises, exits without a result (a crash, the kernel's OOM killer), or the ranks
are still running after ``timeout_s``, the other ranks are killed (they would wait in a collective
the failed rank never joins) and :class:`RankFailure` is raised with the rank's traceback or exit
status. A rank that returned but then failed to exit cleanly fails the call too: a gloo abort at
exit is a defect the caller should see.

Per-rank memory: each rank is a whole Python process that imports torch (and whatever ``fn``
imports) before touching any data, a few hundred MiB each; ``world`` ranks cost ``world`` times that,
which dominates any peak RSS a small run measures.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: how long the caller waits on the result queue between checks of the ranks' exit codes
_POLL_S = 0.5
#: a rank seen exited without a result gets this long for its report to come out of the pipe (an
#: exiting rank flushes its queue first, so the report is there by the next read or never)
_REPORT_GRACE_S = 2.0
#: ranks that all returned get this long to tear down their group and exit
_EXIT_GRACE_S = 30.0


class RankFailure(RuntimeError):
    """A spawned rank raised, died, or outlived the timeout; the message says which and holds its
    traceback (or exit status)."""


def set_threads(threads: int) -> None:
    """``threads`` intra-op threads for torch and, when it is installed, Faiss (separate pools)."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:  # a dependency of the project; a rank without it needs no Faiss threads
        return
    faiss.omp_set_num_threads(threads)


def spawn_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    threads: int = 1,
    timeout_s: float = 600.0,
    backend: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks of one process group; return the
    ranks' return values in rank order (see the module doc for what each rank gets).

    Raises :class:`RankFailure` when a rank raises, dies or runs past ``timeout_s`` (seconds for the
    whole call, start-up included).
    """
    from cstwa_dist.distributed.env import free_port

    if world < 1 or threads < 1:
        raise ValueError(f"need world >= 1 and threads >= 1, got world={world}, threads={threads}")
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world, port, threads, backend, reports, args),
            name=f"rank-{rank}",
        )
        for rank in range(world)
    ]
    name = getattr(fn, "__qualname__", repr(fn))
    logger.debug("spawning %d rank(s) of %s on port %d, %d thread(s) each", world, name, port, threads)
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for p in procs:
            p.start()
        _collect(procs, reports, results, failures, time.monotonic() + timeout_s, timeout_s)
    finally:
        _stop(procs, reports, results, failures)
    if failures:
        raise RankFailure(f"{name} on {world} rank(s) failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world)]


def _collect(
    procs: list[Any],
    reports: Any,
    results: dict[int, Any],
    failures: list[str],
    deadline: float,
    timeout_s: float,
) -> None:
    """Read reports until every rank returned or one failed; a rank's report is read before the rank
    is joined (a report larger than the pipe's buffer keeps its sender alive until it is read)."""
    exited_at: dict[int, float] = {}
    while len(results) < len(procs) and not failures:
        try:
            _take(reports.get(timeout=_POLL_S), results, failures)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank in results or p.exitcode is None:
                continue
            first = exited_at.setdefault(rank, now)
            if now - first > _REPORT_GRACE_S:
                failures.append(f"rank {rank} {_exit_status(p.exitcode)} without reporting a result")
        if not failures and now > deadline:
            running = [r for r in range(len(procs)) if r not in results]
            failures.append(f"rank(s) {running} still running after timeout_s={timeout_s:g} s (killed)")


def _take(report: tuple[int, bool, Any], results: dict[int, Any], failures: list[str]) -> None:
    rank, ok, payload = report
    if ok:
        results[rank] = pickle.loads(payload)
    else:
        failures.append(f"rank {rank} raised:\n{payload}")


def _stop(procs: list[Any], reports: Any, results: dict[int, Any], failures: list[str]) -> None:
    """Join the ranks: when all returned they get a grace period to exit; after a failure the rest
    are killed within a second (they may wait in a collective forever)."""
    failed = bool(failures) or len(results) < len(procs)
    deadline = time.monotonic() + (1.0 if failed else _EXIT_GRACE_S)
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    if failed:  # another rank's own traceback may have arrived meanwhile; read while its writer lives
        while True:
            try:
                report = reports.get_nowait()
            except queue.Empty:
                break
            if not report[1]:
                _take(report, results, failures)
    stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in stuck:
        procs[rank].kill()
        procs[rank].join()
    reports.close()
    if failed:
        return
    failures += [f"rank {r} returned but did not exit within {_EXIT_GRACE_S:g} s (killed)" for r in stuck]
    failures += [
        f"rank {r} returned but {_exit_status(p.exitcode)}"
        for r, p in enumerate(procs)
        if r not in stuck and p.exitcode != 0
    ]


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (SIGKILL: often the kernel's OOM killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {sig}{hint}"
    return f"exited with code {code}"


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    threads: int,
    backend: str | None,
    reports: Any,
    args: tuple[Any, ...],
) -> None:
    """One rank: torchrun's environment, the group, ``fn``, then one report (result or traceback)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        from cstwa_dist.distributed.env import init_distributed, shutdown_distributed

        set_threads(threads)
        init_distributed(backend=backend)
        payload = pickle.dumps(fn(rank, world, *args), protocol=pickle.HIGHEST_PROTOCOL)
        shutdown_distributed()
    except BaseException:
        reports.put((rank, False, traceback.format_exc()))
        raise
    reports.put((rank, True, payload))
