"""Each model family's own settings: what one model reads and no other (``models.<name>.<key>``).

What all models share (embedding width, towers, dropout, context pooling) is ``config.ModelConfig``;
what only CSTWA, the mixture-of-experts baselines or AITM read is declared here, next to the models,
and registered with them in their ``ModelSpec`` (``cstwa_dist/registry.py``, ``settings=``). A run
config then carries one instance per registered model under ``models`` (YAML ``models: {ple:
{levels: 3}}``, override ``--set models.ple.levels=3``), checked by the config loader against these
classes before anything heavy starts; the model's constructor (and, for CSTWA, its loss and its
structure tables) read them.

This module imports no torch: the registry and the config loader import it eagerly, and
``cstwa-dist --help`` must stay light (tests/unit/test_layout.py).

Every class is a kw-only dataclass validated in ``__post_init__`` (``ConfigError``), like the config
sections; a closed choice would be a ``Literal[...]`` field, checked by ``config.check_choices``.
``FORMER_KEYS`` names the flat ``model.<key>`` each field was recorded under before it moved here,
so that a finished experiment cell recorded then is compared under the new name
(``registry.recorded_settings``) instead of being taken for a cell run with the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from cstwa_dist.config import ConfigError, check_choices


def _at_least_one(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{n} must be >= 1, got {getattr(obj, n)}")


def _widths(obj: Any, name: str, *, empty_ok: bool = False) -> None:
    widths = getattr(obj, name)
    if (not widths and not empty_ok) or any(w < 1 for w in widths):
        what = "a list of positive widths" if empty_ok else "a non-empty list of positive widths"
        raise ConfigError(f"{name} must be {what}, got {widths}")


@dataclass(kw_only=True)
class ModelSettings:
    """Base of every model's own settings (the registry checks a model gets its own class)."""

    FORMER_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __post_init__(self) -> None:
        check_choices(self, type(self).__name__)


@dataclass(kw_only=True)
class CSTWASettings(ModelSettings):
    """CSTWA's three components (docs/method.md §2), each switchable for the ablation (Table 3).

    ``structure_migrator`` (SM, Eq. 8–11) needs the mined graphs; ``click_perceptron`` (CP, Eq. 12–14)
    gates the CVR input with the click tower's last hidden state through an Info Layer of hidden widths
    ``info_layer``; ``curse_escaper`` (CE, Eq. 17–18) is read by the loss (with it off every weight is 1).
    How the SM is read is the ``structure`` section's (``structure.sm_reading``): it is shared with
    pre-training and the graph build.
    """

    structure_migrator: bool = True
    click_perceptron: bool = True
    curse_escaper: bool = True
    info_layer: list[int] = field(default_factory=lambda: [64])  # CP's Info Layer, hidden widths

    FORMER_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {k: f"model.{k}" for k in ("structure_migrator", "click_perceptron", "curse_escaper", "info_layer")}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _widths(self, "info_layer", empty_ok=True)  # empty: Linear straight to dim(x_cvr)


@dataclass(kw_only=True)
class MoESettings(ModelSettings):
    """OMoE and MMoE (docs/method.md §3; Ma et al., 2018): ``num_experts`` shared experts, each
    ``Linear → ReLU`` per width of ``expert_widths``. Expert sizes are unstated in the CSTWA paper;
    these defaults are ours."""

    num_experts: int = 4
    expert_widths: list[int] = field(default_factory=lambda: [128, 64])

    FORMER_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"num_experts": "model.num_experts", "expert_widths": "model.expert_widths"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least_one(self, "num_experts")
        _widths(self, "expert_widths")


@dataclass(kw_only=True)
class PLESettings(ModelSettings):
    """PLE (docs/method.md §3; Tang et al., 2020): ``levels`` CGC levels, each with ``task_experts``
    experts per task and ``shared_experts`` shared ones, every expert of widths ``expert_widths``."""

    levels: int = 2
    shared_experts: int = 2
    task_experts: int = 2
    expert_widths: list[int] = field(default_factory=lambda: [128, 64])

    FORMER_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "levels": "model.ple_levels",
            "shared_experts": "model.ple_shared_experts",
            "task_experts": "model.ple_task_experts",
            "expert_widths": "model.expert_widths",
        }
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least_one(self, "levels", "shared_experts", "task_experts")
        _widths(self, "expert_widths")


@dataclass(kw_only=True)
class AITMSettings(ModelSettings):
    """AITM (docs/method.md §3; Xi et al., 2021): ``ait_dim`` is ``k``, the width of the AIT module's
    value/query/key projections (and of the fused vector the purchase layer reads)."""

    ait_dim: int = 32

    FORMER_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType({"ait_dim": "model.ait_dim"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least_one(self, "ait_dim")
