"""CSTWA (Ouyang et al., 2023) as restated in docs/method.md §2.

Separate CTR and CVR embedding collections (Eq. 6, ``SeparateEmbeddings``); the Click Perceptron (CP)
gates the CVR input with the click tower's last hidden state; the Curse Escaper (CE) lives in the loss
(``losses/curse_escaper.py``). The Structure Migrator (SM) has two readings (``structure.sm_reading``,
docs/method.md §2, "Two readings of the Structure Migrator"); in both, the per-entity tables ``U``/``I``
live in ``structure_embeddings`` (the registry declares them as the model's structure tables, which
the trainer's migrator writes):

* ``free`` (reading a, the default): ``U``/``I`` are trainable rows that replace the CVR user/item
  representations, and the trainer smooths them over the kNN graphs between epochs. The step's CVR
  collection then holds only the context fields: the CVR user/item field tables would be looked up and
  discarded every step. The side fields other than the ids live in ``cvr_side_embeddings``, read only
  when ``U``/``I`` are initialised (Eq. 8; the id slot of a row keeps the table's own random start,
  drawn like the id table it replaces).
* ``recomputed`` (reading b): the CVR collection keeps every field and trains; the structure tables
  hold ``P = Â^L R`` of the live CVR tables, recomputed by the trainer at the start and at every epoch
  boundary, and the conversion tower sees ``(1−β)·r^cvr + β·P[·].detach()`` per side. Detached, the
  lookup of ``P`` never runs a backward, so TorchRec's fused optimizer (applied in backward) never
  updates it: ``P`` changes only when the trainer recomputes it.

``model.shared_tables`` (ablation only, a deviation from Eq. 6) makes the CVR side read the CTR
collection instead of its own; the SM read-out (Eq. 8 / ``R``) then reads the CTR tables too.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig, StructureConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SeparateEmbeddings, SideViews, input_width
from cstwa_dist.models.blocks import FieldEmbeddings, InfoLayer, embedding_collection, init_bounds
from cstwa_dist.models.settings import CSTWASettings

STRUCTURE_COLLECTION = "structure_embeddings"  # attribute holding U and I (or P, reading b)
SIDE_COLLECTION = "cvr_side_embeddings"  # CVR tables of the non-id side fields (reading a, Eq. 8 only)
SM_USER_TABLE = "sm__user"
SM_ITEM_TABLE = "sm__item"


class CSTWA(SeparateEmbeddings):
    """Click tower on ``x_ctr``; conversion tower on ``x̃_cvr = x_cvr ⊙ 2b`` (CP) or ``x_cvr``.

    ``structure`` is the run's ``structure`` section: the SM reading decides which tables the CVR
    collection holds and, for reading (b), ``β`` enters the forward. Default: the paper's (reading a).
    ``settings``: CSTWA's own (``models.cstwa``: the SM/CP/CE switches, the Info Layer's widths).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        structure: StructureConfig | None = None,
        settings: CSTWASettings | None = None,
    ) -> None:
        structure = structure or StructureConfig()
        self.settings = settings or CSTWASettings()
        self.use_sm = self.settings.structure_migrator
        self.use_cp = self.settings.click_perceptron
        self.recomputed = self.use_sm and structure.sm_reading == "recomputed"
        self.beta = structure.beta
        self.user_key, self.item_key = spec.user_id, spec.item_id
        super().__init__(spec, cfg, device)

    def cvr_fields(self, spec: DatasetSpec) -> list[str] | None:
        # reading (a): U/I stand in for the user/item fields, so only the context fields are looked up
        return [f.name for f in spec.context_fields] if self.use_sm and not self.recomputed else None

    def build_cvr_input(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        if not self.use_sm:
            return
        side = [f.name for f in spec.user_fields[1:] + spec.item_fields[1:]]  # ids come first
        if side and not self.recomputed and not self.shared_tables:
            self.cvr_side_embeddings = FieldEmbeddings(
                spec, "cvr", cfg.embedding_dim, device, side, init_std=cfg.embedding_init_std
            )
        # U ∈ R^{N_U × M_u·D}, I ∈ R^{N_I × M_i·D}: one row per entity, keyed by its id (Decision).
        # Drawn like the field tables (their id slot stands in for the CVR id table in reading a).
        u_dim = len(spec.user_fields) * cfg.embedding_dim
        i_dim = len(spec.item_fields) * cfg.embedding_dim
        self.structure_embeddings = embedding_collection(
            [
                EmbeddingBagConfig(
                    name=table,
                    embedding_dim=dim,
                    num_embeddings=n,
                    feature_names=[key],
                    pooling=PoolingType.SUM,
                    **init_bounds(cfg.embedding_init_std),
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
            self.info_layer = InfoLayer(self.click_tower.out_dim, x_dim, self.settings.info_layer, device)

    def cvr_input(self, features: KeyedJaggedTensor, cvr: SideViews) -> torch.Tensor:
        """``x_cvr`` per SM reading (``[B, (M_u + M_i)·D + ctx]`` in every variant).

        SM off: ``r_u^cvr ‖ r_i^cvr ‖ ctx^cvr``. Reading (a), Eq. 11: ``U[u] ‖ I[i] ‖ ctx^cvr``.
        Reading (b): ``(1−β)·r_u^cvr + β·P_U[u]`` ‖ the same for items ‖ ``ctx^cvr``, with ``P``
        detached (a term fixed for the epoch; its table gets no gradient and no optimizer update).
        """
        if not self.use_sm:
            return super().cvr_input(features, cvr)
        c_u, c_i, c_ctx = cvr
        sm = self.structure_embeddings(features).to_dict()
        p_u, p_i = sm[self.user_key], sm[self.item_key]
        if not self.recomputed:
            return torch.cat([p_u, p_i, c_ctx], dim=1)
        b = self.beta
        x_u = (1.0 - b) * c_u + b * p_u.detach()
        x_i = (1.0 - b) * c_i + b * p_i.detach()
        return torch.cat([x_u, x_i, c_ctx], dim=1)

    def transfer(self, h_ctr: torch.Tensor, x_cvr: torch.Tensor) -> torch.Tensor:
        """Eq. 13–14 with CP: ``x̃_cvr = x_cvr ⊙ InfoLayer(h_ctr)``."""
        return x_cvr * self.info_layer(h_ctr) if self.use_cp else x_cvr
