"""Losses of the AITM and ESCM² baselines (method.md §3), over logits and real rows like ``losses.py``.

* ``AITMLoss``: ``L_ctr + L_purchase + w_c · L_c`` with AITM's behavioural calibrator
  ``L_c = mean max(p_purchase − p_click, 0)`` (the same constraint CSTWA borrows as Eq. 19).
* ``ESCM2Loss``: ``L_ctr + L_ctcvr + w_cf · R`` where ``R`` is a counterfactual CVR risk on the
  clicked space with ``p_ctr`` as propensity, by inverse propensity scoring (IPS) or doubly robust
  (DR) estimation, plus, for DR, the imputation tower's own loss.

Every mean is over all real impressions (``masked_mean``), the ``1/|D|`` of the estimators: unclicked
rows enter IPS with weight 0 and DR through the imputed error only.
"""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.models.escm2 import CVR_LOGIT, IMPUTED_ERROR
from cstwa_dist.models.outputs import ModelOutput
from cstwa_dist.train.losses import bce, masked_mean


def calibrator(click_logit: torch.Tensor, purchase_logit: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max(p_purchase − p_click, 0)``: a purchase cannot be likelier than its click.

    Both sides keep their gradients (AITM's calibrator constrains both towers).
    """
    return torch.relu(torch.sigmoid(purchase_logit) - torch.sigmoid(click_logit))


def propensity(click_logit: torch.Tensor, clip: float) -> torch.Tensor:
    """``p_ctr`` as the propensity of being clicked, clipped below at ``clip`` and detached.

    Detached: ESCM² uses the CTR tower as the propensity model, which ``L_ctr`` alone fits. Letting the
    counterfactual risk back-propagate into ``1/p_ctr`` would let the CTR tower shrink the risk by
    inflating ``p_ctr`` on clicked rows, biasing the very propensity the estimator relies on (IPS
    treats the propensity as given). Clipped: ``1/p_ctr`` at tiny CTRs would let a handful of rows
    dominate the batch (the usual IPS variance control; ``loss.propensity_clip``).
    """
    return torch.sigmoid(click_logit).detach().clamp(min=clip)


class AITMLoss(nn.Module):
    """``w_ctr·BCE(click) + w_cvr·BCE(purchase) + w_c·L_c``, all over the entire impression space.

    AITM's purchase logit is the end-to-end ``P(z=1 | x)``, so its BCE runs over every impression.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight
        self.c_weight = cfg.constraint_weight

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.purchase_logit is None:
            raise ValueError("AITMLoss needs a purchase logit")
        l_ctr = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        l_cvr = masked_mean(bce(out.purchase_logit, batch.purchase), batch.mask)
        l_c = masked_mean(calibrator(out.click_logit, out.purchase_logit), batch.mask)
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_cvr + self.c_weight * l_c
        return loss, {"ctr": l_ctr.detach(), "cvr": l_cvr.detach(), "calibrator": l_c.detach()}


class ESCM2Loss(nn.Module):
    """``w_ctr·L_ctr + w_cvr·L_ctcvr + w_cf·R_{IPS|DR}`` (+ ``L_imp`` for DR), with ``e = BCE(cvr, z)``.

    * IPS: ``R = mean_D o·e / ô``.
    * DR: ``R = mean_D [ê + o·(e − ê) / ô]`` and ``L_imp = mean_D o·(e − ê)² / ô``.

    ``o`` = click, ``ô`` = ``propensity(...)``. In ``R_DR`` the imputed error ``ê`` is detached and in
    ``L_imp`` the error ``e`` is: the joint-learning DR scheme alternates a prediction step with the
    imputation fixed and an imputation step with the prediction fixed, and one backward pass over the
    sum does both at once. Without the detach, ``R_DR`` would train ``ê`` to lower the risk estimate
    (gradient ``1 − o/ô``), which is no estimate of anything. Because ``ê`` regresses the error
    directly, ``R_DR``'s gradient on the CVR tower equals IPS's; DR differs in the lower-variance
    risk value and in the imputation tower's loss shaping the shared embeddings. ``L_imp`` carries
    weight 1, not ``w_cf``: it fits an auxiliary estimator and should not weaken when the regulariser
    is turned down.
    """

    def __init__(self, cfg: LossConfig, variant: str) -> None:
        super().__init__()
        if variant not in ("ips", "dr"):
            raise ValueError(f"ESCM2 variant must be ips or dr, got {variant!r}")
        self.variant = variant
        self.ctr_weight, self.cvr_weight = cfg.ctr_weight, cfg.cvr_weight
        self.cf_weight = cfg.counterfactual_weight
        self.clip = cfg.propensity_clip

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.purchase_logit is None or out.extras is None or CVR_LOGIT not in out.extras:
            raise ValueError(f"ESCM2Loss needs the purchase logit and extras[{CVR_LOGIT!r}]")
        l_ctr = masked_mean(bce(out.click_logit, batch.click), batch.mask)
        l_ctcvr = masked_mean(bce(out.purchase_logit, batch.purchase), batch.mask)
        o = batch.click
        o_hat = propensity(out.click_logit, self.clip)  # [B]
        e = bce(out.extras[CVR_LOGIT], batch.purchase)  # [B]; only clicked rows carry a real label
        parts: dict[str, torch.Tensor] = {"ctr": l_ctr.detach(), "cvr": l_ctcvr.detach()}
        if self.variant == "ips":
            risk = masked_mean(o * e / o_hat, batch.mask)
            extra = torch.zeros((), dtype=risk.dtype, device=risk.device)
        else:
            if IMPUTED_ERROR not in out.extras:
                raise ValueError(f"ESCM2 DR needs extras[{IMPUTED_ERROR!r}] (build the model as escm2_dr)")
            e_hat = out.extras[IMPUTED_ERROR]
            risk = masked_mean(e_hat.detach() + o * (e - e_hat.detach()) / o_hat, batch.mask)
            extra = masked_mean(o * (e.detach() - e_hat) ** 2 / o_hat, batch.mask)
            parts["imputation"] = extra.detach()
        parts["counterfactual"] = risk.detach()
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_ctcvr + self.cf_weight * risk + extra
        return loss, parts
