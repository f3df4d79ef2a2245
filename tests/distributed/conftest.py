"""Fixtures of the multi-rank tests: a clean Ray environment for the ranks, and graphs mined once.

Ranks are started by :func:`cstwa_dist.distributed.spawn.spawn_ranks` (the harness ``bench knn`` and
``bench propagate`` use too); what their workers share is in ``tests/distributed/common.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import WORLD, mine_worker


@pytest.fixture(scope="package", autouse=True)
def _no_ray_address() -> Iterator[None]:
    """Ranks that stream data start their own private Ray runtime. A ``RAY_ADDRESS`` inherited from a
    shell attached to a node runtime would send their readers there instead. Spawned ranks inherit
    this process's environment; package scope puts this in place before any fixture starts ranks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        yield


@pytest.fixture(scope="package")
def exact_graphs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """User and item graphs with their pre-trained representations, mined once on 2 ranks with exact
    kNN (``k = 4``). Shared by every test that reads mined graphs: none may write into it."""
    out = tmp_path_factory.mktemp("exact_graphs")
    spawn_ranks(mine_worker, WORLD, str(tiny_dataset), str(out), "exact")
    return out
