"""The run monitor's TensorBoard scalars and no-terminal behaviour; which checkpoints resume finds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.train.checkpoint import META, Checkpointer, TrainState, list_checkpoints
from cstwa_dist.train.monitor import RunMonitor


def test_monitor_writes_scalars_and_draws_no_bar_without_a_terminal(tmp_path):
    mon = RunMonitor(tmp_path, enabled=True, total_steps=10, desc="m", tensorboard=True)
    assert mon._bar is None  # pytest's stderr is not a terminal: log lines are the progress report
    mon.scalars("val", {"click_auc": 0.7, "purchase_auc": None}, 1)
    mon.scalars("train", {"loss": 0.5}, 3)
    mon.advance()
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"val/click_auc", "train/loss"}
    assert acc.Scalars("train/loss")[0].step == 3
    assert acc.Scalars("val/click_auc")[0].value == pytest.approx(0.7)


def test_disabled_monitor_writes_nothing(tmp_path):
    mon = RunMonitor(tmp_path, enabled=False, total_steps=10, desc="m", tensorboard=True)
    mon.scalars("train", {"loss": 1.0}, 1)
    mon.close()
    assert not (tmp_path / "tb").exists()


def _fake(root: Path, name: str, state: TrainState | None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if state is not None:
        (d / META).write_text(json.dumps(asdict(state)))
    return d


def _env(world: int) -> DistEnv:
    return DistEnv(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), backend="gloo")


def test_find_skips_partial_checkpoints(tmp_path):
    good = _fake(tmp_path, "step-000000004", TrainState(global_step=4, world_size=2, step=4))
    _fake(tmp_path, "step-000000008", None)  # killed before meta.json: never complete
    _fake(tmp_path, ".tmp-step-000000012", TrainState(global_step=12, world_size=2))  # not renamed
    assert list_checkpoints(tmp_path) == [good]
    assert Checkpointer(tmp_path, _env(2), keep=2).find("auto") == good
    assert Checkpointer(tmp_path, _env(2), keep=2).find("never") is None
    assert Checkpointer(tmp_path / "none", _env(2), keep=2).find("auto") is None


def test_other_world_size_takes_the_newest_epoch_end(tmp_path):
    end = _fake(tmp_path, "step-000000012", TrainState(global_step=12, world_size=2, epoch_end=True, step=12))
    mid = _fake(tmp_path, "step-000000016", TrainState(global_step=16, world_size=2, epoch=1, step=4))
    assert Checkpointer(tmp_path, _env(2), keep=2).find("auto") == mid
    assert Checkpointer(tmp_path, _env(1), keep=2).find("auto") == end  # mid-epoch is per rank
    with pytest.raises(ValueError, match="mid-epoch on 2 rank"):
        Checkpointer(tmp_path, _env(1), keep=2).find(str(mid))
    assert TrainState(epoch=0, step=12, epoch_end=True).next_position() == (1, 0)
    assert TrainState(epoch=1, step=4).next_position() == (1, 4)


def test_prune_keeps_newest_and_the_last_epoch_end(tmp_path):
    _fake(tmp_path, "step-000000004", TrainState(global_step=4, step=4))
    end = _fake(tmp_path, "step-000000012", TrainState(global_step=12, epoch_end=True, step=12))
    a = _fake(tmp_path, "step-000000016", TrainState(global_step=16, epoch=1, step=4))
    b = _fake(tmp_path, "step-000000020", TrainState(global_step=20, epoch=1, step=8))
    Checkpointer(tmp_path, _env(1), keep=2)._prune()
    assert list_checkpoints(tmp_path) == [end, a, b]
