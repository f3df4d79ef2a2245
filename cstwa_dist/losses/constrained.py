"""BCE plus the behavioural constraint ``max(p_purchase − p_click, 0)``: AITM and CSTWA (Eq. 19–20).

Both models predict ``P(z=1 | x)`` directly (no product with ``p_ctr``), so nothing in the output
keeps a purchase less likely than its click; the constraint term does. CSTWA adds the Curse
Escaper's per-sample weights to the purchase BCE.
"""

from __future__ import annotations

import torch

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.bce import TwoTaskLoss
from cstwa_dist.losses.common import LOCAL, Collectives, behaviour_constraint, global_mean
from cstwa_dist.losses.curse_escaper import CurseEscaper
from cstwa_dist.models.outputs import ModelOutput


class ConstrainedLoss(TwoTaskLoss):
    """``w_ctr·L_ctr + w_cvr·L_purchase + w_c·L_c``, all over the entire impression space.

    ``L_c = mean max(p_purchase − p_click, 0)``; ``w_c`` is ``loss.constraint_weight``. ``part`` names
    the term in the logged loss parts (AITM calls it its calibrator, CSTWA its constraint).
    """

    part = "constraint"

    def __init__(self, cfg: LossConfig, comm: Collectives = LOCAL) -> None:
        super().__init__(cfg, comm)
        self.c_weight = cfg.constraint_weight

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l_ctr, l_cvr, n_real = self.task_terms(out, batch)
        assert out.purchase_logit is not None  # task_terms checked it
        l_c = global_mean(behaviour_constraint(out.click_logit, out.purchase_logit), batch.mask, n_real)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr + self.c_weight * l_c
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach(), self.part: l_c.detach()}


class AITMLoss(ConstrainedLoss):
    """AITM: BCE on click and on the end-to-end purchase logit, plus its behavioural calibrator."""

    part = "calibrator"


class CSTWALoss(ConstrainedLoss):
    """Eq. 20: ``L = w_ctr·L_ctr + w_cvr·L_cvr + w_c·L_c`` with the Curse Escaper's weights in ``L_cvr``.

    ``curse_escaper``: CSTWA's own switch (``models.cstwa.curse_escaper``), passed by the registry.
    """

    def __init__(self, cfg: LossConfig, curse_escaper: bool, comm: Collectives = LOCAL) -> None:
        super().__init__(cfg, comm)
        self.curse_escaper = CurseEscaper(cfg, comm) if curse_escaper else None

    def purchase_weights(self, out: ModelOutput, batch: Batch) -> torch.Tensor | None:
        if self.curse_escaper is None:
            return None
        return self.curse_escaper.weights(torch.sigmoid(out.click_logit), batch.purchase, batch.mask)
