"""The two shapes every registered model takes, so that each model file says only what is its own.

* ``SharedBottom``: one embedding collection, ``x = r_u ‖ r_i ‖ ctx``, feeds a click tower and a
  conversion tower (ESMM, ESCM², AITM, OMoE/MMoE/PLE, and the click-only pre-training MLP). The
  default purchase prediction is ESMM's ``p_ctcvr = p_ctr · p_cvr``; subclasses override one method:
  ``task_representations`` (what each tower sees: the mixtures of experts) or ``outputs`` (what is
  returned: ESCM²'s extra tensors).
* ``SeparateEmbeddings``: separate CTR and CVR embedding collections, each feeding its own tower (the
  MLP baseline, and CSTWA per Eq. 6). Subclasses override ``cvr_input`` (the Structure Migrator's
  ``U``/``I``) and ``transfer`` (the Click Perceptron's gate). ``model.shared_tables`` (ablation
  only, a deviation from Eq. 6) drops the CVR collection: the CVR side reads the CTR one's output.

Models declare nothing to the trainer: what a model needs (graphs, structure tables, a
representation source) is declared in its registry entry (``cstwa_dist/registry.py``), so nobody
has to build or inspect a model instance to find out. Modules are created in a fixed order because
DistributedModelParallel initialises the parameters of a ``meta`` model in that order (same seed,
same weights).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.blocks import FieldEmbeddings, MLPTower, ctcvr_logit, tower_with_logit
from cstwa_dist.models.outputs import ModelOutput

logger = logging.getLogger(__name__)

# (r_u, r_i, ctx) of one collection for a batch: FieldEmbeddings' output
SideViews = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RecModel(nn.Module):
    """Base of every registered model: ``forward(features: KeyedJaggedTensor) -> ModelOutput`` (logits)."""


class SharedBottom(RecModel):
    """Shared field embeddings → click tower + logit, conversion tower (+ logit unless told otherwise).

    ``rep_dim`` is the width of what the towers see when ``task_representations`` changes it (the
    mixtures of experts); by default the towers see ``x`` itself. ``conversion_layer=False`` builds the
    conversion tower without its logit layer, for a model that fuses something into its output first
    (AITM); ``conversion_tower=False`` builds no conversion side at all (the click-only CTR MLP).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None,
        *,
        prefix: str = "shared",
        rep_dim: int | None = None,
        conversion_tower: bool = True,
        conversion_layer: bool = True,
    ) -> None:
        super().__init__()
        self.embeddings = FieldEmbeddings(
            spec,
            prefix,
            cfg.embedding_dim,
            device,
            context_pooling=cfg.context_pooling,
            init_std=cfg.embedding_init_std,
        )
        # width of x = r_u ‖ r_i ‖ ctx, the input of the towers (or of the first expert layer)
        self.in_dim = self.embeddings.out_dim
        width = rep_dim or self.in_dim
        self.click_tower, self.click_layer = tower_with_logit(width, cfg.ctr_tower, cfg.dropout, device)
        if conversion_tower and conversion_layer:
            self.conversion_tower, self.conversion_layer = tower_with_logit(
                width, cfg.cvr_tower, cfg.dropout, device
            )
        elif conversion_tower:
            self.conversion_tower = MLPTower(width, cfg.cvr_tower, cfg.dropout, device)

    def inputs(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``x = r_u ‖ r_i ‖ ctx``: ``[B, (M_u + M_i)·D + D]``."""
        r_u, r_i, ctx = self.embeddings(features)
        return torch.cat([r_u, r_i, ctx], dim=1)

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, in]`` → (click tower input, conversion tower input); both ``x`` by default."""
        return x, x

    def outputs(self, x: torch.Tensor, click_logit: torch.Tensor, cvr_logit: torch.Tensor) -> ModelOutput:
        """The entire-space purchase prediction ``logit(p_ctr · p_cvr)`` (ESMM's CTCVR)."""
        return ModelOutput(click_logit=click_logit, purchase_logit=ctcvr_logit(click_logit, cvr_logit))

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        x = self.inputs(features)
        h_ctr, h_cvr = self.task_representations(x)
        click_logit = self.click_layer(self.click_tower(h_ctr)).squeeze(-1)
        cvr_logit = self.conversion_layer(self.conversion_tower(h_cvr)).squeeze(-1)
        return self.outputs(x, click_logit, cvr_logit)


def input_width(spec: DatasetSpec, cfg: ModelConfig) -> int:
    """Width of ``r_u ‖ r_i ‖ ctx`` for a spec: ``(M_u + M_i)·d`` plus the pooled context."""
    ctx = 1 if cfg.context_pooling == "mean" else len(spec.context_fields)
    return (len(spec.user_fields) + len(spec.item_fields) + ctx) * cfg.embedding_dim


class SeparateEmbeddings(RecModel):
    """``click_logit = ClickLayer(ClickTower(x^ctr))``; ``purchase_logit = ConvLayer(ConvTower(x^cvr))``.

    Separate embedding collections (table prefixes ``ctr`` / ``cvr``) keep the two sides apart: the
    CVR loss never updates the CTR tables, and vice versa. The purchase logit is the CVR side's own
    prediction, output for every impression. ``build_cvr_input`` and ``build_transfer`` run between the
    collections and the towers so that subclasses add their modules in the order DMP initialises.

    ``cfg.shared_tables`` (ablation only, not the paper's Eq. 6): no CVR collection is built and the
    CVR side reads the CTR collection's output of the same step (one lookup serves both towers), so
    both losses train the CTR tables. Logged as a warning at build, so no run uses it unnoticed.
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        d = cfg.embedding_dim
        pool = cfg.context_pooling
        std = cfg.embedding_init_std
        self.shared_tables = cfg.shared_tables
        self.ctr_embeddings = FieldEmbeddings(spec, "ctr", d, device, context_pooling=pool, init_std=std)
        if self.shared_tables:
            logger.warning(
                "%s: model.shared_tables=true — the CVR side reads the CTR collection's field "
                "embeddings; a deviation from the paper's Eq. 6 (separate collections), for ablation only",
                type(self).__name__,
            )
        else:
            self.cvr_embeddings = FieldEmbeddings(spec, "cvr", d, device, self.cvr_fields(spec), pool, std)
        self.build_cvr_input(spec, cfg, device)
        # x^cvr has the width of r_u ‖ r_i ‖ ctx in every variant, whichever tables produce it
        x_dim = input_width(spec, cfg)
        self.click_tower, self.click_layer = tower_with_logit(
            self.ctr_embeddings.out_dim, cfg.ctr_tower, cfg.dropout, device
        )
        self.build_transfer(spec, cfg, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            x_dim, cfg.cvr_tower, cfg.dropout, device
        )

    def cvr_fields(self, spec: DatasetSpec) -> list[str] | None:
        """The fields the CVR collection has tables for (all by default; unused with shared tables)."""
        return None

    @property
    def cvr_source(self) -> str:
        """Attribute name of the field embeddings the CVR side reads (``ctr_embeddings`` if shared)."""
        return "ctr_embeddings" if self.shared_tables else "cvr_embeddings"

    def build_cvr_input(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        """Modules ``cvr_input`` needs beyond the CVR field embeddings (none by default)."""

    def build_transfer(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        """Modules ``transfer`` needs (none by default)."""

    def cvr_views(self, features: KeyedJaggedTensor, ctr: SideViews) -> SideViews:
        """``(r_u^cvr, r_i^cvr, ctx^cvr)``: the CVR collection's lookup, or ``ctr`` itself when the
        tables are shared (no second lookup of the same tables)."""
        return ctr if self.shared_tables else self.cvr_embeddings(features)

    def cvr_input(self, features: KeyedJaggedTensor, cvr: SideViews) -> torch.Tensor:
        """``x^cvr = r_u^cvr ‖ r_i^cvr ‖ ctx^cvr``: ``[B, (M_u + M_i)·D + D]`` from ``cvr_views``."""
        return torch.cat(list(cvr), dim=1)

    def transfer(self, h_ctr: torch.Tensor, x_cvr: torch.Tensor) -> torch.Tensor:
        """What the conversion tower sees, given the click tower's last hidden state (``x^cvr`` as is)."""
        return x_cvr

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        ctr = self.ctr_embeddings(features)
        h_ctr = self.click_tower(torch.cat(list(ctr), dim=1))
        click_logit = self.click_layer(h_ctr).squeeze(-1)
        x_cvr = self.transfer(h_ctr, self.cvr_input(features, self.cvr_views(features, ctr)))
        cvr_logit = self.conversion_layer(self.conversion_tower(x_cvr)).squeeze(-1)
        return ModelOutput(click_logit=click_logit, purchase_logit=cvr_logit)
