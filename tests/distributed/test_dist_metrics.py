"""The distributed evaluation report equals the gathered one (``evaluation_report`` of the ranks'
columns concatenated in rank order): every key in the same order, every type, integers exactly and
floats to 1e-9, on real gloo ranks.

The cases are chosen where a distributed computation goes wrong first: uneven row counts, scores
with many ties (runs of equal scores spanning ranks, and calibration bins cutting through ties,
where only the stable order by source rank gives the same bins), users whose rows sit on several
ranks, a rank with no rows, a click-only model, fewer rows than calibration bins, no positives.
All cases run in one spawn per world size (starting ranks dominates the time).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from cstwa_dist.distributed.spawn import spawn_ranks

#: (name, rows per rank for W = 2, score grid (0: continuous), two tasks, purchase rate)
CASES: list[tuple[str, list[int], int, bool, float]] = [
    ("uneven_ties", [1500, 377], 40, True, 0.1),
    ("continuous", [900, 1100], 0, True, 0.2),
    ("first_rank_empty", [0, 600], 25, True, 0.1),
    ("last_rank_empty", [450, 0], 25, True, 0.1),
    ("click_only", [700, 313], 30, False, 0.0),
    ("one_score", [300, 200], 1, True, 0.1),
    ("fewer_rows_than_bins", [4, 3], 3, True, 0.3),
    ("no_purchases", [400, 350], 20, True, 0.0),
    ("no_rows", [0, 0], 10, True, 0.1),
]


def _columns(case: int, rank: int, rows: int, grid: int, two_tasks: bool, rate: float) -> dict[str, Any]:
    """One rank's columns of a case, as ``predict`` returns them (float32 labels and scores)."""
    rng = np.random.default_rng([case, rank])
    p_click = rng.random(rows)
    if grid:  # few distinct values: long runs of ties, across ranks too
        p_click = np.floor(p_click * grid) / grid + 0.5 / grid
    out = {
        "click": (rng.random(rows) < p_click).astype(np.float32),
        "p_click": p_click.astype(np.float32),
        "user": rng.integers(0, 40, rows).astype(np.int64),  # 40 users over all ranks
    }
    out["purchase"] = (out["click"] * (rng.random(rows) < rate * 4)).astype(np.float32)
    if two_tasks:
        p = p_click * rng.random(rows) * 0.5
        out["p_purchase"] = (np.round(p * grid) / grid if grid else p).astype(np.float32)
    return out


def _rows_for(world: int, rows: list[int]) -> list[int]:
    """The case's rows spread over ``world`` ranks (W = 3 adds a middle rank of odd size)."""
    return rows if world == 2 else [rows[0], (rows[0] + rows[1]) // 3 + (1 if any(rows) else 0), rows[1]]


def _worker(rank: int, world: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    from cstwa_dist.train.evaluation import distributed_evaluation_report
    from cstwa_dist.train.metrics import evaluation_report

    results = []
    for i, (name, rows, grid, two, rate) in enumerate(CASES):
        per_rank = [_columns(i, r, n, grid, two, rate) for r, n in enumerate(_rows_for(world, rows))]
        got = distributed_evaluation_report(per_rank[rank])
        if rank == 0:
            want = evaluation_report({k: np.concatenate([c[k] for c in per_rank]) for k in per_rank[0]})
            results.append((name, got, want))
        else:
            results.append((name, got, {}))
    return results


def _assert_same(got: Any, want: Any, where: str) -> None:
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} != {len(want)} items"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= 1e-9, f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


#: W = 3 (a middle rank, a range order with two boundaries) passes too; it is left out of the default
#: run because a second spawn doubles the test's time: add 3 here to check it
WORLDS = [2]


@pytest.mark.parametrize("world", WORLDS)
def test_distributed_report_equals_gathered(world: int) -> None:
    per_rank = spawn_ranks(_worker, world, backend="gloo", timeout_s=300)
    main = per_rank[0]
    assert [name for name, _, _ in main] == [c[0] for c in CASES]
    for name, got, want in main:
        _assert_same(got, want, f"W={world} {name}")
    # every rank ends with the same report (NaNs compare equal here)
    for other in per_rank[1:]:
        for (name, got, _), (_, mine, _) in zip(main, other, strict=True):
            _assert_same(mine, got, f"W={world} {name} (rank vs rank 0)")
    # the cases exercise what they are named for
    reports = {name: got for name, got, _ in main}
    assert reports["click_only"]["purchase_auc"] is None
    assert "purchase_gauc" not in reports["click_only"]
    assert math.isnan(reports["no_purchases"]["purchase_auc"])
    assert reports["no_rows"]["rows"] == 0
    assert reports["uneven_ties"]["click_gauc_users_used"] == 40  # every user has rows on all ranks
    small = sum(_rows_for(world, CASES[6][1]))
    assert len(reports["fewer_rows_than_bins"]["click_deciles"]["rows"]) == min(small, 10)
