"""Every shipped config loads; overrides are typed; unknown keys are rejected with the valid ones."""

from pathlib import Path

import pytest

from cstwa_dist.config import ConfigError, load_config

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
            "model.click_perceptron=false",
        ],
    )
    assert cfg.train.epochs == 2 and cfg.model.ctr_tower == [16, 8]
    assert cfg.structure.beta == 0.5 and cfg.model.click_perceptron is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "valid keys"),
        ("nosuch.x=1", "unknown key"),
        ("train.epochs=two", "expected an integer"),
        ("model.embedding_dim=5", "multiple of 4"),
        ("structure.beta=1.5", "beta"),
        ("train.epochs", "section.key=value"),
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
