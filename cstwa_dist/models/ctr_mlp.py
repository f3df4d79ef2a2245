"""The plain CTR MLP pre-trained to mine user/item structure (method.md §1 step 1)."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import FieldEmbeddings, tower_with_logit
from cstwa_dist.models.outputs import ModelOutput


class CTRMLP(RecModel):
    """embeddings → concat(r_u, r_i, ctx) → Click Tower → Click Layer (a logit)."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.embeddings = FieldEmbeddings(spec, "ctr", d, device)
        in_dim = self.embeddings.out_dim
        self.click_tower, self.click_layer = tower_with_logit(in_dim, cfg.ctr_tower, cfg.dropout, device)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.embeddings(features)
        h = self.click_tower(torch.cat([r_u, r_i, ctx], dim=1))
        return ModelOutput(click_logit=self.click_layer(h).squeeze(-1))

    def representation_source(self) -> str | None:
        return "embeddings"
