"""ESCM² (docs/method.md §3): ESMM's objective plus a counterfactual CVR risk on the clicked space.

``L = w_ctr·L_ctr + w_cvr·L_ctcvr + w_cf·R`` where ``R`` uses ``p_ctr`` as the propensity of a
click, by inverse propensity scoring (IPS) or doubly robust (DR) estimation, plus, for DR, the
imputation tower's own loss. Every mean is over all real impressions of the global batch, the ``1/|D|``
of the estimators: unclicked rows enter IPS with weight 0 and DR through the imputed error only.
"""

from __future__ import annotations

import torch

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.bce import TwoTaskLoss
from cstwa_dist.losses.common import LOCAL, Collectives, bce, global_mean
from cstwa_dist.models.escm2 import CVR_LOGIT, IMPUTED_ERROR
from cstwa_dist.models.outputs import ModelOutput


def propensity(click_logit: torch.Tensor, clip: float) -> torch.Tensor:
    """``p_ctr`` as the propensity of being clicked, clipped below at ``clip`` and detached.

    Detached: ESCM² uses the CTR tower as the propensity model, which ``L_ctr`` alone fits. Letting the
    counterfactual risk back-propagate into ``1/p_ctr`` would let the CTR tower shrink the risk by
    inflating ``p_ctr`` on clicked rows, biasing the very propensity the estimator relies on (IPS
    treats the propensity as given). Clipped: ``1/p_ctr`` at tiny CTRs would let a handful of rows
    dominate the batch (the usual IPS variance control; ``loss.propensity_clip``).
    """
    return torch.sigmoid(click_logit).detach().clamp(min=clip)


class ESCM2Loss(TwoTaskLoss):
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

    def __init__(self, cfg: LossConfig, variant: str, comm: Collectives = LOCAL) -> None:
        super().__init__(cfg, comm)
        if variant not in ("ips", "dr"):
            raise ValueError(f"ESCM2 variant must be ips or dr, got {variant!r}")
        self.variant = variant
        self.cf_weight = cfg.counterfactual_weight
        self.clip = cfg.propensity_clip

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.purchase_logit is None or out.extras is None or CVR_LOGIT not in out.extras:
            raise ValueError(f"ESCM2Loss needs the purchase logit and extras[{CVR_LOGIT!r}]")
        l_ctr, l_ctcvr, n_real = self.task_terms(out, batch)
        o = batch.click
        o_hat = propensity(out.click_logit, self.clip)  # [B]
        e = bce(out.extras[CVR_LOGIT], batch.purchase)  # [B]; only clicked rows carry a real label
        parts: dict[str, torch.Tensor] = {"ctr": l_ctr.detach(), "cvr": l_ctcvr.detach()}
        if self.variant == "ips":
            risk = global_mean(o * e / o_hat, batch.mask, n_real)
            extra = torch.zeros((), dtype=risk.dtype, device=risk.device)
        else:
            if IMPUTED_ERROR not in out.extras:
                raise ValueError(f"ESCM2 DR needs extras[{IMPUTED_ERROR!r}] (build the model as escm2_dr)")
            e_hat = out.extras[IMPUTED_ERROR]
            risk = global_mean(e_hat.detach() + o * (e - e_hat.detach()) / o_hat, batch.mask, n_real)
            extra = global_mean(o * (e.detach() - e_hat) ** 2 / o_hat, batch.mask, n_real)
            parts["imputation"] = extra.detach()
        parts["counterfactual"] = risk.detach()
        loss = self.ctr_weight * l_ctr + self.cvr_weight * l_ctcvr + self.cf_weight * risk + extra
        return loss, parts
