"""The planner's host memory is the pod's: physical RAM capped by the cgroup memory limit."""

from __future__ import annotations

import os

import pytest
import torch

from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.distributed.sharding import cgroup_memory_limit, device_capacities, host_memory_bytes

RAM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
GIB = 1 << 30


def _file(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_cgroup_limit_v2_v1_and_no_limit(tmp_path):
    missing = str(tmp_path / "absent")
    assert cgroup_memory_limit([missing, _file(tmp_path, "v2", "4294967296\n")]) == 4 * GIB
    assert cgroup_memory_limit([_file(tmp_path, "v2max", "max\n")]) is None  # v2: no limit
    assert cgroup_memory_limit([_file(tmp_path, "v1", "9223372036854771712\n")]) is None  # v1: none
    assert cgroup_memory_limit([missing]) is None
    # v2 first: a v1 file further down the list is not read once one answers
    v1 = _file(tmp_path, "v1b", "1073741824")
    assert cgroup_memory_limit([_file(tmp_path, "v2b", "2147483648"), v1]) == 2 * GIB
    assert cgroup_memory_limit([missing, v1]) == GIB


def test_host_memory_is_the_smaller_of_ram_and_the_limit(tmp_path):
    limited = _file(tmp_path, "memory.max", str(GIB))
    assert host_memory_bytes([limited]) == min(RAM, GIB)
    assert host_memory_bytes([_file(tmp_path, "big", str(RAM * 4))]) == RAM  # a limit above RAM
    assert host_memory_bytes([_file(tmp_path, "none", "max")]) == RAM


def test_device_capacities_divide_the_pod_limit_among_local_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    hbm, host = device_capacities(env, [_file(tmp_path, "memory.max", str(GIB))])
    assert hbm is None and host == min(RAM, GIB) // 2
    if RAM <= GIB:
        pytest.skip("this machine has no more than 1 GiB of RAM: the cap cannot be told from RAM")
    assert host == GIB // 2
