"""CSTWA (Ouyang et al., 2023) as restated in docs/method.md §2.

Separate CTR and CVR embedding collections (Eq. 6, ``SeparateEmbeddings``); the Structure Migrator
(SM) replaces the CVR user/item representations by trainable per-entity tables ``U``/``I`` that the
trainer smooths over the kNN graphs between epochs (the registry declares them as the model's
structure tables). With SM on, the step's CVR collection holds only the context fields: the CVR
user/item field tables would be looked up and discarded every step. The side fields other than the
ids live in ``cvr_side_embeddings``, read only when ``U``/``I`` are initialised (Eq. 8; the id slot of
a row keeps the table's own random start, drawn like the id table it replaces — docs/method.md §2);
the Click Perceptron (CP) gates the CVR input with the click tower's last hidden
state; the Curse Escaper (CE) lives in the loss (``losses/curse_escaper.py``).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SeparateEmbeddings, input_width
from cstwa_dist.models.blocks import FieldEmbeddings, InfoLayer, concat_by_keys, embedding_collection

STRUCTURE_COLLECTION = "structure_embeddings"  # attribute holding U and I
SIDE_COLLECTION = "cvr_side_embeddings"  # CVR tables of the non-id side fields (Eq. 8 only)
SM_USER_TABLE = "sm__user"
SM_ITEM_TABLE = "sm__item"


class CSTWA(SeparateEmbeddings):
    """Click tower on ``x_ctr``; conversion tower on ``x̃_cvr = x_cvr ⊙ 2b`` (CP) or ``x_cvr``."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        self.use_sm = cfg.structure_migrator
        self.use_cp = cfg.click_perceptron
        self.user_key, self.item_key = spec.user_id, spec.item_id
        super().__init__(spec, cfg, device)

    def cvr_fields(self, spec: DatasetSpec) -> list[str] | None:
        return [f.name for f in spec.context_fields] if self.use_sm else None

    def build_cvr_input(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        if not self.use_sm:
            return
        side = [f.name for f in spec.user_fields[1:] + spec.item_fields[1:]]  # ids come first
        if side:
            self.cvr_side_embeddings = FieldEmbeddings(spec, "cvr", cfg.embedding_dim, device, side)
        # U ∈ R^{N_U × M_u·D}, I ∈ R^{N_I × M_i·D}: one row per entity, keyed by its id (Decision).
        u_dim = len(spec.user_fields) * cfg.embedding_dim
        i_dim = len(spec.item_fields) * cfg.embedding_dim
        self.structure_embeddings = embedding_collection(
            [
                EmbeddingBagConfig(
                    name=table, embedding_dim=dim, num_embeddings=n, feature_names=[key],
                    pooling=PoolingType.SUM,
                )
                for table, dim, n, key in (
                    (SM_USER_TABLE, u_dim, spec.num_users, spec.user_id),
                    (SM_ITEM_TABLE, i_dim, spec.num_items, spec.item_id),
                )
            ],
            device,
        )

    def build_transfer(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        if self.use_cp:
            x_dim = input_width(spec, cfg)
            self.info_layer = InfoLayer(self.click_tower.out_dim, x_dim, cfg.info_layer, device)

    def cvr_input(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Eq. 11 with SM: ``x_cvr = U[u] ‖ I[i] ‖ ctx^cvr``; without it the CVR field embeddings."""
        if not self.use_sm:
            return super().cvr_input(features)
        _, _, cvr_ctx = self.cvr_embeddings(features)
        kt = self.structure_embeddings(features)
        return torch.cat([concat_by_keys(kt, [self.user_key, self.item_key]), cvr_ctx], dim=1)

    def transfer(self, h_ctr: torch.Tensor, x_cvr: torch.Tensor) -> torch.Tensor:
        """Eq. 13–14 with CP: ``x̃_cvr = x_cvr ⊙ InfoLayer(h_ctr)``."""
        return x_cvr * self.info_layer(h_ctr) if self.use_cp else x_cvr
