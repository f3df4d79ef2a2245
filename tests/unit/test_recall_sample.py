"""Recall sampling by a seeded hash of the id (O(sample) memory), and recall without the query itself."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cstwa_dist.bench.knn import clustered_rows
from cstwa_dist.structure.ivf import IVFParams, distributed_knn, recall_counts, recall_sample_ids
from cstwa_dist.structure.knn import exact_knn, knn_recall


def test_sample_is_a_function_of_n_queries_and_seed_only():
    ids = recall_sample_ids(100_000, 2_000, seed=7)
    assert ids.dtype == np.int64 and ids.shape == (2_000,)
    assert (np.diff(ids) > 0).all() and ids[0] >= 0 and ids[-1] < 100_000  # sorted, distinct
    # the chunking (how much a rank hashes at a time) does not change the sample
    for chunk in (1, 997, 1 << 20):
        np.testing.assert_array_equal(recall_sample_ids(100_000, 2_000, seed=7, chunk=chunk), ids)
    assert not np.array_equal(recall_sample_ids(100_000, 2_000, seed=8), ids)
    # roughly uniform over the ids: 10 bins of 200 expected each
    counts = np.bincount(ids // 10_000, minlength=10)
    assert counts.min() > 140 and counts.max() < 260, counts
    np.testing.assert_array_equal(recall_sample_ids(50, 500, seed=7), np.arange(50))  # m clipped to n
    assert recall_sample_ids(50, 0, seed=7).size == 0 and recall_sample_ids(0, 5, seed=7).size == 0


def test_sample_memory_does_not_grow_with_n():
    n, m = 5_000_000, 200_000  # an arange / permutation of n alone is 40 MB
    tracemalloc.start()
    try:
        ids = recall_sample_ids(n, m, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids.size == m and np.unique(ids).size == m
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_recall_counts_excludes_the_query():
    exact = np.array([[0, 1, 2], [1, 0, 3]])
    approx = np.array([[0, 5, 2], [1, 7, 8]])
    assert recall_counts(approx, exact) == (3, 6)  # self counted: a free hit per row
    assert recall_counts(approx, exact, np.array([0, 1])) == (1, 4)  # row 0: {1,2}∩ → 2; row 1: none
    assert knn_recall(approx, exact, np.array([0, 1])) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="one query id per row"):
        recall_counts(approx, exact, np.array([0]))


def test_distributed_recall_is_over_the_non_self_neighbours():
    x = clustered_rows(0, 3000, 12, clusters=20, spread=0.5, seed=2)
    res = distributed_knn(x, [(0, len(x))], 6, IVFParams(nlist=48, nprobe=2), recall_queries=400)
    ids = recall_sample_ids(len(x), 400, IVFParams().seed)
    _, ref = exact_knn(x, 6)
    found, total = recall_counts(res.indices[ids], ref[ids], ids)
    assert total == 400 * 5  # k − 1 neighbours a query
    assert res.recall == pytest.approx(found / total)
    assert res.recall < 1.0
    # k = 1: only the query itself, nothing left to recall
    one = distributed_knn(x, [(0, len(x))], 1, IVFParams(nlist=48, nprobe=2), recall_queries=50)
    assert one.recall is None and one.recall_queries == 50
