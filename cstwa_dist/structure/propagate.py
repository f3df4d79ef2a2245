"""Structure Migrator propagation and smoothing (docs/method.md §2, Eq. 8-10), single process.

``X^(L) = Â^L X`` with no weight matrix and no activation, then ``X ← (1−β)·X + β·X^(L)`` at epoch
boundaries. These are the reference semantics; the row-sharded multi-rank version must match them.
Between epochs the update is not part of any loss, so callers run it under ``torch.no_grad()`` and
write the result back into the tables; these functions do not decide that for them.
"""

from __future__ import annotations

import logging
import math

import torch

from cstwa_dist.structure.memory import MemoryItem

logger = logging.getLogger(__name__)

__all__ = ["beta_update", "beta_update_memory", "propagate", "structure_migrate"]


def propagate(a_hat: torch.Tensor, x: torch.Tensor, layers: int) -> torch.Tensor:
    """Return ``Â^layers · x`` by repeated sparse × dense products (Eq. 9).

    ``Â`` is applied ``layers`` times rather than powered: ``Â^L`` fills in (k^L nnz per row) while
    ``L`` products with ``x`` cost ``L · nnz · d``. ``layers = 0`` returns ``x`` unchanged (no copy).
    ``a_hat`` should be CSR (the fast kernel, docs/platform-notes.md); COO is converted once. Values are
    cast to ``x``'s dtype so a float32 graph can smooth float64 tables in tests.
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"layers must be a non-negative integer, got {layers!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, d], got shape {tuple(x.shape)}")
    if a_hat.dim() != 2 or a_hat.shape[0] != a_hat.shape[1] or a_hat.shape[1] != x.shape[0]:
        raise ValueError(f"a_hat {tuple(a_hat.shape)} must be square with side x.shape[0]={x.shape[0]}")
    if layers == 0:
        return x
    if a_hat.layout == torch.sparse_coo:
        a_hat = a_hat.coalesce().to_sparse_csr()
    if a_hat.dtype != x.dtype:
        a_hat = a_hat.to(x.dtype)
    out = x
    for _ in range(layers):
        out = a_hat @ out
    return out


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return beta


def beta_update(x: torch.Tensor, x_prop: torch.Tensor, beta: float) -> torch.Tensor:
    """Epoch-boundary smoothing ``(1−β)·x + β·x_prop`` (Eq. 10); ``β ∈ [0, 1]``.

    ``β`` outside ``[0, 1]`` would extrapolate away from both tables instead of mixing them, so it is
    rejected rather than clipped: a typo in a sweep (e.g. 3 for 0.3) must fail loudly.
    """
    beta = _check_beta(beta)
    if x.shape != x_prop.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_prop {tuple(x_prop.shape)}")
    return (1.0 - beta) * x + beta * x_prop


def beta_update_memory(rows: int, width: int, itemsize: int = 4) -> list[MemoryItem]:
    """What :func:`beta_update` allocates on a block of ``n_r = rows`` rows of width ``w``, ``b`` =
    ``itemsize`` bytes an element: ``(1−β)·x`` and ``β·x_prop`` are both alive when their sum, the
    new block, is made, so ``3·n_r·w·b`` at once. ``x`` (a view of the table's rows) and ``x_prop``
    (the propagation's output) are the caller's and not counted here.
    """
    block = rows * width * itemsize
    return [
        MemoryItem(
            "beta_terms", "β update terms", 2 * block, f"2·n_r·w·{itemsize}", detail="(1−β)·U, β·Â^L·U"
        ),
        MemoryItem("new_block", "new block", block, f"n_r·w·{itemsize}"),
    ]


def structure_migrate(a_hat: torch.Tensor, x: torch.Tensor, layers: int, beta: float) -> torch.Tensor:
    """One Structure Migrator step: propagate ``layers`` times, then mix with weight ``beta``.

    ``beta`` is checked before propagating so a bad value fails before the expensive products.
    """
    _check_beta(beta)
    return beta_update(x, propagate(a_hat, x, layers), beta)
