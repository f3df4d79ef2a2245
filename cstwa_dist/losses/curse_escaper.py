"""The Curse Escaper (Eq. 17–18): up-weight samples where the click signal and the purchase disagree."""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.losses.common import Gather


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class CurseEscaper(nn.Module):
    """Weight γ for samples where the click signal and the purchase label disagree.

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
