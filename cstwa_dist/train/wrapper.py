"""``ModelTrain``: the module DistributedModelParallel wraps (model + loss, like TorchRec's DLRMTrain)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.common import LOCAL, Collectives
from cstwa_dist.models.base import RecModel


@dataclass
class StepOutput:
    """Everything detached a training or evaluation step reports besides the loss.

    ``parts`` are this rank's shares of the named loss terms (their sum over ranks is the term's mean
    over the global batch); ``rows`` is the number of real rows of the global batch, so that figures
    can be weighted by real rows and padding never counts.
    """

    parts: dict[str, torch.Tensor]
    rows: torch.Tensor  # scalar float32, global real rows of this step
    click_logit: torch.Tensor  # [B]
    purchase_logit: torch.Tensor | None  # [B], None for click-only models


class ModelTrain(nn.Module):
    """Owns the loss so the trainer stays model-agnostic; returns ``(loss, StepOutput)``."""

    def __init__(self, model: RecModel, loss: nn.Module, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.comm = comm

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        out = self.model(batch.features)
        loss, parts = self.loss(out, batch)
        rows = self.comm.sum(batch.mask.to(torch.float32).sum())
        purchase = None if out.purchase_logit is None else out.purchase_logit.detach()
        return loss, StepOutput(parts, rows, out.click_logit.detach(), purchase)
