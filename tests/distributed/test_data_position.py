"""A mid-epoch checkpoint continues only under the data position it was taken with.

(epoch, step) names rows only for one way of cutting the split: with other ``data.shares`` or another
global batch size the same step is other rows, so a resume would train some rows twice and others never.
The checkpoint records ``[shares, rows per share and step]``; a resume that differs is refused with what to
do, one with the same position continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import NO_SM, rank_setup, tiny_config

BASE = [NO_SM, "train.epochs=1", "data.ray_num_cpus=1", "train.tensorboard=false", "train.checkpoint_every=3"]


def _worker(rank: int, world: int, dataset: str, run_dir: str) -> list[str]:
    from cstwa_dist.config import ConfigError
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.checkpoint import list_checkpoints, read_meta
    from cstwa_dist.train.trainer import Trainer, train

    cfg, _, _ = rank_setup(dataset, *BASE, "data.batch_size=500", "train.validate_every_epoch=false")
    out: list[str] = []
    with RayRuntime(num_cpus=1):
        train(cfg, "esmm", run_dir=run_dir, evaluate=False)
        mid = next(p for p in list_checkpoints(Path(run_dir) / "checkpoints") if not read_meta(p).epoch_end)
        assert read_meta(mid).data_position == [1, 500]
        for change in ("data.batch_size=250", "data.shares=2"):
            try:
                Trainer(
                    tiny_config(dataset, *BASE, "data.batch_size=500", change, f"train.resume={mid}"), "esmm"
                )
            except ConfigError as e:
                out.append(str(e))
        same = Trainer(tiny_config(dataset, *BASE, "data.batch_size=500", f"train.resume={mid}"), "esmm")
        try:
            out.append(repr(same.position == (0, read_meta(mid).step) and read_meta(mid).step > 0))
        finally:
            same.close()
    return out


def test_mid_epoch_resume_needs_the_same_shares_and_batch(tiny_dataset, tmp_path):
    smaller, shared, same = spawn_ranks(_worker, 1, str(tiny_dataset), str(tmp_path / "run"), timeout_s=600)[
        0
    ]
    assert "[data.shares, rows per share and step] = [1, 500]; this run reads [1, 250]" in smaller
    assert "this run reads [2, 250]" in shared and "epoch-end checkpoint" in shared
    assert same == "True"  # continues at the checkpoint's step of epoch 0
