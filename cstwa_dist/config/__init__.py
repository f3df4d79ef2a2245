"""Typed run configuration: YAML files in ``configs/`` plus ``--set section.key=value`` overrides.

Every component has a kw-only dataclass validated in ``__post_init__`` so that a typo or a bad value
fails before any process group, Ray runtime or dataset is touched, with the valid keys listed. A
closed choice is a ``Literal[...]`` field: the loader checks it (:func:`check_choices`) and
:func:`choices` lists every one for ``--help``, so the allowed values are written once, in the type.

What every model shares (``model``) lives here. What one model alone reads lives next to that model
(``cstwa_dist/models/settings.py``) and reaches a run config as ``models.<name>.<key>``: this room,
the lowest, cannot know those classes, so the registry (which names them) hands them to
:func:`load_config` / :func:`with_overrides` as ``model_settings``; callers use the registry's
``load_config`` / ``with_overrides``, which do exactly that.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not describe a valid run."""


# Closed choices read outside this module too get a name, so their values are written once.
ContextPooling = Literal["mean", "concat"]
SelectEpoch = Literal["best_val_purchase_auc", "last"]


@dataclass(kw_only=True)
class DataConfig:
    """Where the dataset is and how the Ray Data reader feeds each rank."""

    dataset: str = "data/demo"
    batch_size: int = 2000  # per rank; paper: 2000
    eval_batch_size: int = 8192
    prefetch_batches: int = 2
    shuffle: bool = True
    ray_num_cpus: int | None = None  # for a private local Ray runtime; None = Ray's default
    # Row shares the training split is cut into (data/reader.py, "Shares"); 0 = one per rank. A step's
    # global batch is every share's next batch, so runs at any world size dividing `shares` (with the
    # same global batch size) train on the same global batches and the same dropout masks.
    shares: int = 0

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "eval_batch_size")
        if self.prefetch_batches < 0:
            raise ConfigError("data.prefetch_batches must be >= 0")
        if self.shares < 0:
            raise ConfigError("data.shares must be >= 0 (0 = one share per rank)")


@dataclass(kw_only=True)
class ModelConfig:
    """Shapes shared by all models (docs/method.md §4).

    A setting only one model reads (CSTWA's component switches, the experts of the mixture-of-experts
    baselines, AITM's attention width) is that model's own: ``cstwa_dist/models/settings.py``.
    """

    embedding_dim: int = 8
    ctr_tower: list[int] = field(default_factory=lambda: [128, 64, 32])
    cvr_tower: list[int] = field(default_factory=lambda: [128, 64, 32])
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.3])
    # How every model turns its context fields into the context part of its input: "mean" of their
    # embeddings (Eq. 7, the paper's choice, [B, d]) or "concat" ([B, M_ctx·d], what the baselines'
    # reference implementations do with every field; Ali-CCP's cross features are context fields).
    # Applied to all models alike; the default is the paper's until measured otherwise.
    context_pooling: ContextPooling = "mean"
    # Ablation only, a labelled deviation from Eq. 6: the CVR side reads the CTR collection's field
    # embeddings instead of its own (docs/method.md §2, "Two readings of the Structure Migrator").
    # Honoured by CSTWA and the MLP baseline; every other trainable model already shares one
    # collection between its towers and rejects it (registry.py), so a run never pretends to ablate.
    shared_tables: bool = False
    # Standard deviation every embedding table starts with; 0 = TorchRec's default uniform ±√(1/N)
    # per table (models/blocks.py init_bounds says why that matters).
    embedding_init_std: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.embedding_init_std) and self.embedding_init_std >= 0):
            raise ConfigError(f"model.embedding_init_std must be >= 0, got {self.embedding_init_std}")
        check_choices(self, "model")
        if self.embedding_dim < 4 or self.embedding_dim % 4:
            raise ConfigError(
                f"model.embedding_dim={self.embedding_dim}: FBGEMM's table-batched kernels need a "
                "positive multiple of 4 (docs/method.md: d = 8 by default)"
            )
        for name in ("ctr_tower", "cvr_tower"):
            widths = getattr(self, name)
            if not widths or any(w < 1 for w in widths):
                raise ConfigError(f"model.{name} must be a non-empty list of positive widths")
        if len(self.dropout) != len(self.ctr_tower) or len(self.dropout) != len(self.cvr_tower):
            raise ConfigError("model.dropout needs one rate per tower layer")
        if any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ConfigError("model.dropout rates must be in [0, 1)")


