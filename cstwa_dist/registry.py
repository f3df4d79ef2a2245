"""The one registry of models: name → how to build the model and its loss, and what it needs.

This is the junction between the rooms. ``models/`` (networks) and ``losses/`` (objectives) do not
know each other's registry entries, and the trainer, pre-training, the experiment planner and the CLI
learn everything they need about a model here — never by building or inspecting a model instance:

* ``structure_tables(model_cfg, structure_cfg, settings=...)``: the per-entity tables the Structure
  Migrator initialises and smooths, or recomputes (empty: the model needs no graphs);
* ``representation_source``: the field embeddings whose user/item tables give ``r_u``, ``r_i`` (the
  pre-training model);
* ``pretrain_only`` / ``in_table2``: which list a model belongs to (``train --model`` choices, the
  experiment's default Table 2 rows, in this order);
* ``takes_structure`` / ``shared_tables``: whether the model is built with the ``structure`` section
  (CSTWA: the SM reading shapes the network) and whether it honours ``model.shared_tables``;
* ``settings``: the model's own settings class (``cstwa_dist/models/settings.py``), a run config's
  ``models.<name>`` section; ``settings_in(cfg)`` is what ``build``, ``build_loss`` and
  ``structure_tables`` take as ``settings=``. The registry hands these classes to the config loader:
  use this module's :func:`load_config` / :func:`with_overrides` / :func:`default_config`, which
  check a ``models`` section against them, rather than ``cstwa_dist.config``'s, which cannot know
  them (config is the lowest room; importing the registry from there would run upward).

Adding a model touches its file under ``models/`` (and its settings class, if it has any), its entry
here and its tests.

Builders are named as ``"module:Class"`` strings and imported when called, so that importing this
module (``cstwa-dist --help``, planning an experiment) costs no torch or TorchRec import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from cstwa_dist import config
from cstwa_dist.config import ConfigError, LossConfig, ModelConfig, RunConfig, StructureConfig
from cstwa_dist.models.settings import AITMSettings, CSTWASettings, ModelSettings, MoESettings, PLESettings

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
    # path of the FieldEmbeddings the side's representation is read out of (Eq. 8, docs/method.md §2):
    # with ``reads_id`` False it holds the side's non-id field tables, and a row starts as its id slot
    # (the table's own random start) followed by those fields' embeddings; a model whose sides have no
    # other fields has no such module, and rows keep their own start. With ``reads_id`` True it holds
    # every field of the side, id included, and the read-out fills the whole row (reading b's ``R``;
    # reading a with shared tables, where the CTR id table exists anyway).
    init_from: str
    reads_id: bool = False
    # False: the table is never trained, only written by the migrator and read detached (reading b's
    # ``P``). Its fused optimizer is then plain SGD, which keeps no state: no gradient ever reaches
    # it, and Adam's two moments per weight (or Adagrad's one float per row) would be memory for nothing.
    trained: bool = True


# the loss's keyword arguments from the model's own settings (None for a model without any)
LossKwargs = Callable[[Any], Mapping[str, Any]]


class TablesFn(Protocol):
    """What a model needs from the migrator, given the shared model section, the ``structure``
    section (how the SM is read) and the model's own settings (its switches; None without any)."""

    def __call__(
        self, model_cfg: ModelConfig, structure_cfg: StructureConfig, settings: Any
    ) -> tuple[StructureTable, ...]: ...


def _no_kwargs(settings: Any) -> Mapping[str, Any]:
    return {}


