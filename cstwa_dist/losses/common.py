"""What every loss shares: BCE on logits, means over real rows of the GLOBAL batch, and the comm hooks.

**Exact at any world size.** A rank's loss is the sum of its real rows' terms divided by the number
of real rows of the *global* batch (all ranks' rows of this step), so that the sum of the ranks'
losses is the loss one process computes on the concatenated batch, and their gradients add up to its
gradient: embedding gradients are summed across ranks by the sharded lookups, and dense gradients
are summed by the DDP hook installed in ``distributed/sharding.py``. Padding rows (``mask`` False)
exist only so that all ranks run the same fixed-size steps (``data/reader.py``) and weigh nothing.

``Collectives`` is how a loss sees the other ranks, passed in by the trainer; ``LOCAL`` (identity)
is one process, and what unit tests use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Collectives:
    """The two collectives losses use; both must be called by every rank at every step."""

    gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Concatenates a tensor over all ranks along its last dim, in rank order (``[2, B]`` → ``[2, W·B]``)."""
    sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Sums a tensor over all ranks (returns the sum; no gradient flows through it)."""
    world_size: int = 1


LOCAL = Collectives()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows where ``mask`` is true (0, not NaN, when there are none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def global_counts(comm: Collectives, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Real-row counts of each mask over the global batch (one collective for all), at least 1 each."""
    local = torch.stack([m.to(torch.float32).sum() for m in masks])
    return tuple(comm.sum(local).clamp(min=1.0).unbind())


def global_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global mean: ``Σ_local values·mask / count`` (count: ``global_counts``).

    On one process with ``count = mask.sum()`` this is ``masked_mean``.
    """
    return (values * mask.to(values.dtype)).sum() / count.to(values.dtype)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE on logits (BCEWithLogits: stable where sigmoid + BCE would underflow)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def behaviour_constraint(click_logit: torch.Tensor, purchase_logit: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max(p_purchase − p_click, 0)``: a purchase cannot be likelier than its click.

    AITM's behavioural calibrator and CSTWA's ``L_c`` (Eq. 19) are this term. Both sides keep their
    gradients: the constraint shapes both towers.
    """
    return torch.relu(torch.sigmoid(purchase_logit) - torch.sigmoid(click_logit))
