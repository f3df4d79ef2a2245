"""The exact metrics of a split computed by all ranks together (``Trainer.evaluate``), from each rank's
own predictions: the report of :func:`cstwa_dist.train.metrics.evaluation_report` over every rank's rows,
without gathering them. The distributed sort, routing and sums are :mod:`cstwa_dist.distributed.ranking`'s
(which also states the per-rank memory: ``O(rows / W)``); the formulas are :mod:`cstwa_dist.train.metrics`'s,
the ones the single-process report uses, so both give the same numbers (to 1e-9; ints exactly).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from cstwa_dist.distributed import ranking
from cstwa_dist.distributed.exchange import comm_device, raise_together, world
from cstwa_dist.train import metrics

logger = logging.getLogger(__name__)

__all__ = ["distributed_evaluation_report"]

#: float dtypes a score or label column may have, by the code ranks exchange (0: another dtype)
_CODES: tuple[type[np.generic], ...] = (
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.uint8,
    np.int32,
    np.int64,
)
#: rows per chunk of the log-loss sum (bounds its float64 temporaries)
_CHUNK = 1 << 20


def _sorted_sums(
    s: np.ndarray, y: np.ndarray, n_all: np.ndarray, bins: int, device: torch.device
) -> np.ndarray:
    """This rank's share of ``[rank sum of positives, positives, bin rows…, bin Σp…, bin Σy…]``."""
    rank, _ = world()
    total = int(n_all.sum())
    rs, ry = ranking.route_by_score(s, y, n_all, device)
    m = rs.size
    m_all = ranking.all_gather_rows(np.array([m], dtype=np.int64), device)[:, 0]
    off = int(m_all[:rank].sum())
    gs, ge = ranking.run_extents(rs, off, device)
    out = np.zeros(2 + 3 * bins, dtype=np.float64)
    if m:
        starts = gs - off
        starts[0] = 0
        pos_run = np.add.reduceat((ry != 0).astype(np.int64), starts)
        out[0] = float(((gs + ge + 1) / 2.0 * pos_run).sum())  # tie-averaged 1-based ranks
        out[1] = float(pos_run.sum())
    bounds = np.concatenate([[0], np.cumsum(metrics.bin_sizes(total, bins))])
    for b in range(bins):
        a, c = (int(np.clip(x - off, 0, m)) for x in (bounds[b], bounds[b + 1]))
        out[2 + b] = c - a
        out[2 + bins + b] = rs[a:c].sum(dtype=np.float64)
        out[2 + 2 * bins + b] = ry[a:c].sum(dtype=np.float64)
    return out


# --- the report -----------------------------------------------------------------------------------
def _dtype_code(a: np.ndarray | None) -> int:
    if a is None:
        return -1
    for i, t in enumerate(_CODES):
        if a.dtype == t:
            return i + 1
    return 0


def _agreed_dtype(codes: np.ndarray) -> np.dtype:
    """The dtype ``np.concatenate`` gives the ranks' columns (``float64`` for unknown codes)."""
    present = [np.dtype(_CODES[c - 1]) if c > 0 else np.dtype(np.float64) for c in codes if c >= 0]
    return np.result_type(*present) if present else np.dtype(np.float32)


