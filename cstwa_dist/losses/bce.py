"""Plain BCE objectives: click only, and click + purchase over the entire or the clicked space.

``TwoTaskLoss`` is also the base of the constrained and counterfactual losses: they add terms to its
``L_ctr`` and ``L_purchase`` rather than re-computing them.
"""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.common import LOCAL, Collectives, bce, global_counts, global_mean
from cstwa_dist.models.outputs import ModelOutput


class ClickLoss(nn.Module):
    """BCE on the click label only (the pre-training CTR MLP).

    Takes the loss config like every loss (the registry's one calling convention) but uses none of it.
    """

    def __init__(self, cfg: LossConfig | None = None, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (n_real,) = global_counts(self.comm, batch.mask)
        loss = global_mean(bce(out.click_logit, batch.click), batch.mask, n_real)
        return loss, {"ctr": loss.detach()}


class TwoTaskLoss(nn.Module):
    """``w_ctr·L_ctr + w_cvr·L_purchase``, by default both over all real impressions.

    The purchase logit is whatever the model predicts as ``P(z=1 | x)`` (ESMM: the CTCVR logit). Two
    hooks let a subclass change the purchase term without re-writing it: ``purchase_rows`` (where the
    purchase label counts) and ``purchase_weights`` (per-sample weights, e.g. the Curse Escaper's).
    """

    def __init__(self, cfg: LossConfig, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight
        self.comm = comm

    def purchase_rows(self, batch: Batch) -> torch.Tensor:
        """``[B]`` bool: the rows whose purchase label enters ``L_purchase`` (default: every real row)."""
        return batch.mask

    def purchase_weights(self, out: ModelOutput, batch: Batch) -> torch.Tensor | None:
        """``[B]`` per-sample weights of the purchase BCE, or None for all ones."""
        return None

    def task_terms(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L_ctr, L_purchase, global real-row count)``; the losses are this rank's shares."""
        if out.purchase_logit is None:
            raise ValueError(f"{type(self).__name__} needs a purchase logit")
        rows = self.purchase_rows(batch)
        n_real, n_purchase = global_counts(self.comm, batch.mask, rows)
        l_ctr = global_mean(bce(out.click_logit, batch.click), batch.mask, n_real)
        per_sample = bce(out.purchase_logit, batch.purchase)
        weights = self.purchase_weights(out, batch)
        if weights is not None:
            per_sample = per_sample * weights
        return l_ctr, global_mean(per_sample, rows, n_purchase), n_real

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l_ctr, l_cvr, _ = self.task_terms(out, batch)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach()}


class EntireSpaceLoss(TwoTaskLoss):
    """ESMM's ``L_ctr + L_ctcvr`` over the entire impression space: the base objective, unchanged.

    A class of its own (not an alias) so that a model's registry entry names the objective it means.
    """


class ClickedSpaceLoss(TwoTaskLoss):
    """``L_ctr`` over all real rows, ``L_cvr`` over CLICKED real rows only (the MLP baseline).

    The purchase head is a conventional CVR model, trained where purchases are observable (``y = 1``;
    docs/method.md §3). Unclicked rows contribute nothing to ``L_cvr`` (their gradient is exactly
    zero), yet the head still predicts them at evaluation. ``L_cvr`` is the mean over the clicked rows
    of the global batch; a global batch without a clicked row gives ``L_cvr = 0`` rather than NaN.
    """

    def purchase_rows(self, batch: Batch) -> torch.Tensor:
        return batch.mask & (batch.click > 0.5)
