"""``train/sources.py``: one process reads a checkpoint's tensors whole or by row range, refusing what a
resume refuses. (Checkpoints written by several ranks, row-wise sharded, are read in
tests/distributed/test_export_dist.py.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cstwa_dist.train.checkpoint import META, CheckpointRefused, TrainState
from cstwa_dist.train.sources import MODEL_PREFIX, CheckpointTensors, resolve_checkpoint


def _write(run: Path, step: int = 7) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embeddings.ebc.embedding_bags.shared__user_id.weight": torch.randn(50, 8, generator=g),
        "click_layer.weight": torch.randn(1, 16, generator=g),
        "click_layer.bias": torch.randn(1, generator=g),
    }
    folder = run / "checkpoints" / f"step-{step:09d}"
    folder.mkdir(parents=True)
    state = {MODEL_PREFIX + k: v.clone() for k, v in tensors.items()}
    state["optim.state.x"] = torch.zeros(3)
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    (folder / META).write_text(json.dumps({"global_step": step, "world_size": 2, "epoch_end": True}))
    return folder, tensors


def test_reads_tables_whole_and_by_rows(tmp_path: Path):
    folder, tensors = _write(tmp_path / "run")
    src = CheckpointTensors(tmp_path / "run")  # the run folder resolves to its newest checkpoint
    assert src.path == folder and src.state == TrainState(global_step=7, world_size=2, epoch_end=True)
    assert set(src.tables()) == {"shared__user_id"}
    assert src.dense_names() == ["click_layer.bias", "click_layer.weight"]  # optimizer state left out
    name = "embeddings.ebc.embedding_bags.shared__user_id.weight"
    table = tensors[name]
    assert torch.equal(src.read_rows(name), table)
    for start, count in ((0, 1), (13, 20), (49, 1), (50, 0)):
        assert torch.equal(src.read_rows(name, start, count), table[start : start + count])
    dense = src.dense_state()
    assert all(torch.equal(dense[k], tensors[k]) for k in src.dense_names())
    with pytest.raises(IndexError, match="outside"):
        src.read_rows(name, 40, 11)
    with pytest.raises(KeyError, match="no model tensor"):
        src.read_rows("nope.weight")


def test_newest_checkpoint_and_clear_error_without_one(tmp_path: Path):
    _write(tmp_path / "run", step=3)
    newer, _ = _write(tmp_path / "run", step=12)
    assert resolve_checkpoint(tmp_path / "run") == newer
    assert resolve_checkpoint(newer) == newer
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        resolve_checkpoint(tmp_path / "empty")


class _Boom:
    def __reduce__(self):  # noqa: ANN204 - what a planted pickle does
        return (eval, ("__import__('os').system('touch /tmp/cstwa-sources-pwned')",))


def test_planted_metadata_is_refused_unread(tmp_path: Path):
    folder, _ = _write(tmp_path / "run")
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointRefused, match="refused"):
        CheckpointTensors(folder)
    assert not Path("/tmp/cstwa-sources-pwned").exists()


def test_a_configured_key_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, _ = _write(tmp_path / "run")  # written unsigned
    monkeypatch.setenv("CSTWA_CHECKPOINT_KEY", "k" * 32)
    with pytest.raises(CheckpointRefused):
        CheckpointTensors(folder)
