"""Sparse similarity graphs: kNN lists to the normalised adjacency Â (docs/method.md §1, Eq. 4-5).

Graphs are torch sparse CSR float32: CSR × dense is the fastest sparse product measured here
(docs/platform-notes.md: 364 ms for 1M rows × 8 nnz against 1M × 45, against 1.2 s for COO), and row
slices of CSR are what the later row-sharded propagation needs. Column indices are kept sorted within
each row so the same graph always has the same byte layout (stable checksums, comparable files).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cstwa_dist.fs import atomic_path
from cstwa_dist.structure.knn import exact_knn

logger = logging.getLogger(__name__)

__all__ = ["build_graph", "knn_to_adjacency", "load_graph", "normalise_adjacency", "save_graph"]

_FORMAT = "cstwa-graph-csr"
_FORMAT_VERSION = 1


def _csr_from_sorted_coo(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> torch.Tensor:
    """Build an ``n × n`` CSR tensor from COO triplets already sorted by (row, col)."""
    counts = np.bincount(rows, minlength=n)
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=crow[1:])
    return torch.sparse_csr_tensor(
        torch.from_numpy(crow),
        torch.from_numpy(np.ascontiguousarray(cols, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32)),
        size=(n, n),
        check_invariants=False,  # built sorted and in range here; the O(nnz) check would be redundant
    )


def knn_to_adjacency(scores: np.ndarray, indices: np.ndarray, n: int) -> torch.Tensor:
    """Sparse ``A`` with ``A_uv = max(S_uv, 0)`` for ``v`` in the top-k of ``u`` (Eq. 4), as CSR.

    Row ``u`` of the kNN lists becomes row ``u`` of ``A``; nothing is symmetrised (docs/method.md §1.4
    Decision), so ``A`` is in general not symmetric. Negative cosines are clamped to 0 and zeros
    (clamped or genuine) are not stored: a zero weight carries nothing through propagation and would
    only cost memory. ``-1`` ids (an approximate index's "no result") are skipped. Repeated ids in a row
    are rejected, since a kNN list never has them and summing them would double a weight silently.
    """
    scores = np.asarray(scores)
    indices = np.asarray(indices)
    if scores.shape != indices.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and indices {indices.shape} must be equal 2-D shapes")
    if scores.shape[0] != n:
        raise ValueError(f"expected one kNN row per node: {scores.shape[0]} rows for n={n}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if indices.size and indices.max() >= n:
        raise ValueError(f"neighbour id {int(indices.max())} out of range for n={n}")
    k = indices.shape[1]
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = indices.astype(np.int64, copy=False).ravel()
    vals = np.maximum(scores.astype(np.float32, copy=False).ravel(), np.float32(0.0))
    keep = (cols >= 0) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    if rows.size > 1 and ((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])).any():
        raise ValueError("a kNN row lists the same neighbour twice")
    return _csr_from_sorted_coo(rows, cols, vals, n)


def _as_csr(a: torch.Tensor) -> torch.Tensor:
    if a.layout == torch.sparse_csr:
        return a
    if a.layout == torch.sparse_coo:
        return a.coalesce().to_sparse_csr()
    if a.layout == torch.strided:
        return a.to_sparse_csr()
    raise TypeError(f"unsupported tensor layout {a.layout}")


def normalise_adjacency(a: torch.Tensor) -> torch.Tensor:
    """Symmetric degree normalisation ``Â = D^{-1/2} A D^{-1/2}`` (Eq. 5), as CSR float32.

    ``D_uu = Σ_v A_uv`` (row sums). Entry ``(u, v)`` is scaled by ``d_u^{-1/2} · d_v^{-1/2}`` where
    ``d_v`` is row ``v``'s own degree, not column ``v``'s sum: ``A`` is not symmetric (no
    symmetrisation), so the two differ. Nodes of degree 0 get factor 0 instead of ``inf``, so their
    rows and columns stay zero; entries that become 0 that way are dropped, like every zero in ``A``.
    Degrees are summed in float64 so that large rows lose no precision before the square root.
    Accepts CSR, COO or dense input; ``A`` must be square with non-negative finite values.
    """
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square 2-D, got shape {tuple(a.shape)}")
    csr = _as_csr(a)
    n = csr.shape[0]
    crow = csr.crow_indices().to(torch.int64)
    col = csr.col_indices().to(torch.int64)
    val = csr.values()
    if val.numel() and (not torch.isfinite(val).all() or (val < 0).any()):
        raise ValueError("adjacency values must be finite and non-negative (Eq. 4 clamps negatives)")
    row = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), crow[1:] - crow[:-1])
    deg = torch.zeros(n, dtype=torch.float64).index_add_(0, row, val.to(torch.float64))
    dinv = torch.where(deg > 0, deg.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(deg))
    new_val = (val.to(torch.float64) * dinv[row] * dinv[col]).to(torch.float32)
    keep = new_val != 0
    if not bool(keep.all()):
        row, col, new_val = row[keep], col[keep], new_val[keep]
    # Re-sort columns within rows in case the input CSR had them unsorted (cheap when already sorted).
    order = np.lexsort((col.numpy(), row.numpy()))
    return _csr_from_sorted_coo(row.numpy()[order], col.numpy()[order], new_val.numpy()[order], n)


def build_graph(x: np.ndarray, k: int, **kw: Any) -> torch.Tensor:
    """From representations ``x [N, d]`` to ``Â`` (Eq. 3-5): exact cosine kNN, clamp, normalise.

    ``kw`` goes to :func:`~cstwa_dist.structure.knn.exact_knn` (``batch_size``, ``progress``). Each
    stage's wall time is logged, because kNN dominates and is what the IVF path replaces.
    """
    x = np.asarray(x)
    t0 = time.perf_counter()
    scores, indices = exact_knn(x, k, **kw)
    t1 = time.perf_counter()
    adj = knn_to_adjacency(scores, indices, x.shape[0])
    a_hat = normalise_adjacency(adj)
    t2 = time.perf_counter()
    logger.info(
        "graph: N=%d k=%d nnz=%d; kNN %.2f s, adjacency+normalise %.2f s",
        x.shape[0],
        indices.shape[1],
        a_hat.values().numel(),
        t1 - t0,
        t2 - t1,
    )
    return a_hat


def save_graph(path: str | os.PathLike[str], a: torch.Tensor) -> None:
    """Write ``a`` (any sparse/dense layout, stored as CSR) to ``path`` atomically.

    The payload is plain tensors plus the shape and a format tag, so :func:`load_graph` can read it
    with ``weights_only=True`` (no pickled code). It is written to a temporary file in the same
    directory, fsynced, then renamed over ``path``: a reader (or a rank polling for the file) never
    sees a half-written graph, and a crash leaves the previous file intact.
    """
    path = Path(path)
    csr = _as_csr(a)
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "shape": [int(s) for s in csr.shape],
        "crow_indices": csr.crow_indices().to(torch.int64).contiguous(),
        "col_indices": csr.col_indices().to(torch.int64).contiguous(),
        "values": csr.values().contiguous(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    logger.debug("saved graph %s (shape %s, nnz %d)", path, payload["shape"], payload["values"].numel())


def load_graph(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read a graph written by :func:`save_graph` back as a CSR tensor, checking its invariants."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} file")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported graph format version {payload.get('version')!r}")
    return torch.sparse_csr_tensor(
        payload["crow_indices"],
        payload["col_indices"],
        payload["values"],
        size=tuple(payload["shape"]),
        check_invariants=True,
    )
