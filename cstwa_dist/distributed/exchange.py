"""Rows by global id from their owners: the exchange behind row-sharded propagation.

Why: the row-sharded Structure Migrator (docs/method.md §2, Eq. 9) multiplies a rank's rows of ``Â``
with the current table ``U``, and a row's neighbours may live on any rank. All-gathering ``U`` would
put ``N·d`` floats on every rank (5.4 GB at 30M users × 45); a :class:`RowFetcher` instead moves
exactly the distinct foreign rows a rank's graph rows reference, and nothing else, every layer.

Rows are owned in contiguous ranges ``[(lo_0, hi_0), …, (lo_{W−1}, hi_{W−1})]`` covering ``[0, N)`` in
rank order (the same list on every rank; uneven and empty ranges allowed), as in
:func:`~cstwa_dist.structure.ivf.distributed_knn`.

Protocol. At construction every rank

1. splits its sorted ``needed`` ids by owner (contiguous slices: ranges are in rank order),
2. all-gathers its per-owner request counts (``W`` ints per rank, the only collective), and
3. sends every owner its slice of ids and receives the ids it must serve, point-to-point.

A fetch then moves rows only, in ``W − 1`` pairwise rounds (the shift schedule of the kNN ring):
in round ``t`` rank ``r`` ``index_select``-s the rows rank ``r + t`` asked for and sends them, and
receives the rows it asked of rank ``r − t`` straight into their place in ``needed`` order. Ids never
travel again, so the per-layer traffic is ``(rows requested + rows served)·w`` elements. One peer per
round bounds the send buffer by the largest single peer's request instead of all of them, at the
cost of ``W − 1`` message latencies per fetch (small against the row volume at the sizes that need
sharding). Each round is batched (``batch_isend_irecv``: grouped on NCCL, plain isend/irecv on gloo),
so its two directions cannot deadlock; empty messages are skipped on both sides (both know every size).

Every rank must construct the fetcher and call :meth:`RowFetcher.fetch` (or ``fetch_window``) the
same number of times, with tables of the same width and dtype: these are collectives. Validation
failures are agreed on first (:func:`raise_together`), so a bad input on one rank raises on every rank
instead of leaving the others blocked in a receive.

**Per-rank memory** (``f`` rows requested, ``s`` rows served to all peers together, ``w`` width, ``b``
bytes per element): the request and serve id lists, ``8·(f + s)`` B, for the fetcher's lifetime;
``W²`` int64 once at construction; per fetch the result ``f·w·b`` (``fetch``; ``fetch_window`` writes
into the caller's window instead) and one send buffer at a time, ``max_p s_p·w·b`` for the largest
single peer's request ``s_p`` (``max_send_bytes`` records it), freed when the round ends. When
the rows live on another device than the one tensors travel on (gloo with CUDA tables), an extra
staging copy of the received ``f·w·b`` is made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["RowFetcher", "all_gather_ints", "check_ranges", "comm_device", "raise_together", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_ints(values: list[int], device: torch.device) -> list[int]:
    """Sums of a few ints over all ranks (the values themselves without a group)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def comm_device(device: torch.device | str | None = None) -> torch.device:
    """Where tensors travel for collectives: ``device`` if given, else the current CUDA device on an
    NCCL group and the CPU otherwise (gloo, or no group)."""
    if device is not None:
        return torch.device(device)
    rank, size = world()
    if size > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ranges(ranges: Sequence[tuple[int, int]], world_size: int) -> int:
    """Validate one contiguous ``[lo, hi)`` per rank covering ``[0, N)`` in rank order; return ``N``."""
    if len(ranges) != world_size:
        raise ValueError(f"need one row range per rank: {len(ranges)} ranges for {world_size} ranks")
    pos = 0
    for r, pair in enumerate(ranges):
        if len(pair) != 2:
            raise ValueError(f"rank {r}'s range {pair!r} is not a (lo, hi) pair")
        lo, hi = pair
        if isinstance(lo, bool) or isinstance(hi, bool) or int(lo) != lo or int(hi) != hi:
            raise ValueError(f"rank {r}'s range ({lo!r}, {hi!r}) must hold integers")
        if lo != pos or hi < lo:
            raise ValueError(f"ranges must be contiguous from 0 in rank order; rank {r} has [{lo}, {hi})")
        pos = int(hi)
    return pos


def raise_together(error: BaseException | None, device: torch.device | None = None) -> None:
    """Raise on every rank if any rank has an ``error`` (one all-reduce of one int; also a barrier).

    Why: a check that fails on one rank only would leave the others waiting in the next collective
    until the process-group timeout (30 min on gloo). The failing rank raises its own error; the others
    raise a ``RuntimeError`` that names the failing ranks. Without a process group: raises ``error``.
    """
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return
    flags = torch.zeros(size, dtype=torch.int64, device=comm_device(device))
    flags[rank] = int(error is not None)
    dist.all_reduce(flags)
    if error is not None:
        raise error
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if bad:
        raise RuntimeError(f"rank(s) {bad} failed a check of the same collective call; see their errors")


