"""The MLP baseline (method.md §3): two independent single-task models, nothing shared.

A CTR model (its own ``ctr`` embedding collection and click tower) is trained on all impressions; a
CVR model (its own ``cvr`` collection and conversion tower) is trained on CLICKED impressions only
(``ClickedSpaceLoss``) — the classic, sample-selection-biased setting that ESMM and its successors
improve on — but, like every model here, it is evaluated over the entire impression space: its
``purchase_logit`` is its ``p_cvr`` logit, output for every row, clicked or not.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import FieldEmbeddings, tower_with_logit
from cstwa_dist.models.outputs import ModelOutput


class SingleTaskMLPs(RecModel):
    """``click_logit = ClickLayer(ClickTower(x^ctr))``; ``purchase_logit = ConversionLayer(...(x^cvr))``.

    Separate embedding collections (prefixes ``ctr`` / ``cvr``) keep the two models independent: the
    CVR loss never updates the CTR model's tables, and vice versa.
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.ctr_embeddings = FieldEmbeddings(spec, "ctr", d, device)
        self.cvr_embeddings = FieldEmbeddings(spec, "cvr", d, device)
        ctr_dim = self.ctr_embeddings.out_dim
        cvr_dim = self.cvr_embeddings.out_dim
        self.click_tower, self.click_layer = tower_with_logit(ctr_dim, cfg.ctr_tower, cfg.dropout, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            cvr_dim, cfg.cvr_tower, cfg.dropout, device
        )

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.ctr_embeddings(features)
        click_logit = self.click_layer(self.click_tower(torch.cat([r_u, r_i, ctx], dim=1))).squeeze(-1)
        c_u, c_i, c_ctx = self.cvr_embeddings(features)
        cvr_logit = self.conversion_layer(self.conversion_tower(torch.cat([c_u, c_i, c_ctx], dim=1)))
        return ModelOutput(click_logit=click_logit, purchase_logit=cvr_logit.squeeze(-1))
