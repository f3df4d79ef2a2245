"""The plain CTR MLP pre-trained to mine user/item structure (docs/method.md §1.1).

Its field tables (collection ``embeddings``, prefix ``ctr``) give the representations ``r_u``, ``r_i``
the kNN graphs are built from; the registry declares that as the model's representation source.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SharedBottom
from cstwa_dist.models.outputs import ModelOutput


class CTRMLP(SharedBottom):
    """embeddings → concat(r_u, r_i, ctx) → Click Tower → Click Layer (a logit); no conversion side."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__(spec, cfg, device, prefix="ctr", conversion_tower=False)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        h = self.click_tower(self.inputs(features))
        return ModelOutput(click_logit=self.click_layer(h).squeeze(-1))
