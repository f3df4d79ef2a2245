"""KeyedDropout: a row's mask follows its share key, not the batch it is computed in or the rank."""

from __future__ import annotations

import pytest
import torch

from cstwa_dist.data.shares import dropout_key
from cstwa_dist.models.blocks import KeyedDropout, MLPTower, set_dropout_keys


@pytest.fixture(autouse=True)
def _no_keys_after():
    yield
    set_dropout_keys(None)


def _two_layers(x: torch.Tensor, keys: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass through two keyed layers (the second is layer 1 of the pass)."""
    set_dropout_keys(keys)
    first, second = KeyedDropout(0.5), KeyedDropout(0.5)
    a = first(x)
    return a, second(x)


def test_masks_follow_the_share_not_the_batch():
    x = torch.randn(12, 7)
    keys = (dropout_key(3, 0, 5, 0), dropout_key(3, 0, 5, 1), dropout_key(3, 0, 5, 2))
    whole = _two_layers(x, keys)
    # the same rows split over "ranks": rank 0 holds share 0, rank 1 shares 1 and 2
    part0 = _two_layers(x[:4], keys[:1])
    part1 = _two_layers(x[4:], keys[1:])
    for layer in range(2):
        assert torch.equal(whole[layer], torch.cat([part0[layer], part1[layer]]))
    # layer 1 of the pass draws other masks than layer 0; zeros where dropped, 2x elsewhere
    assert not torch.equal(whole[0] == 0, whole[1] == 0)
    kept = whole[0] != 0
    assert torch.allclose(whole[0][kept], 2 * x[kept])


def test_keys_differ_by_seed_epoch_step_and_share():
    base = dropout_key(1, 2, 3, 4)
    assert 0 <= base < 2**63
    assert len({base, dropout_key(2, 2, 3, 4), dropout_key(1, 3, 3, 4), dropout_key(1, 2, 4, 4)}) == 4
    assert dropout_key(1, 2, 3, 5) != base and dropout_key(1, 2, 3, 4) == base


def test_rate_gradient_eval_and_fallback():
    x = torch.ones(4000, 8, requires_grad=True)
    set_dropout_keys((11, 12))
    layer = KeyedDropout(0.3)
    y = layer(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.3) < 0.02
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d/dx of x·keep/(1-p) is keep/(1-p) = y for x = 1
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    set_dropout_keys(None)  # hand-built batches: torch's own stream, as nn.Dropout
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.3, training=True))
    set_dropout_keys((1, 2, 3))
    with pytest.raises(ValueError, match="4000 rows cannot be cut into 3 equal keyed chunks"):
        layer(x)


def test_towers_use_keyed_dropout():
    tower = MLPTower(6, [8, 4], [0.1, 0.0])
    assert [type(m).__name__ for m in tower.net] == ["Linear", "ReLU", "KeyedDropout", "Linear", "ReLU"]
