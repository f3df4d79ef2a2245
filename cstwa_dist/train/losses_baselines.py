"""Losses of the baselines that the shared ones in ``losses.py`` do not cover.

Same rules as there: BCEWithLogits on logits, averages over real rows only (``mask``).
"""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.models.outputs import ModelOutput
from cstwa_dist.train.losses import bce, masked_mean


class ClickedSpaceLoss(nn.Module):
    """``w_ctr·L_ctr + w_cvr·L_cvr``: ``L_ctr`` over all real rows, ``L_cvr`` over CLICKED real rows only.

    This is the MLP baseline's objective (method.md §3): the purchase head is a conventional CVR model,
    trained where purchases are observable (``y = 1``). Unclicked rows contribute nothing to ``L_cvr``
    (their gradient is exactly zero), yet the head still predicts them at evaluation. A batch (or rank
    shard) without a clicked row gives ``L_cvr = 0`` rather than NaN (``masked_mean`` clamps the count).
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert out.purchase_logit is not None
        l_ctr = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        clicked = batch.mask & (batch.click > 0.5)
        l_cvr = masked_mean(bce(out.purchase_logit, batch.purchase), clicked)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach()}
