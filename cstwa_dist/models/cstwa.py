"""CSTWA (Ouyang et al., 2023) as restated in method.md §2.

Separate CTR and CVR embedding collections (Eq. 6); the Structure Migrator (SM) replaces the CVR
user/item representations by trainable per-entity tables ``U``/``I`` that the trainer smooths over
the kNN graphs between epochs; the Click Perceptron (CP) gates the CVR input with the click tower's
last hidden state; the Curse Escaper (CE) lives in the loss (``train/losses.py``).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel, StructureTable
from cstwa_dist.models.blocks import (
    FieldEmbeddings,
    InfoLayer,
    concat_by_keys,
    embedding_collection,
    tower_with_logit,
)
from cstwa_dist.models.outputs import ModelOutput

SM_USER_TABLE = "sm__user"
SM_ITEM_TABLE = "sm__item"


class CSTWA(RecModel):
    """Click tower on ``x_ctr``; conversion tower on ``x̃_cvr = x_cvr ⊙ 2b`` (CP) or ``x_cvr``."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.use_sm = cfg.structure_migrator
        self.use_cp = cfg.click_perceptron
        self.ctr_embeddings = FieldEmbeddings(spec, "ctr", d, device)
        self.cvr_embeddings = FieldEmbeddings(spec, "cvr", d, device)
        u_dim, i_dim = self.cvr_embeddings.user_dim, self.cvr_embeddings.item_dim
        x_dim = u_dim + i_dim + d
        self.user_key, self.item_key = spec.user_id, spec.item_id
        if self.use_sm:
            # U ∈ R^{N_U × M_u·D}, I ∈ R^{N_I × M_i·D}: one row per entity, keyed by its id (Decision).
            self.structure_embeddings = embedding_collection(
                [
                    EmbeddingBagConfig(
                        name=SM_USER_TABLE,
                        embedding_dim=u_dim,
                        num_embeddings=spec.num_users,
                        feature_names=[spec.user_id],
                        pooling=PoolingType.SUM,
                    ),
                    EmbeddingBagConfig(
                        name=SM_ITEM_TABLE,
                        embedding_dim=i_dim,
                        num_embeddings=spec.num_items,
                        feature_names=[spec.item_id],
                        pooling=PoolingType.SUM,
                    ),
                ],
                device,
            )
        self.click_tower, self.click_layer = tower_with_logit(x_dim, cfg.ctr_tower, cfg.dropout, device)
        if self.use_cp:
            self.info_layer = InfoLayer(self.click_tower.out_dim, x_dim, cfg.info_layer, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            x_dim, cfg.cvr_tower, cfg.dropout, device
        )

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.ctr_embeddings(features)
        h_ctr = self.click_tower(torch.cat([r_u, r_i, ctx], dim=1))  # Eq. 7, 12
        click_logit = self.click_layer(h_ctr).squeeze(-1)
        cvr_u, cvr_i, cvr_ctx = self.cvr_embeddings(features)
        if self.use_sm:  # Eq. 11: x_cvr = U[u] ‖ I[i] ‖ ctx^cvr
            kt = self.structure_embeddings(features)
            x_cvr = torch.cat([concat_by_keys(kt, [self.user_key, self.item_key]), cvr_ctx], dim=1)
        else:
            x_cvr = torch.cat([cvr_u, cvr_i, cvr_ctx], dim=1)
        if self.use_cp:  # Eq. 13–14
            x_cvr = x_cvr * self.info_layer(h_ctr)
        h_cvr = self.conversion_tower(x_cvr)  # Eq. 15
        return ModelOutput(click_logit=click_logit, purchase_logit=self.conversion_layer(h_cvr).squeeze(-1))

    def structure_tables(self) -> list[StructureTable]:
        if not self.use_sm:
            return []
        return [
            StructureTable(
                side="user",
                collection="structure_embeddings",
                table=SM_USER_TABLE,
                init_from="cvr_embeddings",
            ),
            StructureTable(
                side="item",
                collection="structure_embeddings",
                table=SM_ITEM_TABLE,
                init_from="cvr_embeddings",
            ),
        ]