@dataclass(kw_only=True)
class LossConfig:
    """Curse Escaper weights and the loss mix of Eq. 17–20."""

    gamma: float = 3.0
    window: int = 10_000  # previous CTR predictions the percentiles are taken over
    high_percentile: float = 99.0
    low_percentile: float = 10.0
    ctr_weight: float = 1.0
    cvr_weight: float = 1.0
    constraint_weight: float = 0.6
    # ESCM2 (escm2_ips / escm2_dr): counterfactual regulariser on the clicked space, p_ctr as propensity
    counterfactual_weight: float = 1.0
    propensity_clip: float = 0.01  # lower bound on p_ctr in 1/p_ctr, so rare-click rows cannot explode

    def __post_init__(self) -> None:
        if self.gamma < 1.0:
            raise ConfigError("loss.gamma must be >= 1 (it up-weights conflicting samples)")
        if self.window < 1:
            raise ConfigError("loss.window must be >= 1")
        if not 0.0 < self.propensity_clip < 1.0:
            raise ConfigError("loss.propensity_clip must be in (0, 1)")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ConfigError("need 0 <= loss.low_percentile < loss.high_percentile <= 100")


@dataclass(kw_only=True)
class StructureConfig:
    """Graph mining (pretrain → kNN → Â) and the Structure Migrator's propagation (§1, §2)."""

    k: int = 8
    layers: int = 1
    beta: float = 0.3
    graph_dir: str = "runs/demo/structure"  # written by `pretrain`, read by `train`
    pretrain_epochs: int = 1
    # kNN search of the graph build (structure/ivf.py; defaults measured in docs/structure-scaling.md):
    # "ivf" = Faiss IVF per row shard, "exact" = brute force through the same ring (the reference)
    knn: Literal["ivf", "exact"] = "ivf"
    nlist: int = 0  # IVF cells; 0 = 4·√N (at most N/39)
    nprobe: int = 16  # cells searched per query (recall@8 0.987 at 1M × 45 measured)
    pq_m: int = 0  # > 0: PQ codes of pq_m bytes instead of float rows (memory), candidates re-scored
    recall_queries: int = 1000  # recall@k against exact on this many sampled queries, written with the graph
    save_representations: bool = True  # <side>_representations/ parts + manifest next to the graphs
    # The two readings of the Structure Migrator (docs/method.md §2): "free" (the default, reading a):
    # U/I are trainable per-entity rows, started by Eq. 8 and smoothed by Eq. 10 between epochs;
    # "recomputed" (reading b): the CVR field tables keep training, and P = Â^L R of the live tables
    # is recomputed at the start and at every epoch boundary and enters x_cvr as a fixed β-term.
    # The model's CVR collection depends on it, so the model is built with this section too.
    sm_reading: Literal["free", "recomputed"] = "free"
    # How reading (a) starts U/I: "fields" (Eq. 8, the default: id slot keeps its own random start,
    # the other side fields from the CVR side embeddings) or "pretrained" (the pre-trained r_u/r_i the
    # graph was mined from, <graph_dir>/<side>_representations/; needs save_representations).
    sm_init: Literal["fields", "pretrained"] = "fields"

    def __post_init__(self) -> None:
        _positive(self, "k", "layers", "pretrain_epochs", "nprobe")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("structure.beta must be in [0, 1]")
        check_choices(self, "structure")
        if self.sm_reading == "recomputed" and self.sm_init == "pretrained":
            raise ConfigError(
                "structure.sm_init=pretrained applies to structure.sm_reading=free only: the recomputed "
                "reading has no free U/I rows to start; it recomputes Â^L R from the live CVR tables"
            )
        if self.nlist < 0 or self.pq_m < 0 or self.recall_queries < 0:
            raise ConfigError("structure.nlist, structure.pq_m and structure.recall_queries must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """Adam for dense parameters (paper); a fused FBGEMM optimizer for the embedding tables.

    ``embedding`` = ``auto`` is exact row-wise Adagrad at ``embedding_lr`` on every device: FBGEMM
    has that kernel on CPU and GPU alike, so a GPU run trains the model every CPU measurement
    describes (docs/method.md §4). ``adam`` (FBGEMM's fused Adam) is an explicit choice, GPU only
    (FBGEMM has no fused Adam on CPU, docs/platform-notes.md), and needs its own ``embedding_adam_lr``:
    no learning rate for it was ever measured here, and Adagrad's 0.1 would be far too large for it.
    ``embedding_eps`` goes to either kernel (1e-8, FBGEMM's default, which every earlier run used).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-6  # the paper's L2
    embedding: Literal["auto", "adam", "rowwise_adagrad"] = "auto"
    # row-wise Adagrad's learning rate; 0.1 measured best on validation next to 0.02 and 0.3
    # (docs/experiments/README.md, "Learning what the data holds"); configs/paper.yaml keeps 0.02
    embedding_lr: float = 0.1
    # fused Adam's learning rate (optim.embedding=adam only, where it must be given)
    embedding_adam_lr: float | None = None
    embedding_eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if self.lr <= 0 or self.embedding_lr <= 0 or self.weight_decay < 0:
            raise ConfigError("optim learning rates must be > 0 and weight_decay >= 0")
        if not self.embedding_eps > 0:
            raise ConfigError(f"optim.embedding_eps must be > 0, got {self.embedding_eps}")
        if self.embedding_adam_lr is not None and not self.embedding_adam_lr > 0:
            raise ConfigError(f"optim.embedding_adam_lr must be > 0, got {self.embedding_adam_lr}")
        if self.embedding == "adam" and self.embedding_adam_lr is None:
            raise ConfigError(
                "optim.embedding=adam needs optim.embedding_adam_lr (fused Adam's learning rate; none was "
                "measured here, and optim.embedding_lr is row-wise Adagrad's)"
            )


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: epochs, seed, where results go, how chatty."""

    epochs: int = 3
    seed: int = 0
    run_dir: str = "runs/demo"
    log_every: int = 50
    eval_split: Literal["val", "test"] = "test"
    validate_every_epoch: bool = True
    # Which epoch's test metrics a run reports (cstwa_dist/train/metrics.py): "best_val_purchase_auc",
    # the paper's protocol as in AITM's reference code (needs validate_every_epoch; without validation
    # or a purchase head the run reports the last epoch and says so in metrics.json), or "last".
    select_epoch: SelectEpoch = "best_val_purchase_auc"
    # "sparse_dist": TorchRec's TrainPipelineSparseDist (the next batch's device copy and input
    # all-to-all overlap this batch's compute); "plain": forward/backward/step one batch at a time.
    # Both compute the same parameters (tested); plain is for debugging and for measuring the overlap.
    pipeline: Literal["sparse_dist", "plain"] = "sparse_dist"
    # checkpoints (torch.distributed.checkpoint): every N steps (0 = only at epoch ends) and at every
    # epoch end, under checkpoint_dir (default <run dir>/checkpoints), the newest keep_checkpoints kept
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    # "never": start fresh; "auto": continue from the newest complete checkpoint if there is one;
    # any other value: the checkpoint folder to continue from
    resume: str = "never"
    # Warm start (docs/retrain.md): a previous run folder, one of its checkpoints, or an exported model
    # folder whose source checkpoint exists. A fresh run copies its tables' rows that existed there
    # (the data set's vocabulary must extend that run's) and its dense layers; new rows and the
    # optimizer state start fresh. A resume from this run's own checkpoint takes precedence.
    init_from: str | None = None
    # TensorBoard scalars under <run dir>/tb on rank 0 (docs: README, "Watching a run")
    tensorboard: bool = True
    # At every test pass, each rank writes its rows' ids, labels and predictions to
    # <run dir>/predictions/<split>/part-rank-NNNNN.parquet and rank 0 a manifest.json (docs/export.md):
    # what an exported model must reproduce, and the scores an offline analysis reads.
    write_predictions: bool = False
    # How long a collective may wait for a peer before the job fails. Set above the longest work one
    # rank does while the others wait (IVF quantizer training on rank 0: ~10 min projected at 30M
    # users on a CPU rank, docs/structure-scaling.md; a checkpoint write), and well below "forever":
    # a hung peer (NCCL's default is 10 min, gloo's 30) then ends the job in half an hour.
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _positive(self, "epochs", "log_every", "keep_checkpoints")
        check_choices(self, "train")
        if self.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every must be >= 0 (0: only at epoch ends)")
        if not self.collective_timeout_s > 0:
            raise ConfigError("train.collective_timeout_s must be > 0")


# The settings classes of the models that have their own (``models.<name>``), by registered model
# name; the registry builds it (``cstwa_dist.registry.MODEL_SETTINGS``) and passes it in.
ModelSettingsTypes = Mapping[str, type]


@dataclass(kw_only=True)
class RunConfig:
    """One run: every section above, and ``models``: each model's own settings by registered name.

    ``models`` holds an instance of every registered settings class when the config was loaded with
    them (the registry's loader); built without them (``RunConfig()``, this module's loader) it is
    empty, and a model reads its defaults (``registry.ModelSpec.settings_in``) — the only values such
    a config can mean, since a ``models`` section cannot be loaded without its classes.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.removesuffix("Config").lower()
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{section}.{n} must be >= 1, got {getattr(obj, n)}")


def _literal_of(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        for a in typing.get_args(tp):
            found = _literal_of(a)
            if found is not None:
                return found
    return None


def _one_of(value: Any, allowed: tuple[Any, ...], where: str) -> Any:
    # compared with the type too: ``True == 1``, and a YAML ``1`` is not the string ``"1"``
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise ConfigError(f"{where}: must be one of {' | '.join(map(str, allowed))}, got {value!r}")
    return value


def check_choices(obj: Any, where: str) -> None:
    """Raises ``ConfigError`` naming the allowed values when a ``Literal`` field of the dataclass
    ``obj`` holds another value. Called from ``__post_init__``, so a section built directly in code
    is held to its choices as much as one loaded from YAML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = _literal_of(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and not (value is None and type(None) in typing.get_args(hints[f.name])):
            _one_of(value, allowed, f"{where}.{f.name}")


def choices(model_settings: ModelSettingsTypes | None = None) -> dict[str, tuple[Any, ...]]:
    """Every closed choice a run config has, ``section.key`` (``models.<name>.key``) → allowed values.

    Read off the ``Literal`` types, so ``--help`` lists exactly what the loader accepts.
    """
    run = typing.get_type_hints(RunConfig)
    sections: list[tuple[str, Any]] = [(n, tp) for n, tp in run.items() if dataclasses.is_dataclass(tp)]
    sections += [(f"models.{n}", cls) for n, cls in sorted((model_settings or {}).items())]
    out: dict[str, tuple[Any, ...]] = {}
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            allowed = _literal_of(hints[f.name])
            if allowed is not None:
                out[f"{prefix}.{f.name}"] = allowed
    return out


def describe_choices(model_settings: ModelSettingsTypes | None = None) -> str:
    """:func:`choices` as one line for a help text: ``key: a|b; key: c|d``."""
    return "; ".join(f"{k}: {'|'.join(map(str, v))}" for k, v in choices(model_settings).items())


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against a dataclass field type (the few types used above)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _one_of(value, typing.get_args(tp), where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(
    cls: type, raw: Mapping[str, Any], where: str, model_settings: ModelSettingsTypes | None = None
) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {valid}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        here = f"{where}.{name}" if where else name
        if cls is RunConfig and name == "models":
            kwargs[name] = _build_models(value, model_settings)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{here}: expected a mapping")
            kwargs[name] = _build(tp, value, here)
        else:
            kwargs[name] = _coerce(value, tp, here)
    if cls is RunConfig and "models" not in kwargs:
        kwargs["models"] = _build_models({}, model_settings)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _build_models(raw: Any, model_settings: ModelSettingsTypes | None) -> dict[str, Any]:
    """The ``models`` section: one settings instance per model that has a settings class, its
    defaults where the section says nothing (so a run records every model's settings)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"models: expected a mapping of model name → its settings, got {raw!r}")
    if model_settings is None:
        if raw:
            raise ConfigError(
                f"models: per-model settings ({sorted(raw)}) are checked against the models' settings "
                "classes, which only the registry knows: load the config with "
                "cstwa_dist.registry.load_config / with_overrides"
            )
        return {}
    unknown = sorted(set(raw) - set(model_settings))
    if unknown:
        raise ConfigError(
            f"models: unknown model(s) {unknown}; models with settings of their own: {sorted(model_settings)}"
        )
    out = {}
    for name, cls in model_settings.items():
        sub = raw.get(name)
        if sub is None:  # absent, or a YAML `ple:` with nothing under it
            sub = {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"models.{name}: expected a mapping of its settings, got {sub!r}")
        out[name] = _build(cls, sub, f"models.{name}")
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies ``section.key=value`` or ``section.sub.key=value`` (``models.ple.levels=3``) to a raw
    config; the value is parsed as YAML (``3``, ``0.5``, ``true``, ``[64,32]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"override key {key!r} must be section.key (or models.MODEL.key), e.g. train.epochs=2"
        )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = node[part]
    node[parts[-1]] = yaml.safe_load(text)


def with_overrides(
    cfg: RunConfig,
    overrides: list[str] | tuple[str, ...],
    model_settings: ModelSettingsTypes | None = None,
) -> RunConfig:
    """A new config: ``cfg`` with ``section.key=value`` overrides applied, validated like a loaded file.

    ``model_settings`` (the registry's): the classes the ``models`` section is checked against;
    default: those of the settings ``cfg`` already holds. Given, a config without them (``RunConfig()``)
    gets every model's defaults even when there is nothing to override.
    """
    if not overrides and (model_settings is None or set(model_settings) == set(cfg.models)):
        return cfg
    if model_settings is None and cfg.models:
        model_settings = {name: type(s) for name, s in cfg.models.items()}
    raw = cfg.to_dict()
    for o in overrides:
        apply_override(raw, o)
    return _build(RunConfig, raw, "", model_settings)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config's ``to_dict()`` or its JSON record) as ``section.key`` → value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_settings(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as ``section.key`` → value, the values as JSON gives them back (lists, not tuples), so
    they compare equal to a config recorded in ``metrics.json`` or ``structure.json``."""
    return flatten(json.loads(json.dumps(cfg.to_dict())))


_NOT_RECORDED = "(not recorded)"


def settings_differences(
    recorded: Mapping[str, Any], wanted: Mapping[str, Any], fallback: Mapping[str, Any] | None = None
) -> list[str]:
    """``key: recorded → wanted`` for every key of ``wanted`` whose recorded value differs (both flat,
    :func:`flat_settings`). A key missing from ``recorded`` takes its ``fallback`` value (e.g. the
    default, for records older than the key), else it counts as different."""
    fallback = fallback or {}
    out = []
    for k in sorted(wanted):
        have = recorded[k] if k in recorded else fallback.get(k, _NOT_RECORDED)
        if have != wanted[k]:
            out.append(f"{k}: {have!r} → {wanted[k]!r}")
    return out


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model_settings: ModelSettingsTypes | None = None,
) -> RunConfig:
    """Loads a YAML run config (or the defaults when ``path`` is None) and applies overrides.

    ``model_settings``: the classes of the ``models`` section by model name (the registry's; its
    ``load_config`` passes them). Without them a config with a ``models`` section is refused.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at top level")
        raw = loaded
    for o in overrides or []:
        apply_override(raw, o)
    return _build(RunConfig, raw, "", model_settings)
