"""The Curse Escaper (Eq. 17–18): up-weight samples where the click signal and the purchase disagree."""

from __future__ import annotations

import io

import torch
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.losses.common import LOCAL, Collectives


class CurseEscaper(nn.Module):
    """Weight γ for samples where the click signal and the purchase label disagree.

    A sample is a *false positive* of the click signal when ``p_ctr > τ_high`` and ``z = 0``, a
    *false negative* when ``p_ctr < τ_low`` and ``z = 1``. The thresholds are percentiles of the
    previous ``window`` detached CTR predictions of the *global* batches (every rank's rows), so the
    weights do not depend on how many ranks a run uses. The window starts empty: the first step
    weighs every sample 1.

    Two details keep it exact and cheap at any world size. The gathered rows are the global batch in
    rank order, which is the order one process sees the concatenated batch in; when a global batch
    holds more real rows than the window, the window takes ``window`` rows evenly spaced over it
    (every rank contributes its share) instead of its tail, which would be the last ranks' rows only.
    So W ranks and one process keep the same window. The thresholds stay on the device (no
    ``.item()``): a step never waits for the host.
    """

    def __init__(self, cfg: LossConfig, comm: Collectives = LOCAL) -> None:
        super().__init__()
        self.gamma = cfg.gamma
        self.capacity = cfg.window
        self.q_high = cfg.high_percentile / 100.0
        self.q_low = cfg.low_percentile / 100.0
        self.comm = comm
        self.window = torch.empty(0)  # not a buffer: DDP must not broadcast it every step

    def get_extra_state(self) -> bytes:
        """The window, so that a resumed run weighs its next batch as the uninterrupted one would.

        Serialised to bytes because its length varies (it fills up over the first steps): DCP loads
        tensors into pre-allocated ones of the saved shape, and a fresh run's window is empty.
        """
        buf = io.BytesIO()
        torch.save(self.window.detach().cpu(), buf)
        return buf.getvalue()

    def set_extra_state(self, state: bytes) -> None:
        window = torch.load(io.BytesIO(state), weights_only=True)
        self.window = window.to(self.window.device)

    def thresholds(self) -> torch.Tensor | None:
        """``[τ_low, τ_high]`` on the window's device, or None while the window is empty."""
        if self.window.numel() == 0:
            return None
        q = torch.tensor([self.q_low, self.q_high], dtype=self.window.dtype, device=self.window.device)
        return torch.quantile(self.window, q)

    def weights(self, p_ctr: torch.Tensor, purchase: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights for this batch from the window *before* it; then the batch joins the window."""
        p_ctr = p_ctr.detach()
        w = torch.ones_like(p_ctr)
        if not self.training:  # evaluation neither re-weights nor moves the window
            return w
        th = self.thresholds()
        if th is not None:
            lo, hi = th.to(p_ctr.dtype).unbind()
            conflict = ((p_ctr > hi) & (purchase < 0.5)) | ((p_ctr < lo) & (purchase > 0.5))
            w = torch.where(conflict, torch.full_like(w, self.gamma), w)
        self.observe(p_ctr, mask)
        return w

    def observe(self, p_ctr: torch.Tensor, mask: torch.Tensor) -> None:
        both = self.comm.gather(torch.stack([p_ctr.detach().float(), mask.float()]))  # [2, W·B]
        fresh = both[0][both[1] > 0.5]
        if fresh.numel() > self.capacity:  # evenly spaced over the global batch: fair to every rank
            keep = torch.linspace(0, fresh.numel() - 1, self.capacity, device=fresh.device).round().long()
            fresh = fresh[keep]
        self.window = torch.cat([self.window.to(fresh.device), fresh])[-self.capacity :]
