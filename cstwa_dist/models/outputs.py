"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Logits over the entire impression space.

    ``purchase_logit`` is the model's purchase prediction ``P(z=1 | x)`` as a logit (ESMM: the logit
    of ``p_ctr · p_cvr``); ``None`` for click-only models such as the pre-training MLP.

    ``extras`` carries the further tensors a model's own loss needs (ESCM2: the CVR logit apart from
    the CTCVR logit, the DR imputed error), keyed by name, so that the trainer and ``ModelTrain``
    never change when a loss needs more than the two predictions. ``None`` when a loss needs nothing.
    """

    click_logit: torch.Tensor  # [B]
    purchase_logit: torch.Tensor | None = None  # [B]
    extras: dict[str, torch.Tensor] | None = None  # name -> [B]; read by the model's loss only
