"""Pure structure functions (kNN, adjacency, normalisation, propagation) against dense numpy references."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cstwa_dist.structure.graph import (
    build_graph,
    knn_to_adjacency,
    load_graph,
    normalise_adjacency,
    save_graph,
)
from cstwa_dist.structure.knn import ensure_self_first, exact_knn, knn_recall, l2_normalise
from cstwa_dist.structure.memory import total_bytes
from cstwa_dist.structure.propagate import beta_update, beta_update_memory, propagate, structure_migrate
from cstwa_dist.structure.readout import readout_memory
from cstwa_dist.structure.sharded_graph import (
    ShardedPropagator,
    migrate_memory,
    propagation_memory,
    propagator_memory,
    shard_build_memory,
    shard_of,
)


def dense_cosine(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    xn = x / safe[:, None]
    return xn @ xn.T


def dense_norm_adj(a: np.ndarray) -> np.ndarray:
    deg = a.sum(axis=1)
    dinv = np.zeros_like(deg)
    dinv[deg > 0] = deg[deg > 0] ** -0.5
    return np.diag(dinv) @ a @ np.diag(dinv)


# --- knn ---------------------------------------------------------------------------------------


def test_l2_normalise_zero_rows_and_dtype():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float64)
    xn = l2_normalise(x)
    assert xn.dtype == np.float32
    assert not np.isnan(xn).any()
    np.testing.assert_allclose(xn, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_exact_knn_matches_bruteforce():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    k = 5
    scores, idx = exact_knn(x, k, batch_size=37)  # several chunks, last one partial
    assert scores.shape == idx.shape == (120, k)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    sim = dense_cosine(x)
    for u in range(x.shape[0]):
        ref = np.argsort(-sim[u])[:k]
        assert set(idx[u].tolist()) == set(ref.tolist())
        np.testing.assert_allclose(scores[u], sim[u, idx[u]], atol=1e-5)
        np.testing.assert_allclose(np.sort(scores[u])[::-1], np.sort(sim[u, ref])[::-1], atol=1e-5)
    np.testing.assert_array_equal(idx[:, 0], np.arange(120))  # self, in slot 0
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # descending


def test_exact_knn_self_included_with_duplicates():
    # Five identical rows: every one ties with self at score 1; with k=2 Faiss may pick two others.
    x = np.ones((5, 3), dtype=np.float32)
    scores, idx = exact_knn(x, 2)
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))
    assert all(len(set(r.tolist())) == 2 for r in idx)
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)


def test_exact_knn_k_clipped_and_zero_rows(caplog):
    x = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.structure.knn"):
        scores, idx = exact_knn(x, 10)
    assert "clipping" in caplog.text
    assert idx.shape == (3, 3)
    assert not np.isnan(scores).any()
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(scores[1], [0.0, 0.0, 0.0])  # zero row: cosine 0 with everything
    for r in idx:
        assert sorted(r.tolist()) == [0, 1, 2]


def test_exact_knn_rejects_bad_k():
    with pytest.raises(ValueError):
        exact_knn(np.ones((3, 2), dtype=np.float32), 0)


def test_ensure_self_first_missing_self_replaces_last():
    scores = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    idx = np.array([[4, 5, 6]])
    s, i = ensure_self_first(scores, idx, np.array([0]), np.array([1.0]))
    np.testing.assert_array_equal(i, [[0, 4, 5]])
    np.testing.assert_allclose(s, [[1.0, 0.9, 0.8]])
    np.testing.assert_array_equal(idx, [[4, 5, 6]])  # input untouched


def test_knn_recall():
    exact = np.array([[0, 1, 2], [1, 2, 3]])
    approx = np.array([[2, 0, -1], [3, 2, 1]])
    assert knn_recall(approx, exact) == pytest.approx(5 / 6)
    assert knn_recall(exact, exact) == 1.0


# --- graph -------------------------------------------------------------------------------------


def test_knn_to_adjacency_clamps_negatives_no_symmetrisation():
    # Opposite vectors have cosine -1; with N=3, k=3 every pair is in the top-k.
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    scores, idx = exact_knn(x, 3)
    assert (scores < 0).any()
    a = knn_to_adjacency(scores, idx, 3)
    assert a.layout == torch.sparse_csr
    sim = dense_cosine(x)
    np.testing.assert_allclose(a.to_dense().numpy(), np.maximum(sim, 0.0), atol=1e-6)
    assert (a.values() > 0).all()  # zeros (clamped negatives) are not stored
    assert a.values().numel() == 5  # 3 self loops + (0,2) + (2,0)


def test_knn_to_adjacency_asymmetric():
    scores = np.array([[1.0, 0.5], [1.0, 0.25], [1.0, 0.5]], dtype=np.float32)
    idx = np.array([[0, 1], [1, 2], [2, 0]])
    a = knn_to_adjacency(scores, idx, 3).to_dense().numpy()
    ref = np.zeros((3, 3), dtype=np.float32)
    for u in range(3):
        ref[u, idx[u]] = scores[u]
    np.testing.assert_array_equal(a, ref)
    assert a[0, 1] == 0.5 and a[1, 0] == 0.0


def test_knn_to_adjacency_skips_missing_and_rejects_repeats():
    scores = np.array([[1.0, 0.25], [1.0, 0.5]], dtype=np.float32)
    a = knn_to_adjacency(scores, np.array([[0, -1], [1, 0]]), 2).to_dense().numpy()
    np.testing.assert_array_equal(a, [[1.0, 0.0], [0.5, 1.0]])
    with pytest.raises(ValueError):
        knn_to_adjacency(scores, np.array([[0, 0], [1, 0]]), 2)


def test_normalise_adjacency_matches_dense_with_zero_degree():
    # Asymmetric A where row 3 has degree 0 but column 3 is referenced; row sums differ from col sums.
    a = np.array(
        [
            [1.0, 0.5, 0.0, 0.2],
            [0.0, 1.0, 0.3, 0.0],
            [0.7, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    out = normalise_adjacency(torch.from_numpy(a).to_sparse_csr())
    assert out.layout == torch.sparse_csr and out.dtype == torch.float32
    ref = dense_norm_adj(a.astype(np.float64))
    np.testing.assert_allclose(out.to_dense().numpy(), ref, rtol=1e-6, atol=1e-7)
    assert (out.values() != 0).all()
    dense = out.to_dense()
    assert (dense[3] == 0).all() and (dense[:, 3] == 0).all()
    # COO input gives the same result.
    np.testing.assert_allclose(normalise_adjacency(torch.from_numpy(a).to_sparse()).to_dense().numpy(), ref)


def test_normalise_adjacency_rejects_negative():
    with pytest.raises(ValueError):
        normalise_adjacency(torch.tensor([[1.0, -0.5], [0.0, 1.0]]).to_sparse_csr())


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    a = build_graph(x, 4)
    path = tmp_path / "sub" / "users.graph.pt"
    save_graph(path, a)
    b = load_graph(path)
    assert b.layout == torch.sparse_csr and b.shape == a.shape
    assert torch.equal(b.crow_indices(), a.crow_indices())
    assert torch.equal(b.col_indices(), a.col_indices())
    assert torch.equal(b.values(), a.values())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_build_graph_clustered_neighbours_stay_in_cluster():
    rng = np.random.default_rng(2)
    centres = np.eye(4, 16, dtype=np.float32) * 10.0
    labels = np.repeat(np.arange(4), 50)
    x = centres[labels] + rng.normal(scale=0.3, size=(200, 16)).astype(np.float32)
    a = build_graph(x, 8)
    assert a.layout == torch.sparse_csr and a.shape == (200, 200)
    crow, col = a.crow_indices().numpy(), a.col_indices().numpy()
    assert (np.diff(crow) == 8).all()
    for u in range(200):
        nbrs = col[crow[u] : crow[u + 1]]
        assert u in nbrs
        assert (labels[nbrs] == labels[u]).all()


# --- propagate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_propagate_matches_matrix_power(layers):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    a_hat = build_graph(x, 5)
    a_dense = a_hat.to_dense().numpy().astype(np.float64)
    out = propagate(a_hat, torch.from_numpy(x), layers)
    ref = np.linalg.matrix_power(a_dense, layers) @ x.astype(np.float64)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_propagate_zero_layers_and_bad_shapes():
    a = torch.eye(3).to_sparse_csr()
    x = torch.randn(3, 2)
    assert propagate(a, x, 0) is x
    with pytest.raises(ValueError):
        propagate(a, torch.randn(4, 2), 1)
    with pytest.raises(ValueError):
        propagate(a, x, -1)


def test_beta_update_and_structure_migrate():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    xp = rng.normal(size=(20, 3)).astype(np.float32)
    out = beta_update(torch.from_numpy(x), torch.from_numpy(xp), 0.3)
    np.testing.assert_allclose(out.numpy(), 0.7 * x + 0.3 * xp, rtol=1e-6, atol=1e-7)
    a_hat = build_graph(x, 4)
    sm = structure_migrate(a_hat, torch.from_numpy(x), 1, 0.3)
    ref = 0.7 * x + 0.3 * (a_hat.to_dense().numpy() @ x)
    np.testing.assert_allclose(sm.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_out_of_range_rejected(beta):
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError):
        beta_update(x, x, beta)
    with pytest.raises(ValueError):
        structure_migrate(torch.eye(2).to_sparse_csr(), x, 1, beta)


# --- memory functions: each step's own statement of what it allocates --------------------------


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_propagation_memory_is_what_the_propagator_reports(layers):
    """One rank (nothing to fetch): the formulas against ``ShardedPropagator.memory()``, which counts
    the tensors actually allocated. Positive rows make every cosine positive, so every row of ``Â``
    keeps its ``k`` entries and the CSR formula is exact."""
    n, w, k = 40, 6, 5
    x = np.random.default_rng(5).uniform(0.1, 1.0, size=(n, w)).astype(np.float32)
    shard = shard_of(build_graph(x, k), 0, n)
    assert shard.nnz == n * k
    prop = ShardedPropagator(shard, [(0, n)])
    prop.propagate(torch.from_numpy(x), layers)
    held = prop.memory()
    want = {i.key: i.bytes for i in propagation_memory(n, 0, w, layers)}
    assert want == {"layer_outputs": min(layers, 2) * n * w * 4}
    for key in ("fetched_rows", "send_buffers", "window_own_copy", "layer_outputs"):
        assert held[key] == want.get(key, 0), key
    resident = {i.key: i.bytes for i in propagator_memory(n, k, 0)}
    assert resident == {"csr": held["csr"], "ids": held["ids"]}


def test_migrate_memory_is_the_larger_phase():
    n, w = 100, 8
    block = n * w * 4
    # one rank: mixing (the propagated block, (1−β)·U, β·Â^L·U, the new block) outweighs one layer output
    one = migrate_memory(n, 0, w, 1)
    assert [i.key for i in one] == ["propagated", "beta_terms", "new_block"]
    assert total_bytes(one) == 4 * block == block + total_bytes(beta_update_memory(n, w))
    # with foreign rows: fetched + served + the window's own rows + min(L, 2) layer outputs
    assert total_bytes(migrate_memory(n, 300, w, 1)) == 2 * 300 * w * 4 + 2 * block
    assert total_bytes(migrate_memory(n, 300, w, 5)) == 2 * 300 * w * 4 + 3 * block
    assert total_bytes(migrate_memory(n, 0, w, 0)) == 3 * block  # L = 0: the block is U itself
    assert total_bytes(beta_update_memory(n, w, itemsize=2)) == 3 * n * w * 2


def test_build_and_readout_memory_formulas():
    assert total_bytes(shard_build_memory(1000, 8, 0)) == 1000 * 8 * 61 + 16 * 1000
    assert total_bytes(shard_build_memory(1000, 8, 500)) == 1000 * 8 * 61 + 16 * 1000 + 32 * 500
    assert {i.key: i.bytes for i in readout_memory(1000, 5, 40)} == {
        "profiles": 1000 * 6 * 8,
        "representations": 1000 * 40 * 4,
    }
