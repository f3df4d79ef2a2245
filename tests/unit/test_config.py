"""Every shipped config loads; overrides are typed; unknown keys are rejected with the valid ones;
closed choices are ``Literal`` types, checked and listed; each model's own settings live with it."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cstwa_dist import config
from cstwa_dist.config import (
    ConfigError,
    RunConfig,
    StructureConfig,
    TrainConfig,
    choices,
    flat_settings,
    flatten,
    settings_differences,
)
from cstwa_dist.models.settings import CSTWASettings, ModelSettings, PLESettings
from cstwa_dist.registry import (
    MODEL_SETTINGS,
    MODELS,
    default_config,
    describe_choices,
    load_config,
    recorded_settings,
    with_overrides,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.embedding_dim % 4 == 0


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.epochs=2",
            "model.ctr_tower=[16, 8]",
            "model.dropout=[0, 0]",
            "model.cvr_tower=[16, 8]",
            "structure.beta=0.5",
            "models.cstwa.click_perceptron=false",
        ],
    )
    assert cfg.train.epochs == 2 and cfg.model.ctr_tower == [16, 8]
    assert cfg.structure.beta == 0.5 and cfg.models["cstwa"].click_perceptron is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "valid keys"),
        ("nosuch.x=1", "unknown key"),
        ("train.epochs=two", "expected an integer"),
        ("model.embedding_dim=5", "multiple of 4"),
        ("structure.beta=1.5", "beta"),
        ("train.epochs", "section.key=value"),
        ("model.click_perceptron=false", "unknown key"),  # moved to models.cstwa
        ("models.cstwa.click_perceptron=maybe", "expected true/false"),
        ("models.ple.levels=0", "models.ple: levels must be >= 1"),
        ("models.cstwa=3", "models.cstwa: expected a mapping"),
    ],
)
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_embedding_init_std_bounds_and_validation():
    import math

    from cstwa_dist.models.blocks import field_tables, init_bounds

    assert init_bounds(0.0) == {}  # TorchRec's default ±√(1/N) per table
    b = init_bounds(0.05)
    assert b["weight_init_max"] == pytest.approx(math.sqrt(3) * 0.05) == -b["weight_init_min"]
    cfg = load_config(None, ["model.embedding_init_std=0.05"])
    assert cfg.model.embedding_init_std == 0.05
    with pytest.raises(ConfigError, match="embedding_init_std"):
        load_config(None, ["model.embedding_init_std=-1"])
    from cstwa_dist.data.spec import FieldSpec

    (t,) = field_tables([FieldSpec(name="f", side="user", vocab_size=4)], "p", 8, 0.05)
    assert t.get_weight_init_max() == pytest.approx(math.sqrt(3) * 0.05)
    (t,) = field_tables([FieldSpec(name="f", side="user", vocab_size=4)], "p", 8)
    assert t.get_weight_init_max() == pytest.approx(0.5)  # √(1/4): why small fields start loud


# --- closed choices ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, listed",
    [
        ("model.context_pooling=max", "mean | concat"),
        ("structure.sm_reading=both", "free | recomputed"),
        ("structure.sm_init=random", "fields | pretrained"),
        ("structure.knn=hnsw", "ivf | exact"),
        ("optim.embedding=sgd", "auto | adam | rowwise_adagrad"),
        ("train.eval_split=train", "val | test"),
        ("train.select_epoch=first", "best_val_purchase_auc | last"),
        ("train.pipeline=async", "sparse_dist | plain"),
        ("train.pipeline=1", "sparse_dist | plain"),  # a YAML number is not a choice's string
    ],
)
def test_a_value_outside_a_literal_is_rejected_with_the_choices(override, listed):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key}: must be one of {listed}, got")):
        load_config(None, [override])


def test_sections_built_in_code_are_held_to_their_choices():
    with pytest.raises(
        ConfigError, match=re.escape("structure.sm_reading: must be one of free | recomputed")
    ):
        StructureConfig(sm_reading="both")  # type: ignore[arg-type]
    assert TrainConfig(pipeline="plain").pipeline == "plain"


def test_choices_lists_every_literal_for_help():
    listed = choices()
    assert listed["structure.sm_reading"] == ("free", "recomputed")
    assert listed["train.pipeline"] == ("sparse_dist", "plain")
    assert {"model.context_pooling", "structure.sm_init", "structure.knn", "optim.embedding"} <= set(listed)
    assert {"train.eval_split", "train.select_epoch"} <= set(listed)
    text = describe_choices()
    assert (
        "structure.sm_reading: free|recomputed" in text
        and "optim.embedding: auto|adam|rowwise_adagrad" in text
    )


# --- each model's own settings ---------------------------------------------------------------------
def test_set_models_ple_levels_reaches_ple():
    import torch

    from cstwa_dist.models.moe import PLE
    from tests.unit.model_fixtures import SPEC

    cfg = load_config(None, ["models.ple.levels=3", "models.ple.expert_widths=[8, 4]"])
    spec = MODELS["ple"]
    own = spec.settings_in(cfg)
    assert isinstance(own, PLESettings) and own.levels == 3
    model = spec.build(SPEC, cfg.model, torch.device("meta"), structure=cfg.structure, settings=own)
    assert isinstance(model, PLE) and len(model.levels) == 3
    assert cfg.models["cstwa"] == CSTWASettings()  # a model not named keeps its defaults


def test_models_section_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("models:\n  ple:\n    levels: 3\n  cstwa:\n    curse_escaper: false\n  aitm:\n")
    cfg = load_config(path)
    assert cfg.models["ple"].levels == 3 and cfg.models["cstwa"].curse_escaper is False
    assert cfg.models["aitm"].ait_dim == 32


@pytest.mark.parametrize(
    "override, words",
    [
        ("models.nosuch.levels=3", r"unknown model\(s\) \['nosuch'\]; models with settings of their own: "),
        ("models.esmm.x=1", r"unknown model\(s\) \['esmm'\]"),  # ESMM has no settings of its own
        ("models.ple.level=3", r"models.ple: unknown key\(s\) \['level'\]; valid keys: \['levels', "),
    ],
)
def test_unknown_model_or_key_under_models_lists_the_valid_ones(override, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(None, [override])
    if "unknown model" in words:
        assert str(sorted(MODEL_SETTINGS)) in str(e.value)


def test_models_section_needs_the_registry_loader():
    """``config``, the lowest room, cannot know the settings classes: its loader refuses a ``models``
    section (naming the registry's) instead of passing it on unchecked."""
    with pytest.raises(ConfigError, match="registry.load_config"):
        config.load_config(None, ["models.ple.levels=3"])
    assert config.load_config(None).models == {}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_settings_class_validates_its_defaults(name):
    cls = MODELS[name].settings
    if cls is None:
        assert name not in MODEL_SETTINGS
        return
    assert issubclass(cls, ModelSettings) and dataclasses.is_dataclass(cls)
    own = cls()  # __post_init__ runs every check
    assert MODELS[name].own_settings(None) == own == default_config().models[name]
    for key, former in cls.FORMER_KEYS.items():
        assert key in {f.name for f in dataclasses.fields(cls)} and former.startswith("model.")
    with pytest.raises(TypeError, match="reads"):
        MODELS[name].own_settings(object())  # type: ignore[arg-type]


def test_nested_settings_flatten_and_compare():
    cfg = with_overrides(default_config(), ["models.ple.levels=3"])
    flat = flat_settings(cfg)
    assert flat["models.ple.levels"] == 3 and flat["models.cstwa.info_layer"] == [64]
    recorded = json.loads(json.dumps(cfg.to_dict()))
    assert settings_differences(flatten(recorded), flat) == []
    # a record older than the models section: missing keys take their default ...
    old = flatten(json.loads(json.dumps(RunConfig().to_dict())))
    assert settings_differences(old, flat, fallback=flat_settings(default_config())) == [
        "models.ple.levels: 2 → 3"
    ]
    # ... unless recorded under their former flat names, which are read under the new ones
    old["model.ple_levels"] = 3
    old["model.click_perceptron"] = False
    upgraded = recorded_settings(old)
    assert upgraded["models.ple.levels"] == 3 and upgraded["models.cstwa.click_perceptron"] is False
    assert settings_differences(upgraded, flat, fallback=flat_settings(default_config())) == [
        "models.cstwa.click_perceptron: False → True"
    ]
    # a key wanted but neither recorded nor defaulted (a typo in a hand-made record) is reported
    assert settings_differences({}, {"models.ple.levles": 3}) == ["models.ple.levles: '(not recorded)' → 3"]


# --- the embedding optimizer's settings (docs/method.md §4) ------------------------------------------
def test_embedding_optimizer_settings_are_typed_and_adam_needs_its_own_lr():
    cfg = load_config(None, ["optim.embedding_eps=1.0e-6"])
    assert (cfg.optim.embedding, cfg.optim.embedding_lr, cfg.optim.embedding_eps) == ("auto", 0.1, 1e-6)
    assert cfg.optim.embedding_adam_lr is None
    adam = load_config(None, ["optim.embedding=adam", "optim.embedding_adam_lr=0.002"]).optim
    assert adam.embedding_adam_lr == 0.002
    with pytest.raises(ConfigError, match=r"optim.embedding=adam needs optim.embedding_adam_lr"):
        load_config(None, ["optim.embedding=adam"])
    for bad, msg in (
        ("optim.embedding_eps=0", "embedding_eps must be > 0"),
        ("optim.embedding_adam_lr=-1", "> 0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
