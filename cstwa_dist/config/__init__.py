"""Typed run configuration: YAML files in ``configs/`` plus ``--set section.key=value`` overrides.

Every component has a kw-only dataclass validated in ``__post_init__`` so that a typo or a bad value
fails before any process group, Ray runtime or dataset is touched, with the valid keys listed.
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
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not describe a valid run."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the dataset is and how the Ray Data reader feeds each rank."""

    dataset: str = "data/demo"
    batch_size: int = 2000  # per rank; paper: 2000
    eval_batch_size: int = 8192
    prefetch_batches: int = 2
    shuffle: bool = True
    ray_num_cpus: int | None = None  # for a private local Ray runtime; None = Ray's default

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "eval_batch_size")
        if self.prefetch_batches < 0:
            raise ConfigError("data.prefetch_batches must be >= 0")


@dataclass(kw_only=True)
class ModelConfig:
    """Shapes shared by all models (docs/method.md §4) and CSTWA's component switches (§2)."""

    embedding_dim: int = 8
    ctr_tower: list[int] = field(default_factory=lambda: [128, 64, 32])
    cvr_tower: list[int] = field(default_factory=lambda: [128, 64, 32])
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.3])
    info_layer: list[int] = field(default_factory=lambda: [64])  # hidden widths of CP's Info Layer
    structure_migrator: bool = True  # SM
    click_perceptron: bool = True  # CP
    curse_escaper: bool = True  # CE
    # mixture-of-experts baselines (OMoE, MMoE, PLE); expert sizes are unstated in the paper
    num_experts: int = 4  # OMoE/MMoE shared experts
    expert_widths: list[int] = field(default_factory=lambda: [128, 64])
    ple_levels: int = 2  # CGC levels
    ple_shared_experts: int = 2
    ple_task_experts: int = 2
    # AITM: width of the attention (AIT) projections
    ait_dim: int = 32
    # How every model turns its context fields into the context part of its input: "mean" of their
    # embeddings (Eq. 7, the paper's choice, [B, d]) or "concat" ([B, M_ctx·d], what the baselines'
    # reference implementations do with every field; Ali-CCP's cross features are context fields).
    # Applied to all models alike; the default is the paper's until measured otherwise.
    context_pooling: str = "mean"
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
        if self.context_pooling not in ("mean", "concat"):
            raise ConfigError(f"model.context_pooling must be mean or concat, got {self.context_pooling!r}")
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
        if any(w < 1 for w in self.info_layer):
            raise ConfigError("model.info_layer widths must be positive")
        if not self.expert_widths or any(w < 1 for w in self.expert_widths):
            raise ConfigError("model.expert_widths must be a non-empty list of positive widths")
        _positive(self, "num_experts", "ple_levels", "ple_shared_experts", "ple_task_experts", "ait_dim")


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
    knn: str = "ivf"
    nlist: int = 0  # IVF cells; 0 = 4·√N (at most N/39)
    nprobe: int = 16  # cells searched per query (recall@8 0.987 at 1M × 45 measured)
    pq_m: int = 0  # > 0: PQ codes of pq_m bytes instead of float rows (memory), candidates re-scored
    recall_queries: int = 1000  # recall@k against exact on this many sampled queries, written with the graph
    save_representations: bool = True  # <side>_representations.npy next to the graphs (bench knn input)
    # The two readings of the Structure Migrator (docs/method.md §2): "free" (the default, reading a):
    # U/I are trainable per-entity rows, started by Eq. 8 and smoothed by Eq. 10 between epochs;
    # "recomputed" (reading b): the CVR field tables keep training, and P = Â^L R of the live tables
    # is recomputed at the start and at every epoch boundary and enters x_cvr as a fixed β-term.
    # The model's CVR collection depends on it, so the model is built with this section too.
    sm_reading: str = "free"
    # How reading (a) starts U/I: "fields" (Eq. 8, the default: id slot keeps its own random start,
    # the other side fields from the CVR side embeddings) or "pretrained" (the pre-trained r_u/r_i the
    # graph was mined from, <graph_dir>/<side>_representations.npy; needs save_representations).
    sm_init: str = "fields"

    def __post_init__(self) -> None:
        _positive(self, "k", "layers", "pretrain_epochs", "nprobe")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("structure.beta must be in [0, 1]")
        if self.sm_reading not in ("free", "recomputed"):
            raise ConfigError(f"structure.sm_reading must be free or recomputed, got {self.sm_reading!r}")
        if self.sm_init not in ("fields", "pretrained"):
            raise ConfigError(f"structure.sm_init must be fields or pretrained, got {self.sm_init!r}")
        if self.sm_reading == "recomputed" and self.sm_init == "pretrained":
            raise ConfigError(
                "structure.sm_init=pretrained applies to structure.sm_reading=free only: the recomputed "
                "reading has no free U/I rows to start; it recomputes Â^L R from the live CVR tables"
            )
        if self.knn not in ("ivf", "exact"):
            raise ConfigError(f"structure.knn must be ivf or exact, got {self.knn!r}")
        if self.nlist < 0 or self.pq_m < 0 or self.recall_queries < 0:
            raise ConfigError("structure.nlist, structure.pq_m and structure.recall_queries must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """Adam for dense parameters (paper); a fused FBGEMM optimizer for the embedding tables.

    ``embedding`` = ``auto`` picks fused Adam where the kernel supports it (GPU) and exact row-wise
    Adagrad on CPU, where FBGEMM has no fused Adam (docs/platform-notes.md; docs/method.md §4).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-6  # the paper's L2
    embedding: str = "auto"
    # for row-wise Adagrad (fused Adam uses ``lr``); 0.1 measured best on validation next to 0.02 and
    # 0.3 (docs/experiments/README.md, "Learning what the data holds"); configs/paper.yaml keeps 0.02
    embedding_lr: float = 0.1

    def __post_init__(self) -> None:
        if self.embedding not in ("auto", "adam", "rowwise_adagrad"):
            raise ConfigError("optim.embedding must be one of auto, adam, rowwise_adagrad")
        if self.lr <= 0 or self.embedding_lr <= 0 or self.weight_decay < 0:
            raise ConfigError("optim learning rates must be > 0 and weight_decay >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: epochs, seed, where results go, how chatty."""

    epochs: int = 3
    seed: int = 0
    run_dir: str = "runs/demo"
    log_every: int = 50
    eval_split: str = "test"
    validate_every_epoch: bool = True
    # Which epoch's test metrics a run reports (cstwa_dist/train/metrics.py): "best_val_purchase_auc",
    # the paper's protocol as in AITM's reference code (needs validate_every_epoch; without validation
    # or a purchase head the run reports the last epoch and says so in metrics.json), or "last".
    select_epoch: str = "best_val_purchase_auc"
    # "sparse_dist": TorchRec's TrainPipelineSparseDist (the next batch's device copy and input
    # all-to-all overlap this batch's compute); "plain": forward/backward/step one batch at a time.
    # Both compute the same parameters (tested); plain is for debugging and for measuring the overlap.
    pipeline: str = "sparse_dist"
    # checkpoints (torch.distributed.checkpoint): every N steps (0 = only at epoch ends) and at every
    # epoch end, under checkpoint_dir (default <run dir>/checkpoints), the newest keep_checkpoints kept
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    # "never": start fresh; "auto": continue from the newest complete checkpoint if there is one;
    # any other value: the checkpoint folder to continue from
    resume: str = "never"
    # TensorBoard scalars under <run dir>/tb on rank 0 (docs: README, "Watching a run")
    tensorboard: bool = True
    # How long a collective may wait for a peer before the job fails. Set above the longest work one
    # rank does while the others wait (IVF quantizer training on rank 0: ~10 min projected at 30M
    # users on a CPU rank, docs/structure-scaling.md; a checkpoint write), and well below "forever":
    # a hung peer (NCCL's default is 10 min, gloo's 30) then ends the job in half an hour.
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _positive(self, "epochs", "log_every", "keep_checkpoints")
        if self.eval_split not in ("val", "test"):
            raise ConfigError("train.eval_split must be val or test")
        if self.select_epoch not in ("best_val_purchase_auc", "last"):
            raise ConfigError(
                f"train.select_epoch must be best_val_purchase_auc or last, got {self.select_epoch!r}"
            )
        if self.pipeline not in ("sparse_dist", "plain"):
            raise ConfigError(f"train.pipeline must be sparse_dist or plain, got {self.pipeline!r}")
        if self.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every must be >= 0 (0: only at epoch ends)")
        if not self.collective_timeout_s > 0:
            raise ConfigError("train.collective_timeout_s must be > 0")


@dataclass(kw_only=True)
class RunConfig:
    """One run: every section above."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.removesuffix("Config").lower()
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{section}.{n} must be >= 1, got {getattr(obj, n)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against a dataclass field type (the few types used above)."""
    origin = typing.get_origin(tp)
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


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping")
            kwargs[name] = _build(tp, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies ``section.key=value`` (value parsed as YAML: ``3``, ``0.5``, ``true``, ``[64,32]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.epochs=2")
    section, name = parts
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"override {assignment!r}: {section} is not a section")
    raw[section][name] = yaml.safe_load(text)


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A new config: ``cfg`` with ``section.key=value`` overrides applied, validated like a loaded file."""
    if not overrides:
        return cfg
    raw = cfg.to_dict()
    for o in overrides:
        apply_override(raw, o)
    return _build(RunConfig, raw, "")


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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Loads a YAML run config (or the defaults when ``path`` is None) and applies overrides."""
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
    return _build(RunConfig, raw, "")
