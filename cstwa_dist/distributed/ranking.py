"""The exact evaluation report of a split computed where the rows are: no rank gathers them all.

Why: ``Trainer.evaluate`` used to gather every test prediction on rank 0 and compute the report
(``cstwa_dist.train.metrics.evaluation_report``) there. At 44M test rows that is 1 GB of columns on
rank 0 plus 3–4 GB of float64 sort temporaries, while the other ranks wait. The numbers need a
*global* view (a rank's AUC is not the split's AUC; a user's rows sit on several ranks), but not one
place: each metric is a sum once the rows are arranged right, and arranging them needs only
exchanges of each rank's share.

The collectives live here (``route_by_score``, ``run_extents``, the exchanges); the report that
assembles them with the metrics' formulas is ``cstwa_dist.train.evaluation.distributed_evaluation_report``,
which gives, on every rank, the same dict (keys, types, values to
float rounding; integers exactly) as ``evaluation_report`` of the ranks' columns concatenated in rank
order. Per task (click, purchase):

* **Global sort by score** (AUC and calibration): a sample sort. Each rank sorts its rows stably by
  score and contributes ``8·W`` samples of the key ``(score, rank, position)``, all-gathered
  (weighted by the rows each sample stands for). ``W − 1`` splitters cut the key space into one
  range per rank; every row goes to the rank owning its key (``all_to_all_single`` of the scores and
  labels), which sorts what it receives stably, so its rows are a contiguous run of the global order
  ``(score, source rank, source position)`` — exactly the *stable* sort of the rank-ordered
  concatenation that ``calibration`` bins. The key is unique, so no score value, however often it
  repeats, can overload one rank: a range holds at most ``R/W + 2·(R/(8W) + W)`` rows. A run of tied
  scores may then span ranks; one all-gather of each rank's first and last score and the lengths of
  its first and last run lets every rank extend its boundary runs to their global extent, so tied
  scores share their global average rank (Mann–Whitney). The positives' rank sum (exact in float64:
  halves up to 2^52), the counts and the 10 equal-count bins' sums (a bin is a range of global
  positions, known from the exclusive prefix of the ranges' sizes) are then all-reduced in float64.
* **GAUC**: every row goes to the rank ``hash(user) mod W`` (one ``all_to_all_single`` per column,
  both tasks at once), which computes ``Σ n_u·AUC_u``, ``Σ n_u`` and the user counts of the users it
  owns with ``metrics.group_auc_sums`` (the single-process code); four numbers per task are summed.
* **Log loss, means**: local sums, all-reduced.

Every rank must call it (it is a collective) with columns of the same names. A rank with no rows
joins with empty columns. One rank (``W = 1``) runs ``evaluation_report`` itself.

**Per-rank memory** (``n`` own rows, ``m ≤ n + n/4 + 2W`` rows after the score routing, ``m'``
rows of the users this rank owns after the user routing, ``≈ n`` unless a few users own a large
share of the rows): the caller's columns (``24·n`` B from ``predict``) plus, one phase at a time,
``≈ 8·n + 49·m`` B for a task's sort and ``≈ 16·n + 110·m'`` B for the GAUC step (the received
columns and ``group_auc_sums``' sort temporaries); ``W·8W`` sample keys and a few ``W``-sized
vectors. No ``O(R)`` array on any rank.
:func:`evaluation_bytes_per_rank` turns this into one number.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist

from cstwa_dist.distributed.exchange import world

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather_rows",
    "all_reduce_sums",
    "evaluation_bytes_per_rank",
    "exchange_column",
    "receive_counts",
    "route_by_score",
    "run_extents",
    "samples_per_rank",
]


def samples_per_rank(world_size: int) -> int:
    """Splitter samples each rank contributes: ``8·W`` bounds a score range to ``R/W + R/(4W) + 2W``
    rows (each sample stands for at most ``n_r/(8W) + 1`` rows of its rank)."""
    return 8 * world_size


def evaluation_bytes_per_rank(rows: int, world_size: int) -> int:
    """Peak bytes one rank holds for an evaluation pass of ``rows`` test rows over ``world_size`` ranks.

    The caller's prediction columns (``24`` B per own row: four float32 columns and the int64 user)
    plus the larger of the two phases in the module doc: a task's global sort (``8·n + 49·m`` B, ``m``
    the bound on a score range) and the GAUC step (``16·n + 110·n`` B for users spread evenly by the
    hash), plus the splitter samples. ``world_size = 1`` is the in-memory report on all rows. An
    upper estimate: on the demo test split (100k rows, 2 ranks, 62.5k and 37.5k own rows)
    ``tracemalloc`` measured at most 6.6 MB per rank (own columns included); this gives 7.5 MB.
    """
    if rows < 0 or world_size < 1:
        raise ValueError(f"need rows >= 0 and world_size >= 1, got {rows}, {world_size}")
    n = math.ceil(rows / world_size)
    m = n + n // 4 + 2 * world_size if world_size > 1 else n
    sort_phase = 8 * n + 49 * m
    gauc_phase = 16 * n + 110 * n
    samples = 32 * world_size * samples_per_rank(world_size)
    return 24 * n + max(sort_phase, gauc_phase) + samples


# --- collectives on numpy columns -----------------------------------------------------------------
def all_gather_rows(values: np.ndarray, device: torch.device) -> np.ndarray:
    """``[W, *values.shape]``: every rank's ``values`` (same shape and dtype on every rank)."""
    t = torch.from_numpy(np.ascontiguousarray(values)).to(device)
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t)
    return np.stack([p.cpu().numpy() for p in parts])


