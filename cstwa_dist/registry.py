"""The one registry of models: name → how to build the model and its loss, and what it needs.

This is the junction between the rooms. ``models/`` (networks) and ``losses/`` (objectives) do not
know each other's registry entries, and the trainer, pre-training, the experiment planner and the CLI
learn everything they need about a model here — never by building or inspecting a model instance:

* ``structure_tables(model_cfg)``: the per-entity tables the Structure Migrator initialises and
  smooths (empty: the model needs no graphs);
* ``representation_source``: the field embeddings whose user/item tables give ``r_u``, ``r_i`` (the
  pre-training model);
* ``pretrain_only`` / ``in_table2``: which list a model belongs to (``train --model`` choices, the
  experiment's default Table 2 rows, in this order).

Adding a model touches its file under ``models/``, its entry here and its tests.

Builders are named as ``"module:Class"`` strings and imported when called, so that importing this
module (``cstwa-dist --help``, planning an experiment) costs no torch or TorchRec import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cstwa_dist.config import LossConfig, ModelConfig

if TYPE_CHECKING:  # only for annotations: the heavy modules load when a builder is called
    import torch
    from torch import nn

    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.losses.common import Collectives


@dataclass(frozen=True, kw_only=True)
class StructureTable:
    """A trainable per-entity table the Structure Migrator smooths over a kNN graph between epochs.

    ``collection`` and ``init_from`` are attribute paths inside the model (``a.b``) so that the
    trainer can find the (sharded) modules after DistributedModelParallel has replaced them.
    """

    side: str  # "user" | "item": which graph and which entity ids
    collection: str  # path of the EmbeddingBagCollection holding the table
    table: str  # table name inside that collection
    # path of the FieldEmbeddings holding the side's non-id field tables: a row starts as its id slot
    # (the table's own random start) followed by those fields' embeddings (Eq. 8, docs/method.md §2);
    # a model whose sides have no other fields has no such module, and rows keep their own start
    init_from: str


LossKwargs = Callable[[ModelConfig], Mapping[str, Any]]


def _no_kwargs(model_cfg: ModelConfig) -> Mapping[str, Any]:
    return {}


def _no_tables(model_cfg: ModelConfig) -> tuple[StructureTable, ...]:
    return ()


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the rest of the system may know about a model."""

    name: str
    description: str
    model: str  # "module:Class"; called as Class(spec, model_cfg, device, **model_kwargs)
    loss: str  # "module:Class"; called as Class(loss_cfg, comm=comm, **loss_kwargs(model_cfg))
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    loss_kwargs: LossKwargs = _no_kwargs
    structure_tables: Callable[[ModelConfig], tuple[StructureTable, ...]] = _no_tables
    representation_source: str | None = None
    pretrain_only: bool = False
    in_table2: bool = True

    @property
    def predicts_purchase(self) -> bool:
        """Every trainable model predicts purchases; the pre-training model predicts clicks only."""
        return not self.pretrain_only

    def needs_graphs(self, model_cfg: ModelConfig) -> bool:
        """True when training this model (with these switches) reads the user/item graphs."""
        return bool(self.structure_tables(model_cfg))

    def build(self, spec: DatasetSpec, model_cfg: ModelConfig, device: torch.device | None) -> nn.Module:
        """The model, built on ``device`` (``meta`` for DistributedModelParallel)."""
        return _load(self.model)(spec, model_cfg, device, **self.model_kwargs)

    def build_loss(
        self, loss_cfg: LossConfig, model_cfg: ModelConfig, comm: Collectives | None = None
    ) -> nn.Module:
        """The loss; ``comm`` (default: one process) lets it normalise by the global batch and gather."""
        kwargs = dict(self.loss_kwargs(model_cfg))
        if comm is not None:
            kwargs["comm"] = comm
        return _load(self.loss)(loss_cfg, **kwargs)


def _cstwa_tables(model_cfg: ModelConfig) -> tuple[StructureTable, ...]:
    """With SM on, ``U`` and ``I`` (CSTWA's ``structure_embeddings``) start from the CVR side tables."""
    if not model_cfg.structure_migrator:
        return ()
    from cstwa_dist.models.cstwa import SIDE_COLLECTION, SM_ITEM_TABLE, SM_USER_TABLE, STRUCTURE_COLLECTION

    return tuple(
        StructureTable(side=side, collection=STRUCTURE_COLLECTION, table=table, init_from=SIDE_COLLECTION)
        for side, table in (("user", SM_USER_TABLE), ("item", SM_ITEM_TABLE))
    )