def all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's list of ``len(values)`` ints, in rank order (equal lengths on all ranks)."""
    rank, size = world()
    if size == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def _p2p(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> None:
    """Send ``sends[peer]`` and receive into ``recvs[peer]`` concurrently; empty tensors are skipped."""
    ops = [dist.P2POp(dist.isend, t, p) for p, t in sends.items() if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, p) for p, t in recvs.items() if t.numel()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _check_needed(needed: torch.Tensor, lo: int, hi: int, n_total: int) -> torch.Tensor:
    if not isinstance(needed, torch.Tensor):
        raise TypeError(f"needed must be a torch.Tensor of int64 ids, got {type(needed).__name__}")
    if needed.dim() != 1 or needed.dtype != torch.int64:
        raise ValueError(f"needed must be a 1-D int64 tensor, got {needed.dim()}-D {needed.dtype}")
    needed = needed.detach().to("cpu").contiguous()
    if needed.numel():
        if int(needed[0]) < 0 or int(needed[-1]) >= n_total:
            raise ValueError(
                f"needed ids must lie in [0, {n_total}); got {int(needed.min())}..{int(needed.max())}"
            )
        if needed.numel() > 1 and not bool((needed[1:] > needed[:-1]).all()):
            raise ValueError("needed ids must be sorted and unique (strictly increasing)")
        own = (needed >= lo) & (needed < hi)
        if bool(own.any()):
            raise ValueError(
                f"needed holds {int(own.sum())} id(s) this rank owns itself (range [{lo}, {hi})), "
                f"e.g. {int(needed[own][0])}"
            )
    return needed


class RowFetcher:
    """Fetches rows by global id from their owners. Collective: every rank constructs it and calls
    :meth:`fetch` (or :meth:`fetch_window`) the same number of times.

    ``needed`` are the global ids this rank wants and does not own (1-D int64, sorted, unique); the
    request lists are exchanged once here. ``device`` is where tensors travel (CPU for gloo, the rank's
    GPU for NCCL; ``None`` picks it from the group); fetched rows are returned on the device of the
    ``local`` table passed in. Accounting: ``rows_requested``, ``rows_served`` (per fetch),
    ``bytes_sent``, ``bytes_received``, ``comm_s``, ``fetches`` (cumulative), ``max_send_bytes``.
    See the module doc for the per-rank memory.
    """

    def __init__(
        self, ranges: Sequence[tuple[int, int]], needed: torch.Tensor, device: torch.device | None = None
    ) -> None:
        self.rank, self.world_size = world()
        self.n_total = check_ranges(ranges, self.world_size)
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.lo, self.hi = self.ranges[self.rank]
        self.device = comm_device(device)
        error: BaseException | None = None
        try:
            self.needed = _check_needed(needed, self.lo, self.hi, self.n_total)
        except (TypeError, ValueError) as e:
            error = e
        raise_together(error, self.device)

        his = torch.tensor([hi for _, hi in self.ranges], dtype=torch.int64)
        owner = torch.searchsorted(his, self.needed, right=True)
        self.recv_counts: list[int] = torch.bincount(owner, minlength=self.world_size).tolist()
        self.recv_offsets = [0] * (self.world_size + 1)
        for r, c in enumerate(self.recv_counts):
            self.recv_offsets[r + 1] = self.recv_offsets[r] + c
        #: requested ids below ``lo`` (owned by lower ranks): the window layout's split point
        self.below = self.recv_offsets[self.rank]

        matrix = all_gather_ints(self.recv_counts, self.device)  # matrix[s][r]: rows s wants from r
        self.serve_counts = [matrix[s][self.rank] for s in range(self.world_size)]
        sends = {
            r: self.needed[self.recv_offsets[r] : self.recv_offsets[r + 1]].to(self.device)
            for r in range(self.world_size)
            if r != self.rank
        }
        recvs = {
            s: torch.empty(self.serve_counts[s], dtype=torch.int64, device=self.device)
            for s in range(self.world_size)
            if s != self.rank
        }
        _p2p(sends, recvs)
        # Local row numbers each peer asked for, in the order it asked (its ``needed`` order).
        self._serve: dict[int, torch.Tensor] = {s: (t.cpu() - self.lo) for s, t in recvs.items() if t.numel()}
        self._serve_on: dict[torch.device, dict[int, torch.Tensor]] = {}

        self.rows_requested = int(self.needed.numel())
        self.rows_served = int(sum(self.serve_counts))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.comm_s = 0.0
        self.fetches = 0
        self.max_send_bytes = 0
        logger.debug(
            "rank %d: fetcher requests %d rows %s, serves %d rows %s",
            self.rank,
            self.rows_requested,
            self.recv_counts,
            self.rows_served,
            self.serve_counts,
        )

    # --- accounting ---------------------------------------------------------------------------

    def index_bytes(self) -> int:
        """Bytes of the id lists this fetcher keeps (requests and serve lists), for memory reports."""
        return 8 * (self.rows_requested + self.rows_served)

    def stats(self) -> dict[str, float]:
        """Cumulative counters, JSON-ready."""
        return {
            "rows_requested": self.rows_requested,
            "rows_served": self.rows_served,
            "fetches": self.fetches,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "comm_s": self.comm_s,
            "max_send_bytes": self.max_send_bytes,
        }

    # --- fetching -----------------------------------------------------------------------------

    def _check_local(self, local: torch.Tensor) -> None:
        if not isinstance(local, torch.Tensor) or local.dim() != 2:
            raise ValueError(f"local must be a 2-D tensor [rows, w], got {getattr(local, 'shape', local)!r}")
        if local.shape[0] != self.hi - self.lo:
            raise ValueError(
                f"rank {self.rank}: local has {local.shape[0]} rows, its range [{self.lo}, {self.hi}) "
                f"needs {self.hi - self.lo}"
            )

    def _serve_index(self, device: torch.device) -> dict[int, torch.Tensor]:
        if device not in self._serve_on:
            self._serve_on[device] = {s: t.to(device) for s, t in self._serve.items()}
        return self._serve_on[device]

    def _exchange(self, local: torch.Tensor, dests: dict[int, torch.Tensor]) -> None:
        """Serve the rows each peer asked for; receive owner ``r``'s block into ``dests[r]``.

        Round ``t = 1 … W−1``: send to ``rank + t``, receive from ``rank − t`` (so the pairs match),
        one send buffer alive at a time.
        """
        t0 = time.perf_counter()
        serve = self._serve_index(local.device)
        for t in range(1, self.world_size):
            dst_rank, src_rank = (self.rank + t) % self.world_size, (self.rank - t) % self.world_size
            sends: dict[int, torch.Tensor] = {}
            if dst_rank in serve:
                rows = local.index_select(0, serve[dst_rank])
                sends[dst_rank] = rows if rows.device == self.device else rows.to(self.device)
            dest = dests[src_rank]
            if dest.device == self.device and dest.is_contiguous():
                buf = dest
            else:  # staged: gloo with CUDA tables, or a non-contiguous destination
                buf = torch.empty(dest.shape, dtype=dest.dtype, device=self.device)
            _p2p(sends, {src_rank: buf})
            if buf is not dest:
                dest.copy_(buf)
            send_bytes = sum(x.numel() * x.element_size() for x in sends.values())
            self.max_send_bytes = max(self.max_send_bytes, send_bytes)
            self.bytes_sent += send_bytes
            self.bytes_received += buf.numel() * buf.element_size()
            del sends
        self.comm_s += time.perf_counter() - t0
        self.fetches += 1

    def fetch(self, local: torch.Tensor) -> torch.Tensor:
        """The ``needed`` rows, ``[len(needed), w]`` in ``needed`` order, on ``local``'s device.

        ``local`` is this rank's own rows ``[hi − lo, w]`` (any dtype; the same width and dtype on
        every rank); the rows other ranks asked for are served from it in the same call.
        """
        self._check_local(local)
        out = torch.empty((self.rows_requested, local.shape[1]), dtype=local.dtype, device=local.device)
        dests = {
            r: out[self.recv_offsets[r] : self.recv_offsets[r + 1]]
            for r in range(self.world_size)
            if r != self.rank
        }
        self._exchange(local, dests)
        return out

    def window_rows(self) -> int:
        """Rows of the window :meth:`fetch_window` fills: own rows plus requested rows."""
        return self.rows_requested + (self.hi - self.lo)

    def fetch_window(self, local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``needed ∪ [lo, hi)`` in global-id order, ``[window_rows(), w]``.

        Layout: ``[needed < lo ‖ local ‖ needed ≥ hi]``. Why this order rather than ``[local ‖
        fetched]``: a CSR whose columns are remapped into it keeps each row's columns in the same
        (sorted global) order as the full graph, so a sharded product sums every row's terms in the
        same order as the single-process reference. Foreign rows are received straight into their
        slots (no separate ``f·w`` result); ``out`` (same dtype and device as ``local``) is reused
        across layers when given.
        """
        self._check_local(local)
        shape = (self.window_rows(), local.shape[1])
        if out is None:
            out = torch.empty(shape, dtype=local.dtype, device=local.device)
        elif tuple(out.shape) != shape or out.dtype != local.dtype or out.device != local.device:
            raise ValueError(
                f"out must be {shape} {local.dtype} on {local.device}, got {tuple(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
        n_own = self.hi - self.lo
        out[self.below : self.below + n_own].copy_(local)
        dests = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            shift = 0 if r < self.rank else n_own
            dests[r] = out[self.recv_offsets[r] + shift : self.recv_offsets[r + 1] + shift]
        self._exchange(local, dests)
        return out
