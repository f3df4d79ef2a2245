"""Partial oracles, per-item lookups and the graphs' same-cluster rate against direct computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cstwa_dist.config import RunConfig, with_overrides
from cstwa_dist.data.spec import DatasetSpec, split_files
from cstwa_dist.data.synth import generate, world_of
from cstwa_dist.experiments.grid import Cell, build_report, instrument_report, write_reports
from cstwa_dist.experiments.oracles import (
    PRIOR_IMPRESSIONS,
    _item_lookups,
    graph_cluster_rate,
    partial_oracles,
)
from cstwa_dist.structure.sharded_graph import save_graph_shard, shard_from_knn


@pytest.fixture(scope="module")
def fair(tmp_path_factory) -> Path:
    """fair preset at 5 %: 20k train / 13,750 test rows, 100 users, 50 items (about a second)."""
    out = tmp_path_factory.mktemp("oracles") / "fair"
    generate("fair", 0.05, 0, out, progress=False)
    return out


@pytest.fixture(scope="module")
def result(fair, tmp_path_factory) -> dict:
    return partial_oracles(fair, cache=tmp_path_factory.mktemp("cache") / "oracles.json")


def _split(dataset: Path, split: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in split_files(dataset, split)], ignore_index=True)


def _lookups_by_hand(dataset: Path) -> tuple[pd.Series, pd.Series]:
    """Smoothed per-item train CTR and purchase rate by a pandas groupby (items never seen: global)."""
    train = _split(dataset, "train")
    a = PRIOR_IMPRESSIONS
    g = train.groupby("item_id").agg(n=("click", "size"), c=("click", "sum"), p=("purchase", "sum"))
    ctr = (g["c"] + a * train["click"].mean()) / (g["n"] + a)
    buy = (g["p"] + a * train["purchase"].mean()) / (g["n"] + a)
    items = pd.RangeIndex(world_of(dataset)[0].num_items)
    return (
        ctr.reindex(items, fill_value=train["click"].mean()),
        buy.reindex(items, fill_value=train["purchase"].mean()),
    )


def _gauc_by_hand(y: np.ndarray, s: np.ndarray, users: np.ndarray) -> float:
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    return num / den


def test_oracle_equals_sklearn_on_the_truth_recomputed_by_hand(fair, result):
    test = _split(fair, "test")
    world, meta = world_of(fair)
    t = world.truth(
        test["user_id"].to_numpy(),
        test["item_id"].to_numpy(),
        test["ctx_hour"].to_numpy(),
        test["ctx_position"].to_numpy(),
        test["ctx_device"].to_numpy(),
    )

    def sig(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    p_click = sig(t["click_logit"].astype(np.float64) + meta["bias_ctr"])
    p_buy = p_click * sig(t["buy_logit"].astype(np.float64) + meta["bias_cvr"])
    s = result["scores"]
    assert result["rows"] == len(test) and result["purchases"] == int(test["purchase"].sum())
    assert result["clicks"] == int(test["click"].sum()) and result["synthetic"]
    assert abs(result["truth_check"]["click_z"]) < 5 and abs(result["truth_check"]["purchase_z"]) < 5
    # float32 (as the generator) vs float64 here: a flipped near-tie moves the AUC by ~1e-7
    assert s["oracle_purchase"]["purchase_auc"] == pytest.approx(
        roc_auc_score(test["purchase"], p_buy), abs=1e-5
    )
    assert s["oracle_click"]["click_auc"] == pytest.approx(roc_auc_score(test["click"], p_click), abs=1e-5)
    assert s["affinity"]["purchase_auc"] == pytest.approx(
        roc_auc_score(test["purchase"], t["affinity"]), abs=1e-6
    )
    users = test["user_id"].to_numpy()
    assert s["oracle_purchase"]["purchase_gauc"] == pytest.approx(
        _gauc_by_hand(test["purchase"].to_numpy(), p_buy, users), abs=1e-4
    )


def test_lookups_equal_a_pandas_groupby(fair, result):
    ctr, buy = _lookups_by_hand(fair)
    mine = _item_lookups(fair, DatasetSpec.load(fair))
    np.testing.assert_allclose(mine["item_ctr"], ctr.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(mine["item_purchase_rate"], buy.to_numpy(), rtol=1e-12)
    test = _split(fair, "test")
    item = test["item_id"].to_numpy()
    s = result["scores"]
    assert s["item_purchase_rate"]["purchase_auc"] == pytest.approx(
        roc_auc_score(test["purchase"], buy.to_numpy()[item]), abs=1e-12
    )
    assert s["item_ctr"]["click_auc"] == pytest.approx(
        roc_auc_score(test["click"], ctr.to_numpy()[item]), abs=1e-12
    )
    assert s["item_ctr"]["purchase_auc"] == pytest.approx(
        roc_auc_score(test["purchase"], ctr.to_numpy()[item]), abs=1e-12
    )


def test_the_oracles_beat_the_lookups(result):
    s = result["scores"]
    for lookup in ("item_ctr", "item_purchase_rate"):
        assert s["oracle_purchase"]["purchase_auc"] > s[lookup]["purchase_auc"] + 0.05
        assert s["oracle_purchase"]["purchase_gauc"] > s[lookup]["purchase_gauc"]
    assert s["oracle_click"]["click_auc"] > s["item_ctr"]["click_auc"]


def test_the_cache_is_reused_and_never_inside_the_data_set(fair, result, tmp_path):
    cache = tmp_path / "o.json"
    first = partial_oracles(fair, cache=cache)
    assert json.loads(cache.read_text())["cache_key"] == first["cache_key"] == result["cache_key"]
    stored = json.loads(cache.read_text())
    stored["rows"] = -1  # a reuse returns the stored result, not a recomputed one
    cache.write_text(json.dumps(stored))
    assert partial_oracles(fair, cache=cache)["rows"] == -1
    with pytest.raises(ValueError, match="never written"):
        partial_oracles(fair, cache=fair / "oracles.json")
    assert not (fair / "oracles.json").exists()


def test_without_ground_truth_only_the_lookups(fair, result, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(fair, plain)
    (plain / "synth.json").unlink()
    r = partial_oracles(plain)
    assert not r["synthetic"] and r["rows"] == result["rows"]
    for name, s in r["scores"].items():
        if s["kind"] == "truth":
            assert not s["available"] and s["purchase_auc"] is None and s["click_gauc"] is None
        else:
            assert s["available"] and s["purchase_auc"] == result["scores"][name]["purchase_auc"]
    g = graph_cluster_rate(tmp_path / "nowhere", plain)
    assert not g["available"] and "synth.json" in g["reason"]


def _write_graph(graph_dir: Path, side: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random kNN graph with self in slot 0 and some non-positive scores (dropped, as pretrain does)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, size=k, replace=False) for _ in range(n)])
    for u in range(n):  # self first, like exact_knn
        row = [u, *[v for v in idx[u] if v != u]][:k]
        idx[u] = row
    scores = rng.uniform(-0.2, 1.0, size=(n, k)).astype(np.float32)
    scores[:, 0] = 1.0
    shard = shard_from_knn(scores, idx, [(0, n)], torch.device("cpu"))
    save_graph_shard(graph_dir, side, shard, [(0, n)], {"k": k})
    return scores, idx


def _rate_by_hand(scores: np.ndarray, idx: np.ndarray, cluster: np.ndarray) -> float:
    same = total = 0
    for u in range(idx.shape[0]):
        for v, sc in zip(idx[u], scores[u], strict=True):
            if v != u and sc > 0:
                total += 1
                same += int(cluster[u] == cluster[v])
    return same / total


def test_graph_cluster_rate_equals_a_direct_count(fair, tmp_path):
    world, _ = world_of(fair)
    lists = {
        "user": _write_graph(tmp_path, "user", world.num_users, 5, 1),
        "item": _write_graph(tmp_path, "item", world.num_items, 4, 2),
    }
    r = graph_cluster_rate(tmp_path, fair, block_rows=7, cache=tmp_path / "cache.json")
    assert r["available"]
    for side, cl in (("user", world.user_cluster), ("item", world.item_cluster)):
        scores, idx = lists[side]
        assert r[side]["rate"] == pytest.approx(_rate_by_hand(scores, idx, cl), abs=1e-12)
        share = np.bincount(cl) / cl.size
        assert r[side]["chance"] == pytest.approx(float((share**2).sum()))
        assert r[side]["edges"] == int(((idx != np.arange(len(idx))[:, None]) & (scores > 0)).sum())
    assert graph_cluster_rate(tmp_path, fair, cache=tmp_path / "cache.json") == r  # reused
    # a graph of another data set's size is reported, not raised
    other = tmp_path / "other"
    _write_graph(other, "user", world.num_users + 3, 3, 4)
    _write_graph(other, "item", world.num_items, 3, 5)
    bad = graph_cluster_rate(other, fair)
    assert not bad["available"] and "rows" in bad["reason"]


def test_experiment_report_carries_the_instrument(fair, tmp_path):
    cells = [Cell("table2", m, m, 0, ()) for m in ("mlp", "cstwa")]
    for c in cells:
        d = tmp_path / "cells" / c.cell_id
        d.mkdir(parents=True)
        d.joinpath("metrics.json").write_text(
            json.dumps(
                {
                    "click_auc": 0.7,
                    "purchase_auc": 0.65,
                    "samples_per_s": 1.0,
                    "world_size": 1,
                    "epochs": 1,
                    "config": {"data": {"dataset": str(fair)}},
                }
            )
        )
    base = with_overrides(RunConfig(), [f"data.dataset={fair}"])
    world, _ = world_of(fair)
    graph_dir = tmp_path / "structure" / f"k{base.structure.k}-seed0"  # where cell_config puts seed 0
    _write_graph(graph_dir, "user", world.num_users, 4, 1)
    _write_graph(graph_dir, "item", world.num_items, 4, 2)
    report = build_report(cells, tmp_path)
    report["instrument"] = instrument_report(base, cells, tmp_path)
    write_reports(report, tmp_path)
    inst = json.loads((tmp_path / "report.json").read_text())["instrument"]
    assert inst["oracles"]["scores"]["oracle_purchase"]["available"]
    assert [(g["seed"], g["k"], g["available"]) for g in inst["graphs"]] == [(0, base.structure.k, True)]
    assert inst["graph_mean"][0]["user"]["rate"] == inst["graphs"][0]["user"]["rate"]
    assert (tmp_path / "instrument" / "oracles-test.json").is_file()
    md = (tmp_path / "report.md").read_text()
    assert "## Partial oracles (test split)" in md and "| true purchase probability | truth |" in md
    assert "| *reference: per-item train CTR* | — |" in md
    assert "| *reference: per-item train purchase rate* | — |" in md
    assert "Graph same-cluster neighbour rate (k=" in md and "(chance " in md and "Truth check" in md
