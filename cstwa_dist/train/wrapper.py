"""``ModelTrain``: the module DistributedModelParallel wraps (model + loss, like TorchRec's DLRMTrain)."""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.data.batch import Batch
from cstwa_dist.models.base import RecModel


class ModelTrain(nn.Module):
    """Owns the loss so the trainer stays model-agnostic; returns ``(loss, detached outputs)``."""

    def __init__(self, model: RecModel, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]]:
        out = self.model(batch.features)
        loss, parts = self.loss(out, batch)
        purchase = None if out.purchase_logit is None else out.purchase_logit.detach()
        return loss, (parts, out.click_logit.detach(), purchase)
