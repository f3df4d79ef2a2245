"""Cosine k-nearest-neighbour search for mining latent structure (docs/method.md §1, Eq. 3-4).

Similarity is cosine, computed as an inner product on L2-normalised rows with a Faiss flat index:
exact search is the reference every approximate (IVF) graph is measured against, so these helpers
stay plain and single-process. Faiss ships no type hints; the functions here add them at the edge.

**Decision (docs/method.md §1.4):** a node's own row counts among its ``k`` neighbours. Search alone does
not guarantee that: duplicate rows tie with self at score 1 (and float rounding may rank a duplicate
first), and a zero-norm row scores 0 against every row, so Faiss returns arbitrary ids for it.
:func:`exact_knn` therefore places self in slot 0 of every row (see there for the exact rule).
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ensure_self_first", "exact_knn", "knn_recall", "l2_normalise"]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as float32 with unit-L2-norm rows, so inner products are cosines.

    Rows with zero norm stay zero rather than becoming NaN: an entity whose representation is all
    zeros (e.g. an embedding row never trained) then has cosine 0 with everything and, after Eq. 4
    clamps and drops zeros, no edges at all, which is what "zero-degree rows stay zero" (Eq. 5) needs.
    The norm is accumulated in float64 so that tiny or huge rows do not under/overflow in float32.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array [N, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"expected a numeric array, got dtype {x.dtype}")
    x64 = x.astype(np.float64, copy=False)
    if not np.isfinite(x64).all():
        raise ValueError("input contains NaN or infinite values")
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    safe = np.where(norms > 0.0, norms, 1.0)
    return np.ascontiguousarray(x64 / safe, dtype=np.float32)


def ensure_self_first(
    scores: np.ndarray, indices: np.ndarray, self_ids: np.ndarray, self_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Put each query's own id in slot 0 of its neighbour list, keeping the others' order.

    If self is among the ``k`` results it moves to the front (its score unchanged). If it is not
    (ties with duplicates, a zero-norm row, or an approximate index that missed it), the lowest-ranked
    result is dropped and self enters slot 0 with ``self_scores`` (its cosine with itself: 1, or 0 for
    a zero row). Slot 0 stays the highest score up to float rounding: self has cosine 1, the maximum,
    and a zero row has score 0 in every slot. Inputs are not modified.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    indices = np.array(indices, dtype=np.int64, copy=True)
    self_ids = np.asarray(self_ids, dtype=np.int64)
    if scores.shape != indices.shape or scores.ndim != 2 or scores.shape[0] != self_ids.shape[0]:
        raise ValueError(
            f"shape mismatch: scores {scores.shape}, indices {indices.shape}, ids {self_ids.shape}"
        )
    k = indices.shape[1]
    if k == 0:
        return scores, indices
    has_self = (indices == self_ids[:, None]).any(axis=1)
    missing = ~has_self
    if missing.any():
        indices[missing, k - 1] = self_ids[missing]
        scores[missing, k - 1] = np.asarray(self_scores, dtype=np.float32)[missing]
    # Stable sort on a key that is -1 at self and the slot number elsewhere: self first, rest in order.
    key = np.where(indices == self_ids[:, None], -1, np.arange(k, dtype=np.int64)[None, :])
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def exact_knn(
    x: np.ndarray, k: int, *, batch_size: int = 65536, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of every row of ``x`` against all rows (self included).

    Returns ``(scores [N, k] float32, indices [N, k] int64)``, each row in descending score order with
    the query's own id in slot 0 (docs/method.md §1.4 Decision; :func:`ensure_self_first`). ``k`` larger
    than ``N`` is clipped to ``N`` with a warning, because a complete graph is the most a row can have.

    Queries run in chunks of ``batch_size`` rows so that Faiss's [batch, k] result buffers and the
    per-chunk log stay bounded; each chunk logs rows done and rows/s (at INFO with ``progress``,
    DEBUG otherwise), since exact search at 1M rows takes tens of minutes (docs/platform-notes.md).
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    xn = l2_normalise(x)
    n, d = xn.shape
    if n == 0 or d == 0:
        raise ValueError(f"need at least one row and one column, got shape {xn.shape}")
    k = int(k)
    if k > n:
        logger.warning("k=%d exceeds the number of rows N=%d; clipping k to %d", k, n, n)
        k = n

    index = faiss.IndexFlatIP(d)
    index.add(xn)
    self_scores = np.einsum("ij,ij->i", xn, xn).astype(np.float32)

    scores = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    level = logging.INFO if progress else logging.DEBUG
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        d_chunk, i_chunk = index.search(xn[lo:hi], k)
        scores[lo:hi], indices[lo:hi] = ensure_self_first(
            d_chunk, i_chunk, np.arange(lo, hi, dtype=np.int64), self_scores[lo:hi]
        )
        elapsed = time.perf_counter() - start
        logger.log(level, "exact kNN: %d/%d rows, %.0f rows/s", hi, n, hi / max(elapsed, 1e-9))
    if (indices < 0).any():  # cannot happen for a flat index with k <= N; guard against silent holes
        raise RuntimeError("Faiss returned missing neighbours (-1) from an exact flat index")
    return scores, indices


def knn_recall(
    approx_indices: np.ndarray, exact_indices: np.ndarray, query_ids: np.ndarray | None = None
) -> float:
    """Fraction of exact neighbours that the approximate search also found (recall@k).

    Rows are compared as sets, so order within a row does not matter; the approximate lists may be
    wider or narrower than the exact ones, and ``-1`` (Faiss's "no result") never matches. Used to
    report IVF quality on the real representation vectors (docs/platform-notes.md: recall depends on how
    clustered they are). Computed in row chunks to keep the [rows, k, k'] comparison small.
    With ``query_ids`` (row ``u``'s own id), the query is dropped from both lists, as
    :func:`~cstwa_dist.structure.ivf.distributed_knn` reports recall: a row is always its own first
    neighbour, and counting it would inflate the figure.
    """
    approx = np.asarray(approx_indices, dtype=np.int64)
    exact = np.asarray(exact_indices, dtype=np.int64)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ValueError(f"need 2-D arrays with equal row counts, got {approx.shape} and {exact.shape}")
    if query_ids is not None:
        q = np.asarray(query_ids, dtype=np.int64).reshape(-1, 1)
        if q.shape[0] != exact.shape[0]:
            raise ValueError(f"need one query id per row, got {q.shape[0]} for {exact.shape[0]} rows")
        exact = np.where(exact == q, -1, exact)
    valid = exact >= 0
    total = int(valid.sum())
    if total == 0:
        raise ValueError("exact_indices holds no neighbours")
    found = 0
    chunk = max(1, 4_000_000 // max(1, exact.shape[1] * approx.shape[1]))
    for lo in range(0, exact.shape[0], chunk):
        e, a = exact[lo : lo + chunk], approx[lo : lo + chunk]
        hit = (e[:, :, None] == a[:, None, :]).any(axis=2) & (e >= 0)
        found += int(hit.sum())
    return found / total
