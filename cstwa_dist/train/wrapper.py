"""``ModelTrain``: the module DistributedModelParallel wraps (model + loss, like TorchRec's DLRMTrain)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.common import LOCAL, Collectives
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import set_dropout_keys


@dataclass
class StepOutput:
    """Everything detached a training or evaluation step reports besides the loss.

    ``loss`` and ``parts`` are this rank's shares of the loss and of its named terms (their sum over
    ranks is the mean over the global batch); ``rows`` is the number of real rows of the global batch,
    so that figures can be weighted by real rows and padding never counts. The loss is repeated here
    because TorchRec's train pipelines return only the output of a step, not its loss.
    """

    loss: torch.Tensor  # scalar, this rank's share of the step's loss (detached)
    parts: dict[str, torch.Tensor]
    rows: torch.Tensor  # scalar float32, global real rows of this step
    click_logit: torch.Tensor  # [B]
    purchase_logit: torch.Tensor | None  # [B], None for click-only models


class GlobalRowCount(nn.Module):
    """Real rows of the global batch (a sum over ranks).

    A module of its own so that TorchRec's train pipeline, which traces ``ModelTrain`` with torch.fx
    to find the sharded modules' inputs, treats it as a leaf instead of tracing into a collective.
    """

    def __init__(self, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, mask: torch.Tensor, global_rows: int | None = None) -> torch.Tensor:
        """``global_rows`` (the reader's count from its share plan) saves a collective on the hot path;
        hand-built batches carry None and are counted with a sum over ranks."""
        if global_rows is not None:
            return torch.tensor(float(global_rows), dtype=torch.float32, device=mask.device)
        return self.comm.sum(mask.to(torch.float32).sum())


class DropoutKeys(nn.Module):
    """Hands the batch's dropout keys to the model's keyed dropout layers before its forward.

    A module of its own for the same reason as :class:`GlobalRowCount`: TorchRec's pipeline traces
    ``ModelTrain`` and must record this as one call, not trace into it."""

    def forward(self, keys: tuple[int, ...] | None) -> None:
        set_dropout_keys(keys)


class ModelTrain(nn.Module):
    """Owns the loss so the trainer stays model-agnostic; returns ``(loss, StepOutput)``."""

    def __init__(self, model: RecModel, loss: nn.Module, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.row_count = GlobalRowCount(comm)
        self.dropout_keys = DropoutKeys()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        self.dropout_keys(batch.dropout_keys)
        out = self.model(batch.features)
        loss, parts = self.loss(out, batch)
        rows = self.row_count(batch.mask, batch.global_rows)
        purchase = None if out.purchase_logit is None else out.purchase_logit.detach()
        return loss, StepOutput(loss.detach(), parts, rows, out.click_logit.detach(), purchase)
