"""Losses over logits (BCEWithLogits everywhere; sigmoid only for the constraint and CE thresholds).

Every loss averages over the *real* rows of a batch (``mask``): padding rows exist only so that all
ranks run the same fixed-size steps (data/reader.py) and must weigh nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.models.outputs import ModelOutput

Gather = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE on logits."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class CurseEscaper(nn.Module):
    """Eq. 17–18: weight γ for samples where the click signal and the purchase label disagree.

    A sample is a *false positive* of the click signal when ``p_ctr > τ_high`` and ``z = 0``, a
    *false negative* when ``p_ctr < τ_low`` and ``z = 1``. The thresholds are percentiles of the
    previous ``window`` detached CTR predictions. With several ranks the window holds the *global*
    previous predictions (``gather`` concatenates every rank's batch), so the weights do not depend
    on how many ranks a run uses. The window starts empty: the first step weighs every sample 1.
    """

    def __init__(self, cfg: LossConfig, gather: Gather | None = None) -> None:
        super().__init__()
        self.gamma = cfg.gamma
        self.capacity = cfg.window
        self.q_high = cfg.high_percentile / 100.0
        self.q_low = cfg.low_percentile / 100.0
        self.gather = gather or _identity
        self.window = torch.empty(0)  # not a buffer: DDP must not broadcast it every step

    def thresholds(self) -> tuple[float, float] | None:
        if self.window.numel() == 0:
            return None
        q = torch.tensor([self.q_low, self.q_high], dtype=self.window.dtype, device=self.window.device)
        lo, hi = torch.quantile(self.window, q).tolist()
        return lo, hi

    def weights(self, p_ctr: torch.Tensor, purchase: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights for this batch from the window *before* it; then the batch joins the window."""
        p_ctr = p_ctr.detach()
        w = torch.ones_like(p_ctr)
        if not self.training:  # evaluation neither re-weights nor moves the window
            return w
        th = self.thresholds()
        if th is not None:
            lo, hi = th
            conflict = ((p_ctr > hi) & (purchase < 0.5)) | ((p_ctr < lo) & (purchase > 0.5))
            w = torch.where(conflict, torch.full_like(w, self.gamma), w)
        self.observe(p_ctr, mask)
        return w

    def observe(self, p_ctr: torch.Tensor, mask: torch.Tensor) -> None:
        both = self.gather(torch.stack([p_ctr.detach().float(), mask.float()]))  # [2, world·B]
        fresh = both[0][both[1] > 0.5]
        self.window = torch.cat([self.window.to(fresh.device), fresh])[-self.capacity :]


class ClickLoss(nn.Module):
    """BCE on the click label only (the pre-training CTR MLP)."""

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        return loss, {"ctr": loss.detach()}


class EntireSpaceLoss(nn.Module):
    """``L_ctr + L_ctcvr``, both over all impressions (ESMM); the purchase logit is the CTCVR logit."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert out.purchase_logit is not None
        l_ctr = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        l_cvr = masked_mean(bce(out.purchase_logit, batch.purchase), batch.mask)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach()}


class CSTWALoss(nn.Module):
    """Eq. 20: ``L = w_ctr·L_ctr + w_cvr·L_cvr + w_c·L_c`` with CE weights inside ``L_cvr`` (when on).

    ``L_c = mean max(p_cvr − p_ctr, 0)`` (Eq. 19): a purchase cannot be likelier than a click.
    """

    def __init__(self, cfg: LossConfig, curse_escaper: bool, gather: Gather | None = None) -> None:
        super().__init__()
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight
        self.c_weight = cfg.constraint_weight
        self.curse_escaper = CurseEscaper(cfg, gather) if curse_escaper else None

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert out.purchase_logit is not None
        p_ctr = torch.sigmoid(out.click_logit)
        p_cvr = torch.sigmoid(out.purchase_logit)
        l_ctr = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        per_sample = bce(out.purchase_logit, batch.purchase)
        if self.curse_escaper is not None:
            per_sample = per_sample * self.curse_escaper.weights(p_ctr, batch.purchase, batch.mask)
        l_cvr = masked_mean(per_sample, batch.mask)
        l_c = masked_mean(torch.relu(p_cvr - p_ctr), batch.mask)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr + self.c_weight * l_c
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach(), "constraint": l_c.detach()}
