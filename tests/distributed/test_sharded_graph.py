"""Row-sharded Â and propagation on 2 real gloo ranks (spawned), against the single-process reference.

One spawned run (module fixture) does every 2-rank case and writes graph parts; the tests compare what
the ranks returned with ``normalise_adjacency(knn_to_adjacency(...))`` and ``structure_migrate`` on
the whole graph, read the parts back at other splits, and bound what each rank held. The unit tests
at the end run without a process group (world size 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cstwa_dist.distributed.exchange import RowFetcher, _check_needed, check_ranges
from cstwa_dist.distributed.spawn import spawn_ranks
from cstwa_dist.structure.graph import knn_to_adjacency, normalise_adjacency
from cstwa_dist.structure.propagate import propagate, structure_migrate
from cstwa_dist.structure.sharded_graph import (
    GraphShard,
    ShardedPropagator,
    graph_rows,
    load_graph_rows,
    save_graph_shard,
    shard_from_knn,
    shard_of,
)

D = 6
BETA = 0.3
#: name -> (N, k, locality, ranges): uneven, an empty first range, an empty last range, a larger local one
CASES: dict[str, tuple[int, int, float, list[tuple[int, int]]]] = {
    "uneven": (17, 5, 0.0, [(0, 3), (3, 17)]),
    "empty_first": (17, 5, 0.0, [(0, 0), (0, 17)]),
    "empty_last": (17, 5, 0.0, [(0, 17), (17, 17)]),
    "local": (400, 6, 0.9, [(0, 150), (150, 400)]),
}


def knn_lists(n: int, k: int, locality: float, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """kNN-like lists with every edge case of Eq. 4-5: self first, negative and zero cosines, ``-1``
    ids, a row of degree 0 (row 5: nothing positive) that others list, repeated-free rows."""
    rng = np.random.default_rng(seed)
    idx = np.empty((n, k), dtype=np.int64)
    for u in range(n):
        near = (u + rng.integers(-8, 9, size=4 * k)) % n
        far = rng.integers(0, n, size=4 * k)
        cand = np.where(rng.random(4 * k) < locality, near, far)
        cand = [c for c in dict.fromkeys(cand.tolist()) if c != u][: k - 1]
        idx[u] = [u, *cand]
    scores = rng.uniform(-0.4, 1.0, size=(n, k)).astype(np.float32)
    scores[:, 0] = 1.0
    scores = -np.sort(-scores, axis=1)
    scores[2, 3] = 0.0  # a genuine zero cosine
    idx[9, 2:4] = -1  # an approximate index's "no result"
    scores[5] = -0.1  # row 5: degree 0, so every entry (u, 5) vanishes after Eq. 5
    for u in (0, 4, 11):
        if 5 not in idx[u]:
            idx[u, 1] = 5
    return scores, idx


def table(n: int, dtype: torch.dtype, seed: int = 11) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, D))).to(dtype)


def _worker(rank: int, world: int, out_dir: str) -> dict:
    """Every case on this rank: its own kNN rows only → shard, propagate, migrate, save."""
    res: dict = {}
    for name, (n, k, loc, ranges) in CASES.items():
        lo, hi = ranges[rank]
        scores, idx = knn_lists(n, k, loc)
        shard = shard_from_knn(scores[lo:hi], idx[lo:hi], ranges, torch.device("cpu"))
        prop = ShardedPropagator(shard, ranges, torch.device("cpu"))
        r: dict = {"crow": shard.crow.numpy(), "col": shard.col.numpy(), "val": shard.val.numpy()}
        for dtype in (torch.float32, torch.float64):
            x = table(n, dtype)[lo:hi].contiguous()
            tag = str(dtype).split(".")[-1]
            for layers in (0, 1, 2):
                r[f"prop_{tag}_L{layers}"] = prop.propagate(x, layers).numpy()
                r[f"stats_{tag}_L{layers}"] = dict(prop.last_stats)
                r[f"memory_{tag}_L{layers}"] = prop.memory()
            for layers in (1, 2):
                r[f"migrate_{tag}_L{layers}"] = prop.migrate(x, layers, BETA).numpy()
        r["rows_requested"] = prop.fetcher.rows_requested
        r["rows_served"] = prop.fetcher.rows_served
        r["recv_counts"] = prop.fetcher.recv_counts
        r["foreign"] = shard.foreign_columns().numpy()
        save_graph_shard(Path(out_dir) / name, "user", shard, ranges, {"k": k, "case": name})
        res[name] = r

    # RowFetcher on its own: rows whose values are their global ids, an arbitrary request list.
    ranges = [(0, 7), (7, 20)]
    lo, hi = ranges[rank]
    ids = torch.arange(20, dtype=torch.int64)
    needed = ids[((ids < lo) | (ids >= hi)) & (ids % 3 != 1)]
    fetcher = RowFetcher(ranges, needed, torch.device("cpu"))
    local = torch.stack([ids[lo:hi].double(), -ids[lo:hi].double()], dim=1)
    res["fetch"] = {
        "needed": needed.numpy(),
        "rows": fetcher.fetch(local).numpy(),
        "window": fetcher.fetch_window(local).numpy(),
        "stats": fetcher.stats(),
    }

    # A bad argument on one rank raises on both (nobody is left blocked in a receive).
    errors = {}
    bad = torch.tensor([12, 9], dtype=torch.int64) if rank == 0 else torch.zeros(0, dtype=torch.int64)
    try:
        RowFetcher(ranges, bad, torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        errors["unsorted"] = f"{type(e).__name__}: {e}"
    n, k, loc, ranges = CASES["uneven"]
    lo, hi = ranges[rank]
    scores, idx = knn_lists(n, k, loc)
    shard = shard_from_knn(scores[lo:hi], idx[lo:hi], ranges)
    prop = ShardedPropagator(shard, ranges)
    x = table(n, torch.float32)[lo:hi]
    try:
        prop.propagate(x, 1 + rank)  # ranks disagree on the number of layers
    except ValueError as e:
        errors["layers"] = f"{type(e).__name__}: {e}"
    try:
        prop.migrate(x, 1, 3.0 if rank == 1 else 0.5)
    except (ValueError, RuntimeError) as e:
        errors["beta"] = f"{type(e).__name__}: {e}"
    bad_idx, bad_scores = idx[lo:hi].copy(), scores[lo:hi].copy()
    if rank == 1:  # slot 1 repeats slot 0 (self) with a positive cosine: not dropped before the check
        bad_idx[0, 1], bad_scores[0, 1] = bad_idx[0, 0], 0.9
    try:
        shard_from_knn(bad_scores, bad_idx, ranges)
    except (ValueError, RuntimeError) as e:
        errors["repeat"] = f"{type(e).__name__}: {e}"
    res["errors"] = errors
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    results = spawn_ranks(_worker, 2, str(out), timeout_s=300, backend="gloo")
    return results, out


def reference(name: str) -> torch.Tensor:
    n, k, loc, _ = CASES[name]
    scores, idx = knn_lists(n, k, loc)
    return normalise_adjacency(knn_to_adjacency(scores, idx, n))


def cat(results: list[dict], name: str, key: str) -> np.ndarray:
    return np.concatenate([r[name][key] for r in results])


@pytest.mark.parametrize("name", list(CASES))
def test_shard_rows_equal_rows_of_the_reference_bit_for_bit(run, name):
    results, _ = run
    ref = reference(name)
    for rank, (lo, hi) in enumerate(CASES[name][3]):
        want = shard_of(ref, lo, hi)
        got = results[rank][name]
        np.testing.assert_array_equal(got["crow"], want.crow.numpy())
        np.testing.assert_array_equal(got["col"], want.col.numpy())
        np.testing.assert_array_equal(got["val"], want.val.numpy())  # same float64 math, exactly
    assert ref.values().numel() < CASES[name][0] * CASES[name][1]  # zeros/-1/degree-0 entries were dropped


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_propagate_and_migrate_equal_structure_migrate_on_the_full_graph(run, name, dtype):
    results, _ = run
    ref = reference(name)
    u = table(CASES[name][0], dtype)
    tag = str(dtype).split(".")[-1]
    for layers in (0, 1, 2):
        got = torch.from_numpy(cat(results, name, f"prop_{tag}_L{layers}"))
        torch.testing.assert_close(got, propagate(ref, u, layers), rtol=0, atol=0)
    for layers in (1, 2):
        got = torch.from_numpy(cat(results, name, f"migrate_{tag}_L{layers}"))
        torch.testing.assert_close(got, structure_migrate(ref, u, layers, BETA), rtol=0, atol=0)


def test_no_rank_holds_more_than_its_rows_and_the_distinct_foreign_rows_it_needs(run):
    results, _ = run
    n, _, _, ranges = CASES["local"]
    ref = reference("local")
    for rank, (lo, hi) in enumerate(ranges):
        r = results[rank]["local"]
        want = shard_of(ref, lo, hi).foreign_columns()
        f, n_own = want.numel(), hi - lo
        assert r["rows_requested"] == f and np.array_equal(r["foreign"], want.numpy())
        assert f < n - n_own  # the graph is local in id order: the bound below is not vacuous
        assert r["rows_served"] == results[1 - rank]["local"]["recv_counts"][rank]
        for tag, b in (("float32", 4), ("float64", 8)):
            mem = r[f"memory_{tag}_L2"]
            assert mem["own_rows"] == n_own * D * b
            assert mem["fetched_rows"] == f * D * b
            assert mem["window_own_copy"] == n_own * D * b
            assert mem["layer_outputs"] == 2 * n_own * D * b
            assert mem["send_buffers"] <= r["rows_served"] * D * b
            assert mem["ids"] == 8 * (f + r["rows_served"])
            rows_held = mem["own_rows"] + mem["fetched_rows"] + mem["window_own_copy"] + mem["layer_outputs"]
            assert rows_held + mem["send_buffers"] <= (4 * n_own + f + r["rows_served"]) * D * b
            assert mem["total"] == sum(v for key, v in mem.items() if key != "total")
            stats = r[f"stats_{tag}_L2"]  # exactly the foreign rows crossed the wire, once per layer
            assert stats["bytes_received"] == 2 * f * D * b
            assert stats["bytes_sent"] == 2 * r["rows_served"] * D * b
        assert r["memory_float32_L0"]["fetched_rows"] == 0  # no layer, no exchange


def test_row_fetcher_returns_owner_rows_in_needed_order(run):
    results, _ = run
    for rank, (lo, hi) in enumerate([(0, 7), (7, 20)]):
        r = results[rank]["fetch"]
        needed = r["needed"].astype(np.float64)
        np.testing.assert_array_equal(r["rows"], np.stack([needed, -needed], axis=1))
        window_ids = np.sort(np.concatenate([needed, np.arange(lo, hi, dtype=np.float64)]))
        np.testing.assert_array_equal(r["window"], np.stack([window_ids, -window_ids], axis=1))
        assert r["stats"]["rows_requested"] == len(needed) and r["stats"]["fetches"] == 2


def test_a_bad_argument_on_one_rank_raises_on_every_rank(run):
    results, _ = run
    e0, e1 = results[0]["errors"], results[1]["errors"]
    assert "sorted and unique" in e0["unsorted"] and "rank(s) [0]" in e1["unsorted"]
    assert "disagree" in e0["layers"] and "disagree" in e1["layers"]
    assert "rank(s) [1]" in e0["beta"] and "beta must lie in [0, 1]" in e1["beta"]
    assert "rank(s) [1]" in e0["repeat"] and "same neighbour twice" in e1["repeat"]


@pytest.mark.parametrize(
    "split", [[(0, 400)], [(0, 133), (133, 266), (266, 400)], [(0, 10), (10, 10), (10, 400)]]
)
def test_parts_written_on_two_ranks_read_back_at_another_split(run, split):
    _, out = run
    ref = reference("local")
    assert graph_rows(out / "local", "user") == 400
    for lo, hi in split:
        got, want = load_graph_rows(out / "local", "user", lo, hi), shard_of(ref, lo, hi)
        assert (got.lo, got.hi, got.n_total) == (lo, hi, 400)
        for a, b in ((got.crow, want.crow), (got.col, want.col), (got.val, want.val)):
            assert torch.equal(a, b)
    # the empty-range case wrote an empty part; reading across it works too
    got = load_graph_rows(out / "empty_first", "user", 0, 17)
    assert torch.equal(got.val, reference("empty_first").values())


def test_incomplete_or_inconsistent_directories_are_rejected(run, tmp_path):
    _, out = run
    d = tmp_path / "g"
    shutil.copytree(out / "local", d)
    (d / "user_graph" / "part-00001-of-00002.col.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"part-00001-of-00002\.col\.npy: listed in the manifest"):
        load_graph_rows(d, "user", 140, 160)
    assert load_graph_rows(d, "user", 0, 150).rows == 150  # rows that need only part 0 still load
    manifest = d / "user_graph" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"n_total": 400', '"n_total": 401'))
    with pytest.raises(ValueError, match=r"manifest\.json: parts cover \[0, 400\) but n_total is 401"):
        graph_rows(d, "user")
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found: the user graph .* incomplete"):
        load_graph_rows(d, "user", 0, 1)
    with pytest.raises(FileNotFoundError, match="manifest"):
        graph_rows(d, "item")
    with pytest.raises(ValueError, match=r"rows \[0, 401\) outside"):
        load_graph_rows(out / "local", "user", 0, 401)
    with pytest.raises(ValueError, match="plain name"):
        load_graph_rows(out / "local", "../x", 0, 1)


# --- world size 1, no process group ------------------------------------------------------------


def test_one_rank_without_a_group_equals_the_reference(run, tmp_path):
    n, k, loc, _ = CASES["local"]
    scores, idx = knn_lists(n, k, loc)
    ref = reference("local")
    shard = shard_from_knn(scores, idx, [(0, n)], torch.device("cpu"))
    assert torch.equal(shard.crow, ref.crow_indices()) and torch.equal(shard.col, ref.col_indices())
    assert torch.equal(shard.val, ref.values())
    prop = ShardedPropagator(shard, [(0, n)])
    assert prop.fetcher.rows_requested == 0
    u = table(n, torch.float32)
    assert torch.equal(prop.migrate(u, 2, BETA), structure_migrate(ref, u, 2, BETA))
    assert prop.memory()["fetched_rows"] == 0
    save_graph_shard(tmp_path, "item", shard, [(0, n)], {"k": k})
    assert torch.equal(load_graph_rows(tmp_path, "item", 5, 300).val, shard_of(ref, 5, 300).val)
    # Rewriting a directory the 2 ranks wrote: their parts are not listed any more, so they go.
    shutil.copytree(run[1] / "local", tmp_path / "again")
    save_graph_shard(tmp_path / "again", "user", shard, [(0, n)])
    names = sorted(p.name for p in (tmp_path / "again" / "user_graph").iterdir())
    assert names == ["manifest.json", *(f"part-00000-of-00001.{key}.npy" for key in ("col", "crow", "val"))]
    assert torch.equal(load_graph_rows(tmp_path / "again", "user", 0, n).col, shard.col)


def test_validation_errors_without_a_group():
    scores, idx = knn_lists(17, 5, 0.0)
    with pytest.raises(ValueError, match="one row range per rank"):
        shard_from_knn(scores, idx, [(0, 3), (3, 17)])
    with pytest.raises(ValueError, match="contiguous from 0"):
        check_ranges([(1, 17)], 1)
    with pytest.raises(ValueError, match="one kNN row per own row"):
        shard_from_knn(scores[:3], idx[:3], [(0, 17)])
    bad = scores.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        shard_from_knn(bad, idx, [(0, 17)])
    bad_idx = idx.copy()
    bad_idx[1, 1] = 17
    with pytest.raises(ValueError, match="out of range"):
        shard_from_knn(scores, bad_idx, [(0, 17)])
    with pytest.raises(ValueError, match="same neighbour twice"):
        shard_from_knn(scores, np.tile(idx[:, :1], (1, 5)), [(0, 17)])

    with pytest.raises(ValueError, match="sorted and unique"):
        _check_needed(torch.tensor([5, 4]), 0, 3, 10)
    with pytest.raises(ValueError, match="sorted and unique"):
        _check_needed(torch.tensor([5, 5]), 0, 3, 10)
    with pytest.raises(ValueError, match="owns itself"):
        _check_needed(torch.tensor([2, 5]), 0, 3, 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        _check_needed(torch.tensor([5, 10]), 0, 3, 10)
    with pytest.raises(ValueError, match="1-D int64"):
        _check_needed(torch.tensor([5.0]), 0, 3, 10)
    with pytest.raises(ValueError, match="owns itself"):
        RowFetcher([(0, 10)], torch.tensor([4]), torch.device("cpu"))
    fetcher = RowFetcher([(0, 10)], torch.zeros(0, dtype=torch.int64), torch.device("cpu"))
    assert fetcher.fetch(torch.ones(10, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="needs 10"):
        fetcher.fetch(torch.ones(9, 3))

    shard = shard_from_knn(scores, idx, [(0, 17)])
    with pytest.raises(ValueError, match="do not match its range"):
        ShardedPropagator(shard, [(0, 18)])
    prop = ShardedPropagator(shard, [(0, 17)])
    x = table(17, torch.float32)
    with pytest.raises(ValueError, match="non-negative integer"):
        prop.propagate(x, -1)
    with pytest.raises(ValueError, match="needs 17"):
        prop.propagate(x[:5], 1)
    with pytest.raises(ValueError, match="floating point"):
        prop.propagate(x.long(), 1)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        prop.migrate(x, 1, 1.5)
    broken = GraphShard(0, 17, 17, shard.crow, shard.col, shard.val[:-1])
    with pytest.raises(ValueError, match="values"):
        ShardedPropagator(broken, [(0, 17)])
    with pytest.raises(ValueError, match="do not match its range"):
        save_graph_shard("/nonexistent-unused", "user", shard, [(0, 18)])
