"""ESCM² (Wang et al., SIGIR 2022): ESMM plus a counterfactual CVR risk on the clicked space.

The structure is ESMM's (shared embeddings, CTR tower, CVR tower, ``p_ctcvr = p_ctr · p_cvr``, and
the purchase prediction is ``p_ctcvr``); what ESCM² adds is a regulariser that trains the CVR tower
as a post-click estimator debiased by ``p_ctr`` as propensity (IPS), optionally with an imputation
tower predicting the CVR tower's error (DR). The regulariser needs the CVR logit on its own, so the
model returns it in ``ModelOutput.extras``; the risks themselves live in
``train/losses_counterfactual.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import FieldEmbeddings, MLPTower, tower_with_logit
from cstwa_dist.models.esmm import ctcvr_logit
from cstwa_dist.models.outputs import ModelOutput

CVR_LOGIT = "cvr_logit"  # extras key: the CVR tower's logit, P(z=1 | click, x)
IMPUTED_ERROR = "imputed_error"  # extras key (DR only): ê ≥ 0, the predicted BCE of the CVR tower


class ESCM2(RecModel):
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
        super().__init__()
        d = cfg.embedding_dim
        self.embeddings = FieldEmbeddings(spec, "shared", d, device)
        in_dim = self.embeddings.out_dim
        self.click_tower, self.click_layer = tower_with_logit(in_dim, cfg.ctr_tower, cfg.dropout, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            in_dim, cfg.cvr_tower, cfg.dropout, device
        )
        self.doubly_robust = doubly_robust
        if doubly_robust:
            self.imputation_tower = MLPTower(in_dim, cfg.cvr_tower, cfg.dropout, device)
            self.imputation_layer = nn.Linear(self.imputation_tower.out_dim, 1, device=device)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.embeddings(features)
        x = torch.cat([r_u, r_i, ctx], dim=1)  # [B, (M_u + M_i)·D + D]
        click_logit = self.click_layer(self.click_tower(x)).squeeze(-1)  # [B]
        cvr_logit = self.conversion_layer(self.conversion_tower(x)).squeeze(-1)  # [B]
        extras = {CVR_LOGIT: cvr_logit}
        if self.doubly_robust:
            raw = self.imputation_layer(self.imputation_tower(x)).squeeze(-1)
            extras[IMPUTED_ERROR] = F.softplus(raw)  # [B]
        return ModelOutput(
            click_logit=click_logit, purchase_logit=ctcvr_logit(click_logit, cvr_logit), extras=extras
        )