_ENTIRE_SPACE = "cstwa_dist.losses.bce:EntireSpaceLoss"

_SPECS = (
    # Table 2's rows, in the paper's order
    ModelSpec(
        name="mlp",
        description="two independent single-task MLPs; purchase tower trained on clicked rows only",
        model="cstwa_dist.models.mlp:SingleTaskMLPs",
        loss="cstwa_dist.losses.bce:ClickedSpaceLoss",
    ),
    ModelSpec(
        name="esmm",
        description="ESMM: shared embeddings, p_ctcvr = p_ctr * p_cvr over the entire space",
        model="cstwa_dist.models.esmm:ESMM",
        loss=_ENTIRE_SPACE,
    ),
    ModelSpec(
        name="omoe",
        description="OMoE: shared experts, one gate for both tasks; purchase = p_ctr * p_cvr",
        model="cstwa_dist.models.moe:OMoE",
        loss=_ENTIRE_SPACE,
    ),
    ModelSpec(
        name="mmoe",
        description="MMoE: shared experts, one gate per task; purchase = p_ctr * p_cvr",
        model="cstwa_dist.models.moe:MMoE",
        loss=_ENTIRE_SPACE,
    ),
    ModelSpec(
        name="ple",
        description="PLE: CGC levels of shared + task experts; purchase = p_ctr * p_cvr",
        model="cstwa_dist.models.moe:PLE",
        loss=_ENTIRE_SPACE,
    ),
    ModelSpec(
        name="aitm",
        description="AITM: click info transferred to the purchase tower by attention (AIT); calibrator",
        model="cstwa_dist.models.aitm:AITM",
        loss="cstwa_dist.losses.constrained:AITMLoss",
    ),
    ModelSpec(
        name="escm2_ips",
        description="ESCM2-IPS: ESMM + IPS counterfactual CVR risk on clicks, p_ctr as propensity",
        model="cstwa_dist.models.escm2:ESCM2",
        model_kwargs=MappingProxyType({"doubly_robust": False}),
        loss="cstwa_dist.losses.counterfactual:ESCM2Loss",
        loss_kwargs=lambda mc: {"variant": "ips"},
    ),
    ModelSpec(
        name="cstwa",
        description="CSTWA: Structure Migrator + Click Perceptron + Curse Escaper (each switchable)",
        model="cstwa_dist.models.cstwa:CSTWA",
        loss="cstwa_dist.losses.constrained:CSTWALoss",
        loss_kwargs=lambda mc: {"curse_escaper": mc.curse_escaper},
        structure_tables=_cstwa_tables,
    ),
    # trainable, outside the paper's Table 2
    ModelSpec(
        name="escm2_dr",
        description="ESCM2-DR: ESMM + doubly robust counterfactual CVR risk with an imputation tower",
        model="cstwa_dist.models.escm2:ESCM2",
        model_kwargs=MappingProxyType({"doubly_robust": True}),
        loss="cstwa_dist.losses.counterfactual:ESCM2Loss",
        loss_kwargs=lambda mc: {"variant": "dr"},
        in_table2=False,
    ),
    # used by `pretrain` only
    ModelSpec(
        name="ctr_mlp",
        description="plain CTR MLP pre-trained to mine user/item structure (click only)",
        model="cstwa_dist.models.ctr_mlp:CTRMLP",
        loss="cstwa_dist.losses.bce:ClickLoss",
        loss_kwargs=_no_kwargs,
        representation_source="embeddings",
        pretrain_only=True,
        in_table2=False,
    ),
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType({s.name: s for s in _SPECS})
PRETRAIN_MODEL = "ctr_mlp"


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None


def trainable_models() -> list[str]:
    """Names ``train --model`` accepts (every model but the pre-training one), sorted."""
    return sorted(n for n, s in MODELS.items() if not s.pretrain_only)


def table2_models() -> list[str]:
    """The models of the paper's Table 2, in the order the report lists them."""
    return [n for n, s in MODELS.items() if s.in_table2]
