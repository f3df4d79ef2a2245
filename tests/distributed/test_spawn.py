"""The multi-rank harness itself: what a rank sees and returns, and how each kind of failure surfaces.

A failing rank must fail the call quickly with its own traceback, while its peer waits in a
collective it will never finish; a rank that dies, a result that cannot travel and ranks that run too
long must each fail with a message that says so, never hang the caller.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from cstwa_dist.distributed.spawn import RankFailure, spawn_ranks


def _echo(rank: int, world: int, payload: str) -> dict:
    import torch.distributed as dist

    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)  # the group is up and spans every rank
    return {
        "rank": rank,
        "world": world,
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]),
        "group": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "threads": torch.get_num_threads(),
        "sum": float(total),
        "payload": payload,
        "tensor": torch.full((3,), float(rank)),  # travels as a copy, after the rank has exited
    }


def test_each_rank_runs_in_one_group_and_results_come_back_in_rank_order():
    got = spawn_ranks(_echo, 2, "hello", threads=1, backend="gloo")
    assert [g["rank"] for g in got] == [0, 1]
    for r, g in enumerate(got):
        assert g["world"] == 2 and g["env"] == (str(r), "2", str(r))
        assert g["group"] == (r, 2, "gloo") and g["threads"] == 1
        assert g["sum"] == 3.0 and g["payload"] == "hello"
        assert torch.equal(g["tensor"], torch.full((3,), float(r)))


def _raise_on_one(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 would wait here for as long as the group's timeout


def _exit_hard(rank: int, world: int) -> None:
    os._exit(3)  # no traceback, no report: a crash as the caller sees it


def _sleep(rank: int, world: int) -> None:
    time.sleep(600)


def _unpicklable(rank: int, world: int):
    return lambda: None


def test_a_raising_rank_fails_the_call_at_once_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as err:
        spawn_ranks(_raise_on_one, 2, backend="gloo")
    assert "rank 1 raised" in str(err.value) and "ValueError: planted failure on rank 1" in str(err.value)
    assert time.monotonic() - t0 < 120  # the peer blocked in the barrier was killed, not waited for


@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (_exit_hard, {}, "rank 0 exited with code 3 without reporting a result"),
        (_unpicklable, {}, "rank 0 raised"),
        (_sleep, {"timeout_s": 1.0}, "still running after timeout_s=1 s"),
    ],
    ids=["dies", "unpicklable-result", "timeout"],
)
def test_a_rank_that_dies_cannot_return_or_runs_too_long_fails_the_call(fn, kwargs, message):
    with pytest.raises(RankFailure, match=message):
        spawn_ranks(fn, 1, backend="gloo", **kwargs)