def _routable(dtype: np.dtype) -> np.dtype:
    """The dtype a column travels in: its own when floating (ties and values kept exactly), else
    float64 (what the metrics cast integers and booleans to anyway)."""
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _loglik_sum(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    """``metrics.log_likelihood_sum`` in chunks of ``_CHUNK`` rows (bounded float64 temporaries)."""
    return sum(
        metrics.log_likelihood_sum(y[a : a + _CHUNK].astype(np.float64), p[a : a + _CHUNK], eps)
        for a in range(0, y.size, _CHUNK)
    )


def _user_owner(users: np.ndarray, size: int) -> np.ndarray:
    """The rank owning each user: a multiplicative hash of the id, so that ids with a stride (e.g. all
    even) still spread over the ranks."""
    h = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
    return ((h >> np.uint64(32)) % np.uint64(size)).astype(np.int64)


def _check_columns(pred: dict[str, np.ndarray], names: list[str]) -> int:
    """This rank's row count; raises when its columns are not 1-D or differ in length."""
    sizes = {}
    for k in names:
        if k in pred:
            a = np.asarray(pred[k])
            if a.ndim != 1:
                raise ValueError(f"rank {world()[0]}: prediction column {k!r} must be 1-D, got {a.shape}")
            sizes[k] = a.size
    if len(set(sizes.values())) > 1:
        raise ValueError(f"rank {world()[0]}: prediction columns differ in length: {sizes}")
    return next(iter(sizes.values()), 0)


def distributed_evaluation_report(
    pred: dict[str, np.ndarray], device: torch.device | None = None, bins: int = metrics.CALIBRATION_BINS
) -> dict[str, Any]:
    """``evaluation_report`` of all ranks' rows, on every rank, without gathering them (collective).

    ``pred``: this rank's columns as ``predict`` returns them — ``click``/``purchase`` labels,
    ``p_click`` and (two-task models) ``p_purchase`` probabilities, ``user`` ids; empty arrays on a
    rank without rows (a rank without rows may also leave columns out). The result equals
    ``evaluation_report`` of the columns concatenated in rank order: integers exactly, floats to
    rounding (sums in another order). Per-rank memory: see the module doc.
    """
    rank, size = world()
    if size == 1:
        return metrics.evaluation_report(pred)
    device = comm_device(device)
    names = ["click", "purchase", "p_click", "p_purchase", "user"]
    error: BaseException | None = None
    n = 0
    try:
        n = _check_columns(pred, names)
    except ValueError as e:
        error = e
    raise_together(error, device)
    meta = np.array(
        [n, *(_dtype_code(pred.get(k)) for k in names)],
        dtype=np.int64,
    )
    metas = ranking.all_gather_rows(meta, device)  # [W, 6]
    n_all = metas[:, 0]
    total = int(n_all.sum())
    present = {k: bool((metas[:, 1 + i] >= 0).any()) for i, k in enumerate(names)}
    dtypes = {k: _agreed_dtype(metas[:, 1 + i]) for i, k in enumerate(names)}
    # the same check on every rank, from the gathered metadata: all raise together or none
    missing = [k for k in ("click", "p_click") if not present[k]]
    if missing or (present["p_purchase"] and not present["purchase"]):
        raise ValueError(f"no rank has the prediction column(s) {missing or ['purchase']}")
    for i, k in enumerate(names):
        lacking = [r for r in range(size) if present[k] and metas[r, 1 + i] < 0 and n_all[r] > 0]
        if lacking:
            raise ValueError(f"rank(s) {lacking} hold rows but no {k!r} column, which other ranks have")

    def col(k: str, dtype: np.dtype | None = None) -> np.ndarray:
        a = np.asarray(pred[k]) if k in pred else np.zeros(0, dtype=dtypes[k])
        return a.astype(dtype if dtype is not None else _routable(dtypes[k]), copy=False)

    tasks = [t for t in metrics.TASKS if present[f"p_{t}"]]
    if total == 0:  # nothing to exchange: the report of empty columns
        empty = {k: np.zeros(0, dtype=dtypes[k]) for k in names if present[k]}
        return metrics.evaluation_report(empty)

    # sums: [rank sum, positives, bins…] from the global sort, then [log lik, Σp, Σy] per task
    sums: list[np.ndarray] = []
    for t in tasks:
        y, s = col(t), col(f"p_{t}")
        local = _sorted_sums(s, y, n_all, bins, device)
        eps = metrics.logloss_eps(dtypes[f"p_{t}"])
        extra = [_loglik_sum(y, s, eps), s.sum(dtype=np.float64), y.sum(dtype=np.float64)]
        sums.append(np.concatenate([local, extra]))
    gauc: dict[str, np.ndarray] = {}
    if present["user"]:
        gauc = _gauc_sums(col, tasks, n, device)
    reduced = ranking.all_reduce_sums(np.concatenate(sums + [gauc[t] for t in tasks if t in gauc]), device)

    out: dict[str, Any] = {"rows": total}
    width = 2 + 3 * bins + 3
    for i, t in enumerate(tasks):
        v = reduced[i * width : (i + 1) * width]
        n_pos = int(round(v[1]))
        if (n_pos == 0 or n_pos == total) and rank == 0:
            logger.warning("AUC undefined: %d positives, %d negatives", n_pos, total - n_pos)
        out[f"{t}_auc"] = metrics.auc_from_rank_sum(float(v[0]), n_pos, total - n_pos)
        if gauc:
            g = reduced[len(tasks) * width + 4 * i : len(tasks) * width + 4 * (i + 1)]
            for k, x in metrics.gauc_from_sums(
                float(g[0]), float(g[1]), int(round(g[2])), int(round(g[3]))
            ).items():
                out[f"{t}_{k}"] = x
        cal = metrics.calibration_from_sums(
            total,
            float(v[-3]),
            float(v[-2]),
            float(v[-1]),
            np.rint(v[2 : 2 + bins]).astype(np.int64),
            v[2 + bins : 2 + 2 * bins],
            v[2 + 2 * bins : 2 + 3 * bins],
        )
        for k, x in cal.items():
            out[f"{t}_{k}"] = x
    if "purchase" not in tasks:
        out["purchase_auc"] = None
    return out


def _gauc_sums(col: Any, tasks: list[str], n: int, device: torch.device) -> dict[str, np.ndarray]:
    """Per task ``[Σ n_u·AUC_u, Σ n_u, users used, users]`` of the users this rank owns, after
    routing every row to ``hash(user) mod W`` (one column at a time: the sender holds one permuted
    copy besides the ``order``)."""
    _, size = world()
    users = col("user", np.dtype(np.int64))
    owner = _user_owner(users, size)
    order = np.argsort(owner, kind="stable")
    send = np.bincount(owner, minlength=size).astype(np.int64)
    del owner
    recv = ranking.receive_counts(send, device)
    got: dict[str, np.ndarray] = {"user": ranking.exchange_column(users[order], send, recv, device)}
    for t in tasks:
        got[t] = ranking.exchange_column(col(t)[order], send, recv, device)
        got[f"p_{t}"] = ranking.exchange_column(col(f"p_{t}")[order], send, recv, device)
    del order
    out = {}
    for t in tasks:
        num, den, used, groups = metrics.group_auc_sums(got[t], got[f"p_{t}"], got["user"])
        out[t] = np.array([num, den, used, groups], dtype=np.float64)
    return out
