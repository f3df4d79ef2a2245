"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Logits over the entire impression space.

    ``purchase_logit`` is the model's purchase prediction ``P(z=1 | x)`` as a logit (ESMM: the logit
    of ``p_ctr · p_cvr``); ``None`` for click-only models such as the pre-training MLP.
    """

    click_logit: torch.Tensor  # [B]
    purchase_logit: torch.Tensor | None = None  # [B]
