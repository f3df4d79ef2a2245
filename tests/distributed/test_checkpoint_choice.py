"""Which checkpoint a resume takes is rank 0's choice on every rank; CUDA RNG states round-trip."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cstwa_dist.distributed.spawn import spawn_ranks
from cstwa_dist.train import checkpoint as ckpt


def _fake(root: Path, step: int, **state) -> Path:
    d = root / f"step-{step:09d}"
    d.mkdir(parents=True)
    ts = ckpt.TrainState(global_step=step, step=step, world_size=2, **state)
    (d / ckpt.META).write_text(json.dumps(asdict(ts)))
    return d


def _choose(rank: int, world: int, roots: list[str], resume: list[str]) -> list[str]:
    """Each rank looks at its own root (rank 1's holds a newer checkpoint rank 0 does not see)."""
    from cstwa_dist.distributed.env import init_distributed

    env = init_distributed()
    out = []
    for r in resume:
        try:
            out.append(str(ckpt.Checkpointer(roots[rank], env, keep=5).find(r)))
        except Exception as e:  # every rank must raise rank 0's error, not hang
            out.append(f"{type(e).__name__}: {e}")
    return out


def test_ranks_resume_rank0_choice_even_when_their_listings_differ(tmp_path):
    r0, r1 = tmp_path / "rank0", tmp_path / "rank1"
    _fake(r0, 4)
    _fake(r1, 4)
    newer = _fake(r1, 8)  # only rank 1 sees it (a save renamed between the two listings)
    one_rank = _fake(tmp_path / "other", 12, epoch=1)
    (one_rank / ckpt.META).write_text(
        json.dumps({**json.loads((one_rank / ckpt.META).read_text()), "world_size": 1})
    )
    resume = ["auto", str(newer), str(tmp_path / "step-000000099"), str(one_rank)]
    res = spawn_ranks(_choose, 2, [str(r0), str(r1)], resume, backend="gloo", timeout_s=120)
    assert res[0] == res[1], res  # one choice (or one error) on every rank
    assert res[0][0] == str(r0 / "step-000000004")  # rank 0's newest, not rank 1's newer step-8
    assert res[0][1] == str(newer)  # a named folder: rank 0 checked it
    assert res[0][2].startswith("FileNotFoundError") and "no such folder" in res[0][2]
    assert res[0][3].startswith("ValueError") and "mid-epoch on 1 rank" in res[0][3]


def test_cuda_rng_states_are_saved_and_restored(monkeypatch):
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = json.loads(json.dumps(ckpt._rng_state()))  # as it reads back from the JSON file
    assert len(state["cuda"]) == 2 and all(isinstance(s, str) for s in state["cuda"])  # base64
    ckpt._set_rng_state(state)
    assert len(restored) == 1
    for got, want in zip(restored[0], saved, strict=True):
        assert torch.equal(got, want)


def test_rng_file_without_cuda_state_loads(monkeypatch, caplog):
    torch.manual_seed(3)
    state = json.loads(json.dumps(ckpt._rng_state()))
    expected = torch.rand(3)
    for old in ({k: v for k, v in state.items() if k != "cuda"}, {**state, "cuda": []}):
        ckpt._set_rng_state(old)  # no KeyError: a checkpoint without CUDA states loads
        assert torch.equal(torch.rand(3), expected)
    # CUDA states saved for another device count: the CPU streams are restored, CUDA's restart
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda _: pytest.fail("wrong device count"))
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.train.checkpoint"):
        ckpt._set_rng_state({**state, "cuda": [ckpt._b64(torch.zeros(16, dtype=torch.uint8))] * 2})
    assert "CUDA random streams restart" in caplog.text
    assert torch.equal(torch.rand(3), expected)
