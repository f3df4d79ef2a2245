"""ESMM (Ma et al., 2018): shared embeddings, ``p_ctcvr = p_ctr · p_cvr`` over the entire space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import FieldEmbeddings, tower_with_logit
from cstwa_dist.models.outputs import ModelOutput


def ctcvr_logit(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> torch.Tensor:
    """logit(σ(a)·σ(b)) computed in log space.

    With ``log p = logσ(a) + logσ(b)``, ``logit p = log p − log(1 − p)`` and ``log(1 − p) =
    log(−expm1(log p))``, so BCEWithLogits on the result is the CTCVR BCE without underflow when
    both probabilities are tiny (purchase rates of 0.02 % make that the normal case).
    """
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_p = torch.clamp(log_p, max=-1e-7)  # p < 1 strictly, so log(1 − p) stays finite
    return log_p - torch.log(-torch.expm1(log_p))


class ESMM(RecModel):
    """Shared embedding collection, a CTR tower and a CVR tower; purchase prediction = ``p_ctcvr``."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.embeddings = FieldEmbeddings(spec, "shared", d, device)
        in_dim = self.embeddings.out_dim
        self.click_tower, self.click_layer = tower_with_logit(in_dim, cfg.ctr_tower, cfg.dropout, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            in_dim, cfg.cvr_tower, cfg.dropout, device
        )

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.embeddings(features)
        x = torch.cat([r_u, r_i, ctx], dim=1)
        click_logit = self.click_layer(self.click_tower(x)).squeeze(-1)
        cvr_logit = self.conversion_layer(self.conversion_tower(x)).squeeze(-1)
        return ModelOutput(click_logit=click_logit, purchase_logit=ctcvr_logit(click_logit, cvr_logit))
