"""``model.embedding_init_std`` reaches the sharded tables: every rank's rows start inside the bounds."""

from __future__ import annotations

import math

import pytest

from tests.distributed.test_dmp import TINY, _spawn


def _init_worker(rank: int, dataset: str, std: float, errors: list) -> None:
    import torch

    from cstwa_dist.config import load_config
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.train.trainer import build_sharded

    overrides = [*TINY, f"data.dataset={dataset}", f"model.embedding_init_std={std}"]
    cfg = load_config(None, overrides)
    env = init_distributed()
    spec = DatasetSpec.load(dataset)
    vocab = {f.name: f.vocab_size for f in spec.fields}
    sharded = build_sharded(cfg, "esmm", env, spec)
    seen = 0
    for name, value in sharded.dmp.state_dict().items():
        if "embedding_bags" not in name or not hasattr(value, "local_shards"):
            continue
        field = name.split("__")[-1].split(".")[0]
        bound = math.sqrt(3.0) * std if std > 0 else math.sqrt(1.0 / vocab[field])
        for shard in value.local_shards():
            w = shard.tensor.float()
            seen += w.numel()
            assert float(w.abs().max()) <= bound + 1e-6, (name, float(w.abs().max()), bound)
            if std > 0 and w.numel() >= 400:  # same spread in every table, small fields included
                assert float(w.std()) == pytest.approx(std, rel=0.25), (name, float(w.std()))
    assert seen > 0
    torch.distributed.barrier()


@pytest.mark.parametrize("std", [0.0, 0.05])
def test_embedding_init_std_reaches_every_sharded_table(tiny_dataset, std):
    _spawn(_init_worker, str(tiny_dataset), std, [])
