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
