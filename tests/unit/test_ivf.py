"""Distributed-kNN building blocks in one process: IVF against exact search, recall, top-k merge."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from cstwa_dist.bench.knn import clustered_rows
from cstwa_dist.structure.ivf import (
    BLOCK_ROWS,
    GPU_MAX_K,
    IVFParams,
    _faiss_train_serialised,
    auto_nlist,
    check_ivf_supported,
    distributed_knn,
    even_ranges,
    faiss_device,
    ivf_support_problems,
    knn_memory,
    merge_topk,
    per_rank_bytes,
    per_rank_memory,
    quantizer_sample_rows,
    recall_counts,
    recall_sample_ids,
    resolve_cells,
    ring_madds,
)
from cstwa_dist.structure.knn import exact_knn, knn_recall


def clustered(n: int = 3000, d: int = 12, seed: int = 0) -> np.ndarray:
    return clustered_rows(0, n, d, clusters=20, spread=0.5, seed=seed)


def assert_same_topk(scores, idx, ref_scores, ref_idx, tol: float = 1e-5) -> None:
    """Equal neighbour sets row by row, except where a differing id ties (within ``tol``) with the
    exact k-th score: two paths summing a dot product in different orders may break such ties apart."""
    assert idx.shape == ref_idx.shape
    np.testing.assert_allclose(scores, ref_scores, atol=tol)
    for u in np.nonzero((np.sort(idx, axis=1) != np.sort(ref_idx, axis=1)).any(axis=1))[0]:
        kth = ref_scores[u, -1]
        extra = set(idx[u].tolist()) ^ set(ref_idx[u].tolist())
        ours = {int(v): float(s) for v, s in zip(idx[u], scores[u], strict=True)}
        theirs = {int(v): float(s) for v, s in zip(ref_idx[u], ref_scores[u], strict=True)}
        for v in extra:
            assert abs(ours.get(v, theirs.get(v)) - kth) <= tol, f"row {u}: neighbour {v} is no tie"


def test_ivf_with_every_cell_probed_equals_exact():
    x = clustered()
    ref_s, ref_i = exact_knn(x, 8)
    res = distributed_knn(x, [(0, len(x))], 8, IVFParams(nlist=40, nprobe=40), recall_queries=300)
    assert (res.lo, res.hi, res.k, res.nlist, res.nprobe) == (0, len(x), 8, 40, 40)
    assert_same_topk(res.scores, res.indices, ref_s, ref_i)
    assert res.recall is not None and res.recall >= 0.999
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(len(x)))  # self first, as exact_knn


def test_exact_ring_equals_exact_knn_and_blocks_do_not_matter():
    x = clustered(seed=1)
    ref_s, ref_i = exact_knn(x, 6)
    a = distributed_knn(x, [(0, len(x))], 6, IVFParams(exact=True), recall_queries=0)
    b = distributed_knn(x, [(0, len(x))], 6, IVFParams(exact=True), recall_queries=0, block_rows=257)
    assert_same_topk(a.scores, a.indices, ref_s, ref_i)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.recall is None and a.nlist == 0
    assert b.ring.rounds == -(-len(x) // 257)


def test_ivf_recall_matches_knn_recall_on_the_sample():
    x = clustered(n=4000, seed=2)
    res = distributed_knn(x, [(0, len(x))], 8, IVFParams(nlist=64, nprobe=2), recall_queries=500)
    ids = recall_sample_ids(len(x), 500, IVFParams().seed)
    _, ref_i = exact_knn(x, 8)
    # the query itself is not counted (it is always its own first neighbour on both paths)
    assert res.recall == pytest.approx(knn_recall(res.indices[ids], ref_i[ids], ids))
    assert res.recall < knn_recall(res.indices[ids], ref_i[ids])
    assert 0.5 < res.recall < 1.0  # 2 of 64 cells: approximate, but far from random


def test_pq_scores_are_exact_cosines():
    x = clustered(n=3000, d=12, seed=3)
    res = distributed_knn(x, [(0, len(x))], 5, IVFParams(nlist=32, nprobe=32, pq_m=4), recall_queries=200)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.einsum("ud,ukd->uk", xn, xn[res.indices])
    np.testing.assert_allclose(res.scores, cos, atol=1e-5)
    assert res.recall is not None and res.recall > 0.8


def test_same_semantics_as_exact_for_duplicates_zero_rows_and_large_k(caplog):
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.structure.ivf"):
        res = distributed_knn(x, [(0, 5)], 10, IVFParams(exact=True), recall_queries=5)
    assert "clipping" in caplog.text and res.k == 5
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(5))
    assert res.scores[3, 0] == 0.0 and np.isfinite(res.scores).all()
    ref_s, _ = exact_knn(x, 5)
    np.testing.assert_allclose(res.scores, ref_s, atol=1e-6)
    # the self-first rule runs block by block, in place: blocks of 2 rows give the same lists
    small = distributed_knn(x, [(0, 5)], 10, IVFParams(exact=True), recall_queries=0, block_rows=2)
    np.testing.assert_array_equal(small.indices, res.indices)
    np.testing.assert_array_equal(small.scores, res.scores)


def test_recall_counts_by_hand():
    exact = np.array([[0, 1, 2], [3, 4, -1]])
    approx = np.array([[2, 0, 9], [4, -1, 7]])
    assert recall_counts(approx, exact) == (3, 5)  # row 0: 0 and 2; row 1: 4 (-1 never counts)
    assert recall_counts(exact, exact) == (5, 5)
    with pytest.raises(ValueError):
        recall_counts(approx[:1], exact)


def test_merge_topk_by_hand():
    s, i = merge_topk(
        np.array([[0.9, 0.5]], np.float32),
        np.array([[1, 2]]),
        np.array([[0.7, 0.5]], np.float32),
        np.array([[7, 8]]),
        3,
    )
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.5]])
    np.testing.assert_array_equal(i, [[1, 7, 2]])  # the tie keeps the first list's entry


def test_ranges_params_and_nlist_rules():
    assert even_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert auto_nlist(1_000_000) == 4000 and auto_nlist(100) == 2 and auto_nlist(10) == 1
    x = clustered(n=100)
    with pytest.raises(ValueError, match="one row range per rank"):
        distributed_knn(x, [(0, 50), (50, 100)], 4)
    with pytest.raises(ValueError, match="needs 100 rows"):
        distributed_knn(x[:50], [(0, 100)], 4)
    with pytest.raises(ValueError):
        IVFParams(quantizer="lsh")
    with pytest.raises(ValueError):
        IVFParams(nprobe=0)


def test_hnsw_quantizer_runs_and_finds_neighbours():
    x = clustered(n=4000, seed=4)
    res = distributed_knn(x, [(0, len(x))], 8, IVFParams(nlist=64, nprobe=16, quantizer="hnsw"))
    assert res.recall is not None and res.recall > 0.95


def test_generated_rows_do_not_depend_on_the_range():
    full = clustered_rows(0, 70000, 4, clusters=5, spread=0.1, seed=9)
    part = clustered_rows(65000, 66000, 4, clusters=5, spread=0.1, seed=9)
    np.testing.assert_array_equal(full[65000:66000], part)
    assert clustered_rows(10, 10, 4, clusters=5, spread=0.1, seed=9).shape == (0, 4)


def test_per_rank_bytes_formula():
    flat = per_rank_bytes(1000, 40, 8, nlist=0, nprobe=0, block_rows=100)
    ivf = per_rank_bytes(1000, 40, 8, nlist=10, nprobe=4, block_rows=100)
    pq = per_rank_bytes(1000, 40, 8, nlist=10, nprobe=4, block_rows=100, pq_m=8)
    assert flat["index"] == 0 and flat["shard"] == 1000 * 40 * 4
    assert ivf["index"] == 1000 * (160 + 8) + 10 * 40 * 4
    assert ivf["foreign_block"] == 100 * (160 + 4 * 12)
    assert pq["index"] < ivf["index"] and ivf["total"] == sum(v for k, v in ivf.items() if k != "total")
    assert per_rank_bytes(1000, 40, 8, nlist=10, nprobe=4) == per_rank_bytes(
        1000, 40, 8, nlist=10, nprobe=4, block_rows=BLOCK_ROWS
    )
    # the running top-k once, plus one block's merge: no second list of the rank's size
    assert ivf["own_topk"] == 1000 * 8 * 12 + 100 * 8 * 52
    items = per_rank_memory(1000, 40, 8, nlist=10, nprobe=4, block_rows=100)
    assert {i.key: i.bytes for i in items} == {k: v for k, v in ivf.items() if k != "total"}


def test_knn_memory_uses_the_settings_distributed_knn_runs():
    x = clustered(n=2000, seed=6)
    for params in (IVFParams(), IVFParams(nlist=30, nprobe=50), IVFParams(exact=True)):
        res = distributed_knn(x, [(0, len(x))], 8, params, recall_queries=0)
        assert resolve_cells(params, len(x)) == (res.nlist, res.nprobe)
    params = IVFParams(nlist=30, nprobe=4)
    assert quantizer_sample_rows(2000, 30, params.train_per_list) == 30 * 39
    assert quantizer_sample_rows(100, 30, 39) == 100 and quantizer_sample_rows(100, 0, 39) == 0
    other = knn_memory(params, 2000, 500, 12, 8, block_rows=200)
    rank0 = knn_memory(params, 2000, 500, 12, 8, block_rows=200, rank0=True)
    assert other == per_rank_memory(500, 12, 8, nlist=30, nprobe=4, block_rows=200)
    (sample,) = [i for i in rank0 if i.rank0_only]
    # rank 0 holds every part (s rows), their concatenation (s), its own part and its padded copy
    assert sample.bytes == (2 * 1170 + 2 * 293) * 12 * 4 and rank0[:-1] == other
    one_rank = knn_memory(params, 2000, 2000, 12, 8, rank0=True)
    assert one_rank[-1].bytes == 1170 * 12 * 4  # nothing gathered: the sample's copy
    exact = knn_memory(IVFParams(exact=True), 2000, 500, 12, 8, rank0=True)
    assert not any(i.rank0_only or i.key == "index" for i in exact)
    assert knn_memory(params, 5, 5, 12, 8)[-1].bytes == 5 * 5 * 12 + 5 * 5 * 52  # k clipped to N


def test_ring_madds():
    assert ring_madds(1000, 250, 16, nlist=0, nprobe=0) == 1000 * 250 * 16
    assert ring_madds(1000, 250, 16, nlist=20, nprobe=5) == 1000 * 250 * 16 * 5 // 20 + 250 * 20 * 16


# --- GPU support rules (pure functions: checked here without a GPU) ---------------------------


def test_supported_settings_pass_on_both_devices():
    for params in (IVFParams(), IVFParams(nlist=4000, nprobe=16), IVFParams(exact=True), IVFParams(pq_m=3)):
        for device in ("cpu", "gpu"):
            assert ivf_support_problems(params, device, d=45, k=8) == []
    check_ivf_supported(IVFParams(pq_m=48, refine=4), "gpu", d=96, k=8)  # largest float32-table PQ
    with pytest.raises(ValueError, match="device must be"):
        ivf_support_problems(IVFParams(), "tpu")


def test_gpu_refuses_an_hnsw_quantizer_unless_kept_on_the_host():
    hnsw = IVFParams(quantizer="hnsw")
    (problem,) = ivf_support_problems(hnsw, "gpu")
    assert "quantizer='hnsw'" in problem and "gpu_cpu_quantizer=True" in problem
    assert ivf_support_problems(hnsw, "cpu") == []
    assert ivf_support_problems(IVFParams(quantizer="hnsw", gpu_cpu_quantizer=True), "gpu") == []


def test_gpu_refuses_pq_code_sizes_and_bits_it_lacks():
    # at the bench's width 45 GPU IVF-PQ has only pq_m = 1 or 3 (divisors of 45 it implements)
    (odd,) = ivf_support_problems(IVFParams(pq_m=9), "gpu", d=45)
    assert "pq_m=9 bytes per code is not implemented" in odd and "48" in odd
    (wide,) = ivf_support_problems(IVFParams(pq_m=64), "gpu", d=128)
    assert "float16 lookup tables" in wide
    (bits,) = ivf_support_problems(IVFParams(pq_m=8, pq_bits=4), "gpu", d=64)
    assert "pq_bits=4" in bits
    # the CPU index takes all of them
    for params, d in ((IVFParams(pq_m=9), 45), (IVFParams(pq_m=64), 128), (IVFParams(pq_m=8, pq_bits=4), 64)):
        assert ivf_support_problems(params, "cpu", d=d) == []


def test_gpu_limits_on_candidates_and_probes_and_width_rule_everywhere():
    (many,) = ivf_support_problems(IVFParams(pq_m=3, refine=4), "gpu", d=45, k=GPU_MAX_K // 4 + 1)
    assert "refine·k" in many
    assert ivf_support_problems(IVFParams(pq_m=3, refine=4), "gpu", d=45, k=GPU_MAX_K // 4) == []
    (probes,) = ivf_support_problems(IVFParams(nprobe=GPU_MAX_K + 1), "gpu")
    assert f"nprobe={GPU_MAX_K + 1}" in probes
    assert ivf_support_problems(IVFParams(nlist=100, nprobe=GPU_MAX_K + 1), "gpu") == []  # clipped to nlist
    for device in ("cpu", "gpu"):
        assert ivf_support_problems(IVFParams(pq_m=8), device, d=45) == [
            "pq_m=8 must divide the row width d=45"
        ]
    with pytest.raises(ValueError, match="not supported on gpu: .*hnsw.*; pq_bits=6"):
        check_ivf_supported(IVFParams(quantizer="hnsw", pq_m=8, pq_bits=6), "gpu", d=64)


def test_distributed_knn_refuses_before_training():
    x = clustered(n=500)
    with pytest.raises(ValueError, match=f"not supported on {faiss_device()}: pq_m=5 must divide"):
        distributed_knn(x, [(0, len(x))], 4, IVFParams(nlist=8, pq_m=5))


@pytest.mark.parametrize("pq_m", [0, 4])
def test_kmeans_with_an_assignment_index_override_is_faiss_own_training(pq_m):
    """The GPU path trains through ``clustering_index``/``pq.assign_index`` (GPU flat indexes); with
    CPU flat indexes in their place the trained index is byte-identical to Faiss's default training,
    so only the device (summation order) differs between the paths."""
    xn = clustered(n=3000, d=12, seed=7)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    params = IVFParams(nlist=30, pq_m=pq_m, seed=3)
    used: list[tuple[int, int]] = []

    def cpu_flat(width: int, metric: int):
        used.append((width, metric))
        return faiss.IndexFlatIP(width) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(width)

    plain = _faiss_train_serialised(xn, 30, params)
    override = _faiss_train_serialised(xn, 30, params, assign=cpu_flat)
    np.testing.assert_array_equal(plain, override)
    expected = [(12, faiss.METRIC_INNER_PRODUCT)] + ([(3, faiss.METRIC_L2)] if pq_m else [])
    assert used == expected


@pytest.mark.skipif(faiss_device() != "gpu", reason="needs faiss-gpu and a GPU")
def test_gpu_path_every_cell_probed_equals_exact_and_pq_rescored():
    x = clustered()
    ref_s, ref_i = exact_knn(x, 8)
    res = distributed_knn(x, [(0, len(x))], 8, IVFParams(nlist=40, nprobe=40), recall_queries=300)
    assert_same_topk(res.scores, res.indices, ref_s, ref_i)
    pq = distributed_knn(x, [(0, len(x))], 5, IVFParams(nlist=32, nprobe=32, pq_m=4), recall_queries=200)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(pq.scores, np.einsum("ud,ukd->uk", xn, xn[pq.indices]), atol=1e-5)
    assert pq.recall is not None and pq.recall > 0.8
