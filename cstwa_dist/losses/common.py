"""What every loss shares: BCE on logits, means over real rows only, and the ``Gather`` hook.

Every loss averages over the *real* rows of a batch (``mask``): padding rows exist only so that all
ranks run the same fixed-size steps (``data/reader.py``) and must weigh nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenates a tensor over all ranks along dim 1 (``[2, B]`` → ``[2, world·B]``); identity on 1 rank."""


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows where ``mask`` is true (0, not NaN, when there are none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE on logits (BCEWithLogits: stable where sigmoid + BCE would underflow)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def behaviour_constraint(click_logit: torch.Tensor, purchase_logit: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max(p_purchase − p_click, 0)``: a purchase cannot be likelier than its click.

    AITM's behavioural calibrator and CSTWA's ``L_c`` (Eq. 19) are this term. Both sides keep their
    gradients: the constraint shapes both towers.
    """
    return torch.relu(torch.sigmoid(purchase_logit) - torch.sigmoid(click_logit))