def _no_tables(
    model_cfg: ModelConfig, structure_cfg: StructureConfig, settings: Any
) -> tuple[StructureTable, ...]:
    return ()


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the rest of the system may know about a model."""

    name: str
    description: str
    # "module:Class"; called as Class(spec, model_cfg, device, **model_kwargs), plus settings=... when
    # the model has a settings class
    model: str
    loss: str  # "module:Class"; called as Class(loss_cfg, comm=comm, **loss_kwargs(settings))
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    loss_kwargs: LossKwargs = _no_kwargs
    tables: TablesFn = _no_tables  # read through structure_tables(), which resolves the settings
    settings: type[ModelSettings] | None = None  # the model's own settings: models.<name> in a config
    representation_source: str | None = None
    pretrain_only: bool = False
    in_table2: bool = True
    takes_structure: bool = False  # the builder takes ``structure=StructureConfig`` (CSTWA's SM reading)
    shared_tables: bool = False  # honours model.shared_tables (separate CTR/CVR collections to share)

    @property
    def predicts_purchase(self) -> bool:
        """Every trainable model predicts purchases; the pre-training model predicts clicks only."""
        return not self.pretrain_only

    def settings_in(self, cfg: RunConfig) -> ModelSettings | None:
        """This model's own settings in ``cfg`` (``cfg.models[name]``); its defaults when ``cfg`` holds
        none (built without the registry's classes, so it cannot have set any); None without a class."""
        if self.settings is None:
            return None
        return self.own_settings(cfg.models.get(self.name))

    def own_settings(self, settings: ModelSettings | None = None) -> ModelSettings | None:
        """``settings`` checked to be this model's class, or the class's defaults when None."""
        if self.settings is None:
            if settings is not None:
                raise TypeError(f"{self.name} has no settings of its own, got {type(settings).__name__}")
            return None
        if settings is None:
            return self.settings()
        if not isinstance(settings, self.settings):
            raise TypeError(
                f"{self.name} reads {self.settings.__name__}, got {type(settings).__name__} "
                f"(pass settings=spec.settings_in(cfg))"
            )
        return settings

    def structure_tables(
        self,
        model_cfg: ModelConfig,
        structure_cfg: StructureConfig | None = None,
        *,
        settings: ModelSettings | None = None,
    ) -> tuple[StructureTable, ...]:
        """The per-entity tables the Structure Migrator initialises and smooths, or recomputes (empty:
        the model needs no graphs). ``structure_cfg`` default: the paper's reading; ``settings``
        default: the model's own defaults (``settings_in(cfg)`` gives a run's)."""
        return self.tables(model_cfg, structure_cfg or StructureConfig(), self.own_settings(settings))

    def needs_graphs(
        self,
        model_cfg: ModelConfig,
        structure_cfg: StructureConfig | None = None,
        *,
        settings: ModelSettings | None = None,
    ) -> bool:
        """True when training this model (with these switches) reads the user/item graphs."""
        return bool(self.structure_tables(model_cfg, structure_cfg, settings=settings))

    def check(self, model_cfg: ModelConfig) -> None:
        """Rejects switches this model cannot honour (before anything is built or distributed).

        ``model.shared_tables`` shares a separate CVR collection with the CTR one: a model that
        already feeds both towers from one collection would run unchanged under it, so it refuses
        rather than pretend to be ablated. A click-only model (pre-training) has no CVR side and
        ignores it, so that ``pretrain`` and ``train`` can share a config.
        """
        if model_cfg.shared_tables and not self.shared_tables and self.predicts_purchase:
            honour = sorted(s.name for s in _SPECS if s.shared_tables)
            raise ConfigError(
                f"model.shared_tables applies to models with separate CTR/CVR collections ({honour}); "
                f"{self.name} already shares one collection between its towers"
            )

    def build(
        self,
        spec: DatasetSpec,
        model_cfg: ModelConfig,
        device: torch.device | None,
        structure: StructureConfig | None = None,
        *,
        settings: ModelSettings | None = None,
    ) -> nn.Module:
        """The model, built on ``device`` (``meta`` for DistributedModelParallel).

        ``structure``: the run's ``structure`` section, passed to a model that ``takes_structure``
        (default: ``StructureConfig()``, the paper's reading); other models ignore it. ``settings``:
        the model's own (``settings_in(cfg)``; default: its class's defaults).
        """
        self.check(model_cfg)
        kwargs = dict(self.model_kwargs)
        if self.takes_structure:
            kwargs["structure"] = structure or StructureConfig()
        own = self.own_settings(settings)
        if own is not None:
            kwargs["settings"] = own
        return _load(self.model)(spec, model_cfg, device, **kwargs)

    def build_loss(
        self,
        loss_cfg: LossConfig,
        model_cfg: ModelConfig,
        comm: Collectives | None = None,
        *,
        settings: ModelSettings | None = None,
    ) -> nn.Module:
        """The loss; ``comm`` (default: one process) lets it normalise by the global batch and gather.
        ``settings``: the model's own, as for :meth:`build` (CSTWA's Curse Escaper switch)."""
        kwargs = dict(self.loss_kwargs(self.own_settings(settings)))
        if comm is not None:
            kwargs["comm"] = comm
        return _load(self.loss)(loss_cfg, **kwargs)


def _cstwa_tables(
    model_cfg: ModelConfig, structure_cfg: StructureConfig, settings: CSTWASettings
) -> tuple[StructureTable, ...]:
    """With SM on, ``U`` and ``I`` (CSTWA's ``structure_embeddings``), read out of the CVR tables.

    Reading (a) with separate tables: the CVR side tables without the ids (the id slot keeps the
    row's own start). Reading (b): the live CVR collection, every field. With ``model.shared_tables``
    the CTR collection, every field (its id tables exist anyway).
    """
    if not settings.structure_migrator:
        return ()
    from cstwa_dist.models.cstwa import SIDE_COLLECTION, SM_ITEM_TABLE, SM_USER_TABLE, STRUCTURE_COLLECTION

    recomputed = structure_cfg.sm_reading == "recomputed"
    if model_cfg.shared_tables:
        source, reads_id = "ctr_embeddings", True
    elif recomputed:
        source, reads_id = "cvr_embeddings", True
    else:
        source, reads_id = SIDE_COLLECTION, False
    return tuple(
        StructureTable(
            side=side,
            collection=STRUCTURE_COLLECTION,
            table=table,
            init_from=source,
            reads_id=reads_id,
            trained=not recomputed,
        )
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
        shared_tables=True,
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
        settings=MoESettings,
    ),
    ModelSpec(
        name="mmoe",
        description="MMoE: shared experts, one gate per task; purchase = p_ctr * p_cvr",
        model="cstwa_dist.models.moe:MMoE",
        loss=_ENTIRE_SPACE,
        settings=MoESettings,
    ),
    ModelSpec(
        name="ple",
        description="PLE: CGC levels of shared + task experts; purchase = p_ctr * p_cvr",
        model="cstwa_dist.models.moe:PLE",
        loss=_ENTIRE_SPACE,
        settings=PLESettings,
    ),
    ModelSpec(
        name="aitm",
        description="AITM: click info transferred to the purchase tower by attention (AIT); calibrator",
        model="cstwa_dist.models.aitm:AITM",
        loss="cstwa_dist.losses.constrained:AITMLoss",
        settings=AITMSettings,
    ),
    ModelSpec(
        name="escm2_ips",
        description="ESCM2-IPS: ESMM + IPS counterfactual CVR risk on clicks, p_ctr as propensity",
        model="cstwa_dist.models.escm2:ESCM2",
        model_kwargs=MappingProxyType({"doubly_robust": False}),
        loss="cstwa_dist.losses.counterfactual:ESCM2Loss",
        loss_kwargs=lambda _: {"variant": "ips"},
    ),
    ModelSpec(
        name="cstwa",
        description="CSTWA: Structure Migrator + Click Perceptron + Curse Escaper (each switchable)",
        model="cstwa_dist.models.cstwa:CSTWA",
        loss="cstwa_dist.losses.constrained:CSTWALoss",
        loss_kwargs=lambda s: {"curse_escaper": s.curse_escaper},
        tables=_cstwa_tables,
        settings=CSTWASettings,
        takes_structure=True,
        shared_tables=True,
    ),
    # trainable, outside the paper's Table 2
    ModelSpec(
        name="escm2_dr",
        description="ESCM2-DR: ESMM + doubly robust counterfactual CVR risk with an imputation tower",
        model="cstwa_dist.models.escm2:ESCM2",
        model_kwargs=MappingProxyType({"doubly_robust": True}),
        loss="cstwa_dist.losses.counterfactual:ESCM2Loss",
        loss_kwargs=lambda _: {"variant": "dr"},
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
# model name → its settings class, for the models that have one: what a config's ``models`` may hold
MODEL_SETTINGS: Mapping[str, type[ModelSettings]] = MappingProxyType(
    {s.name: s.settings for s in _SPECS if s.settings is not None}
)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """``config.load_config`` with the registered models' settings classes: a ``models`` section (and
    ``--set models.<name>.<key>=...``) is checked against them, and every model gets its settings."""
    return config.load_config(path, overrides, model_settings=MODEL_SETTINGS)


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """``config.with_overrides`` with the registered models' settings classes (see :func:`load_config`)."""
    return config.with_overrides(cfg, overrides, model_settings=MODEL_SETTINGS)


def default_config() -> RunConfig:
    """Every default, every model's own settings included: what a record that lacks a key meant."""
    return with_overrides(RunConfig(), [])


def describe_choices() -> str:
    """Every closed choice of a run config, the models' own included, as one line (``--set``'s help)."""
    return config.describe_choices(MODEL_SETTINGS)


def recorded_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config record (``config.flatten``) with the keys it recorded under a former name read
    under today's: a model's own settings were once flat ``model.<key>`` (``ModelSettings.FORMER_KEYS``).

    Without this, a cell recorded with ``model.click_perceptron: false`` would lack
    ``models.cstwa.click_perceptron``, be compared as if it had run with the default, and be reused.
    """
    out = dict(flat)
    for name, cls in MODEL_SETTINGS.items():
        for key, former in cls.FORMER_KEYS.items():
            new = f"models.{name}.{key}"
            if former in flat and new not in out:
                out[new] = flat[former]
    return out


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