def all_reduce_sums(values: np.ndarray, device: torch.device) -> np.ndarray:
    """Float64 sums over ranks."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def exchange_column(col: np.ndarray, send: np.ndarray, recv: np.ndarray, device: torch.device) -> np.ndarray:
    """``all_to_all_single``: ``col``'s consecutive slices of ``send[p]`` rows go to rank ``p``; the
    result holds the ``recv[p]`` rows from each rank ``p`` in rank order. On the CPU the result is a
    numpy buffer (so ``tracemalloc`` sees it, as every other array of a pass)."""
    inp = torch.from_numpy(np.ascontiguousarray(col))
    if device.type == "cpu":
        out_np = np.empty(int(recv.sum()), dtype=col.dtype)
        dist.all_to_all_single(torch.from_numpy(out_np), inp, recv.tolist(), send.tolist())
        return out_np
    out = torch.empty(int(recv.sum()), dtype=inp.dtype, device=device)
    dist.all_to_all_single(out, inp.to(device), recv.tolist(), send.tolist())
    return out.cpu().numpy()


def receive_counts(send: np.ndarray, device: torch.device) -> np.ndarray:
    """Rows each rank will send this rank, from every rank's ``send`` counts (one all-to-all of ``W``
    int64)."""
    out = torch.empty(send.size, dtype=torch.int64, device=device)
    dist.all_to_all_single(out, torch.from_numpy(send.astype(np.int64)).to(device))
    return out.cpu().numpy()


# --- the global sort by score ---------------------------------------------------------------------
def route_by_score(
    s: np.ndarray, y: np.ndarray, n_all: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's range of the global stable order by score: its scores and labels, in that order.

    The rows of all ranks, sorted by ``(score, source rank, source position)``, are cut into ``W``
    contiguous ranges at ``W − 1`` splitter keys picked from the samples; range ``r`` goes to rank
    ``r``. Memory: the sorted copy of the own ``n`` rows (``order``, then ``s``/``y``) and the ``m``
    received rows with their sort (see the module doc).
    """
    rank, size = world()
    n, total = s.size, int(n_all.sum())
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    del order
    k = samples_per_rank(size)
    pos = (np.arange(k, dtype=np.int64) * n) // k
    keys = np.zeros(k, dtype=np.float64) if n == 0 else s[pos].astype(np.float64)
    all_keys = all_gather_rows(keys, device)  # [W, k]
    all_pos = all_gather_rows(pos, device)
    # a sample stands for the rows from its position to its rank's next sample
    weight = np.concatenate([all_pos[:, 1:], n_all[:, None]], axis=1) - all_pos
    src = np.repeat(np.arange(size, dtype=np.int64), k)
    keys_f, pos_f, weight_f = all_keys.ravel(), all_pos.ravel(), weight.ravel()
    keep = weight_f > 0
    keys_f, pos_f, weight_f, src = keys_f[keep], pos_f[keep], weight_f[keep], src[keep]
    o = np.lexsort((pos_f, src, keys_f))
    keys_f, pos_f, src = keys_f[o], pos_f[o], src[o]
    below = np.cumsum(weight_f[o]) - weight_f[o]  # ≈ rows whose key is below each sample's
    pick = np.searchsorted(below, np.arange(1, size) * (total / size), side="left")
    cuts = np.full(size - 1, n, dtype=np.int64)  # a splitter past every sample: its range is empty
    ok = pick < keys_f.size
    pk = pick[ok]
    sp_key = keys_f[pk].astype(s.dtype)  # exact: the sample came from this dtype
    right = np.searchsorted(s, sp_key, side="right")  # ranks below the splitter's: ties go left
    left = np.searchsorted(s, sp_key, side="left")  # ranks above: ties go right
    cuts[ok] = np.where(src[pk] < rank, left, np.where(src[pk] > rank, right, pos_f[pk]))
    send = np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int64)
    if (send < 0).any():  # the splitters are sorted, so this cannot happen unless scores are not comparable
        raise RuntimeError(f"rank {rank}: score ranges out of order (cuts {cuts.tolist()}); NaN scores?")
    recv = receive_counts(send, device)
    rs = exchange_column(s, send, recv, device)
    del s
    ry = exchange_column(y, send, recv, device)
    del y
    o2 = np.argsort(rs, kind="stable")  # received blocks are in source-rank order, each sorted
    return rs[o2], ry[o2]


