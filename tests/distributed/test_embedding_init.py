"""``model.embedding_init_std`` reaches the sharded tables: every rank's rows start inside the bounds.

Both settings are built in one 2-rank run (starting ranks costs more than building the model); each
is still its own pytest case.
"""

from __future__ import annotations

import math
import traceback

import pytest

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import WORLD, rank_setup

STDS = [0.0, 0.05]


def _check_init(dataset: str, std: float) -> None:
    from cstwa_dist.train.trainer import build_sharded

    cfg, env, spec = rank_setup(dataset, f"model.embedding_init_std={std}")
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


def _init_worker(rank: int, world: int, dataset: str, stds: list[float]) -> dict[float, str | None]:
    """Every setting in turn; its traceback when a check failed. The checks run after the build's
    collectives and every rank meets the others at a barrier after each setting, so a rank that
    failed one setting still joins the next one's build."""
    import torch.distributed as dist

    failed: dict[float, str | None] = {}
    for std in stds:
        try:
            _check_init(dataset, std)
            failed[std] = None
        except Exception:
            failed[std] = traceback.format_exc()
        dist.barrier()
    return failed


@pytest.fixture(scope="module")
def init_checks(tiny_dataset) -> list[dict[float, str | None]]:
    return spawn_ranks(_init_worker, WORLD, str(tiny_dataset), STDS)


@pytest.mark.parametrize("std", STDS)
def test_embedding_init_std_reaches_every_sharded_table(init_checks, std):
    failed = [f"rank {r}:\n{done[std]}" for r, done in enumerate(init_checks) if done[std]]
    assert not failed, "\n".join(failed)
