"""ESCM² (Wang et al., SIGIR 2022): ESMM plus a counterfactual CVR risk on the clicked space.

The structure is ESMM's (shared embeddings, CTR tower, CVR tower, ``p_ctcvr = p_ctr · p_cvr``, and
the purchase prediction is ``p_ctcvr``); what ESCM² adds is a regulariser that trains the CVR tower
as a post-click estimator debiased by ``p_ctr`` as propensity (IPS), optionally with an imputation
tower predicting the CVR tower's error (DR). The regulariser needs the CVR logit on its own, so the
model returns it in ``ModelOutput.extras``; the risks themselves live in
``losses/counterfactual.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.blocks import MLPTower
from cstwa_dist.models.esmm import ESMM
from cstwa_dist.models.outputs import ModelOutput

CVR_LOGIT = "cvr_logit"  # extras key: the CVR tower's logit, P(z=1 | click, x)
IMPUTED_ERROR = "imputed_error"  # extras key (DR only): ê ≥ 0, the predicted BCE of the CVR tower


class ESCM2(ESMM):
    """ESMM's towers; with ``doubly_robust`` an imputation tower predicts the CVR error ``ê``.

    The imputation tower is built only for the DR variant, so that the IPS model holds no parameter
    its loss never reaches (the IPS and DR models are two registered names for that reason: the
    builder sees the model config, not the loss config). ``ê`` goes through softplus because the
    quantity it imputes, a BCE, is non-negative; softplus rather than ReLU keeps a gradient everywhere.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        *,
        doubly_robust: bool = False,
    ) -> None:
        super().__init__(spec, cfg, device)
        self.doubly_robust = doubly_robust
        if doubly_robust:
            self.imputation_tower = MLPTower(self.in_dim, cfg.cvr_tower, cfg.dropout, device)
            self.imputation_layer = nn.Linear(self.imputation_tower.out_dim, 1, device=device)

    def outputs(self, x: torch.Tensor, click_logit: torch.Tensor, cvr_logit: torch.Tensor) -> ModelOutput:
        """ESMM's CTCVR prediction, plus the CVR logit (and ``ê`` for DR) for the counterfactual risk."""
        extras = {CVR_LOGIT: cvr_logit}
        if self.doubly_robust:
            raw = self.imputation_layer(self.imputation_tower(x)).squeeze(-1)
            extras[IMPUTED_ERROR] = F.softplus(raw)  # [B]
        out = super().outputs(x, click_logit, cvr_logit)
        out.extras = extras
        return out