def run_extents(rs: np.ndarray, off: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Global ``[start, end)`` positions of this rank's runs of equal scores, boundary runs extended
    over the neighbouring ranks that hold the same score (one all-gather of 5 floats per rank)."""
    rank, size = world()
    m = rs.size
    if m:
        starts = np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]])
        ends = np.r_[starts[1:], m]
        info = np.array([m, rs[0], rs[-1], ends[0] - starts[0], ends[-1] - starts[-1]], dtype=np.float64)
    else:
        starts = ends = np.zeros(0, dtype=np.int64)
        info = np.array([0, 0, 0, 0, 0], dtype=np.float64)
    infos = all_gather_rows(info, device)  # [W, 5]: rows, first, last, first run, last run
    counts = infos[:, 0].astype(np.int64)
    offs = np.concatenate([[0], np.cumsum(counts)])
    gs, ge = starts + off, ends + off
    if m:
        first, last = rs[0].astype(np.float64), rs[-1].astype(np.float64)
        for r in range(rank - 1, -1, -1):  # the first run continues on lower ranks?
            if counts[r] == 0:
                continue
            if infos[r, 2] != first:
                break
            if infos[r, 1] == first:  # the whole of rank r is this score
                gs[0] = offs[r]
                continue
            gs[0] = offs[r + 1] - int(infos[r, 4])
            break
        for r in range(rank + 1, size):  # the last run continues on higher ranks?
            if counts[r] == 0:
                continue
            if infos[r, 1] != last:
                break
            if infos[r, 2] == last:
                ge[-1] = offs[r + 1]
                continue
            ge[-1] = offs[r] + int(infos[r, 3])
            break
    return gs, ge
