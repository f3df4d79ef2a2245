"""``cstwa-dist bench propagate``: single-process vs row-sharded Structure Migrator propagation, as JSON.

Why: the Structure Migrator's per-epoch cost is ``L`` sparse products ``Â·U`` (docs/method.md §2,
Eq. 9). The single-process product needs all of ``Â`` and ``U`` on every rank; the sharded one
(:class:`~cstwa_dist.structure.sharded_graph.ShardedPropagator`) needs a rank's rows plus the
distinct foreign rows its graph rows reference, fetched every layer. This measures both on the same
graph so that a projection (docs/structure-scaling.md) always starts from a measured time, a measured
exchange volume and a measured memory:

* **single**: ``propagate.propagate`` with the full ``Â`` (``knn_to_adjacency`` →
  ``normalise_adjacency``) and the full ``U``, in this (the parent) process, with all ``threads``;
  skipped with a note above ``single_max_users`` rows.
* **sharded**: ``ranks`` gloo processes spawned by :func:`~cstwa_dist.distributed.spawn.spawn_ranks`
  (one rank = one process, the multi-rank code path), ``threads // ranks`` threads each; rank ``r``
  generates only its own kNN rows and table rows, builds its shard with
  :func:`~cstwa_dist.structure.sharded_graph.shard_from_knn` and propagates.
  A seeded sample of output rows is compared with the single-process output (``max_abs_diff``).

Graph: ``k`` neighbours per row, the row itself in slot 0 (score 1, as the kNN step writes it); each
of the other ``k − 1`` is drawn with probability ``locality`` uniformly within ``±NEAR_HALF_WIDTH``
ids of the row (wrapping), else uniformly from all ``N`` rows; repeats are redrawn. Scores are
``U(0, 1)``, sorted descending. ``locality`` models how far row ids follow the representation's
clusters: 0 = ids assigned independently of the representation (hashed ids: every non-self neighbour
is uniform, the worst case for the exchange), 1 = ids in cluster order (e.g. entities renumbered by
IVF cell). Default 0.5. Real kNN graphs also have skewed in-degrees (hubs); the generator does not
model that, which matters little here: the exchange volume depends on the *distinct* foreign
neighbours per rank, which hubs reduce. Generation is block-wise from the seed (65,536 rows a
block), so any row range is reproducible without generating the rest. Table rows:
``clustered_rows`` with one cluster (Gaussian), the same seed.

Per-rank memory: a rank's kNN lists ``n_r·k·12`` B while its shard is built, then what
:class:`~cstwa_dist.structure.sharded_graph.ShardedPropagator` states (its ``memory()`` is reported
per rank, with the peak RSS, ``ru_maxrss``, and the RSS before the rank generated anything).
The single phase holds the whole graph (COO triplets while building it) and ``U`` with ``L`` outputs.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from typing import Any

import numpy as np

from cstwa_dist.bench.common import GEN_BLOCK, clustered_rows, cpu_seconds, current_rss_mb, peak_rss_mb
from cstwa_dist.distributed.spawn import set_threads, spawn_ranks

logger = logging.getLogger(__name__)

#: "near" neighbours are drawn within this many ids either side of the row (wrapping at N)
NEAR_HALF_WIDTH = 2048
#: rows of the seeded sample compared between the single and the sharded outputs
CHECK_ROWS = 256
#: the sharded phase's ranks get this long (start-up included) before they are stopped as hung
RANKS_TIMEOUT_S = 3600.0


def knn_rows(
    lo: int, hi: int, *, n: int, k: int, locality: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[lo, hi)`` of the seeded random kNN lists ``(scores float32, ids int64)``, ``[hi − lo, k]``.

    Independent of other rows (block-wise generation; see the module doc for the distribution).
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got k={k}, N={n}")
    if not 0.0 <= locality <= 1.0:
        raise ValueError(f"locality must lie in [0, 1], got {locality}")
    scores = np.empty((hi - lo, k), dtype=np.float32)
    ids = np.empty((hi - lo, k), dtype=np.int64)
    for b in range(lo // GEN_BLOCK, math.ceil(hi / GEN_BLOCK)):
        b_lo, b_hi = b * GEN_BLOCK, min((b + 1) * GEN_BLOCK, n)
        rng = np.random.default_rng([seed, 2, b])
        m = b_hi - b_lo
        own = np.arange(b_lo, b_hi, dtype=np.int64)
        offset = rng.integers(1, NEAR_HALF_WIDTH + 1, size=(m, k - 1)) * rng.choice([-1, 1], size=(m, k - 1))
        near = (own[:, None] + offset) % n
        far = rng.integers(0, n, size=(m, k - 1))
        block = np.concatenate([own[:, None], np.where(rng.random((m, k - 1)) < locality, near, far)], axis=1)
        srt = np.sort(block, axis=1)
        for r in np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]:  # rare: redraw repeats
            seen: set[int] = set()
            for j in range(k):
                v = int(block[r, j])
                while v in seen:
                    v = int(rng.integers(0, n))
                seen.add(v)
                block[r, j] = v
        s = np.sort(rng.random((m, k - 1)).astype(np.float32), axis=1)[:, ::-1]
        block_scores = np.concatenate([np.ones((m, 1), np.float32), s], axis=1)
        a, z = max(lo, b_lo), min(hi, b_hi)
        ids[a - lo : z - lo] = block[a - b_lo : z - b_lo]
        scores[a - lo : z - lo] = block_scores[a - b_lo : z - b_lo]
    return scores, ids


def _table(spec: dict[str, Any], lo: int, hi: int) -> np.ndarray:
    return clustered_rows(lo, hi, spec["dim"], clusters=1, spread=1.0, seed=spec["seed"])


def check_ids(n: int, seed: int) -> np.ndarray:
    """Sorted global ids of the rows compared between the two phases (same on every rank)."""
    m = min(CHECK_ROWS, n)
    return np.sort(np.random.default_rng([seed, 3]).choice(n, size=m, replace=False)).astype(np.int64)


def _time_propagations(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _sharded_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: its own kNN rows and table rows only → shard → timed propagation (spawned)."""
    import torch
    import torch.distributed as dist

    from cstwa_dist.structure.ivf import even_ranges
    from cstwa_dist.structure.sharded_graph import ShardedPropagator, shard_from_knn

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    n, layers = spec["users"], spec["layers"]
    ranges = even_ranges(n, world)
    lo, hi = ranges[rank]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    scores, ids = knn_rows(lo, hi, n=n, k=spec["k"], locality=spec["locality"], seed=spec["seed"])
    x = torch.from_numpy(_table(spec, lo, hi))
    data_s = time.perf_counter() - t0
    rss_data = current_rss_mb()
    t0 = time.perf_counter()
    shard = shard_from_knn(scores, ids, ranges)
    del scores, ids
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prop = ShardedPropagator(shard, ranges)
    setup_s = time.perf_counter() - t0
    rss_setup, peak_setup = current_rss_mb(), peak_rss_mb()
    prop.propagate(x, 1)  # warm-up: builds the CSR copy, first-touch of the window
    sample = check_ids(n, spec["seed"])
    mine = sample[(sample >= lo) & (sample < hi)]
    runs = []
    for _ in range(spec["repeats"]):
        dist.barrier()
        c0 = cpu_seconds()
        out = prop.propagate(x, layers)
        runs.append({**prop.last_stats, "cpu_s": cpu_seconds() - c0})
        check_rows = out[torch.from_numpy(mine - lo)].numpy()
        del out  # not kept alive into the next call: the peak RSS is then the propagator's own
    best = min(runs, key=lambda r: r["seconds"])
    return {
        "rank": rank,
        "rows": hi - lo,
        "nnz": shard.nnz,
        "rows_requested": prop.fetcher.rows_requested,
        "rows_served": prop.fetcher.rows_served,
        "foreign_rows_per_own_row": prop.fetcher.rows_requested / max(1, hi - lo),
        "data_s": data_s,
        "build_s": build_s,
        "setup_s": setup_s,
        "seconds": best["seconds"],
        "seconds_per_layer": best["seconds_per_layer"],
        "exchange_s_per_layer": best["exchange_s"] / layers,
        "compute_s_per_layer": (best["seconds"] - best["exchange_s"]) / layers,
        "bytes_sent_per_layer": best["bytes_sent"] // layers,
        "bytes_received_per_layer": best["bytes_received"] // layers,
        "cpu_s": best["cpu_s"],
        "repeats_seconds": [r["seconds"] for r in runs],
        "memory_bytes": prop.memory(),
        "rss_before_data_mb": rss0,
        "rss_now_after_data_mb": rss_data,
        "rss_now_after_setup_mb": rss_setup,
        "peak_rss_after_setup_mb": peak_setup,
        "rss_now_at_end_mb": current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "check_ids": mine,
        "check_rows": check_rows,
    }


def sharded_phase(spec: dict[str, Any], ranks: int, threads: int) -> dict[str, Any]:
    """The sharded propagation on ``ranks`` spawned gloo ranks, ``threads // ranks`` threads each."""
    per = max(1, threads // ranks)
    t0 = time.perf_counter()
    per_rank = spawn_ranks(_sharded_rank, ranks, spec, threads=per, timeout_s=RANKS_TIMEOUT_S, backend="gloo")
    wall = time.perf_counter() - t0
    spl = max(r["seconds_per_layer"] for r in per_rank)  # the slowest rank sets the pace
    return {
        "ranks": ranks,
        "threads_per_rank": per,
        "seconds_per_layer": spl,
        "rows_per_s": spec["users"] / spl,
        "exchange_s_per_layer_max": max(r["exchange_s_per_layer"] for r in per_rank),
        "bytes_moved_per_layer": sum(r["bytes_received_per_layer"] for r in per_rank),
        "build_s_max": max(r["build_s"] for r in per_rank),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in per_rank),
        "memory_bytes_total_max": max(r["memory_bytes"]["total"] for r in per_rank),
        "wall_with_spawn_s": wall,
        "per_rank": per_rank,
    }


def single_phase(spec: dict[str, Any], threads: int) -> tuple[dict[str, Any], np.ndarray]:
    """``propagate.propagate`` with the full ``Â`` and ``U`` in this process; returns the report and
    the output rows at :func:`check_ids`."""
    import torch

    from cstwa_dist.structure.graph import knn_to_adjacency, normalise_adjacency
    from cstwa_dist.structure.propagate import propagate

    set_threads(threads)
    n, layers = spec["users"], spec["layers"]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    scores, ids = knn_rows(0, n, n=n, k=spec["k"], locality=spec["locality"], seed=spec["seed"])
    u = torch.from_numpy(_table(spec, 0, n))
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    a_hat = normalise_adjacency(knn_to_adjacency(scores, ids, n))
    del scores, ids
    build_s = time.perf_counter() - t0
    propagate(a_hat, u, 1)  # warm-up
    c0 = cpu_seconds()
    times = _time_propagations(lambda: propagate(a_hat, u, layers), spec["repeats"])
    cpu_s = (cpu_seconds() - c0) / len(times)
    rows = propagate(a_hat, u, layers)[torch.from_numpy(check_ids(n, spec["seed"]))].numpy()
    best = min(times)
    graph_bytes = sum(
        t.numel() * t.element_size() for t in (a_hat.crow_indices(), a_hat.col_indices(), a_hat.values())
    )
    report = {
        "threads": threads,
        "nnz": int(a_hat.values().numel()),
        "data_s": data_s,
        "build_s": build_s,
        "seconds": best,
        "seconds_per_layer": best / layers,
        "rows_per_s": n / (best / layers),
        "cpu_s": cpu_s,
        "repeats_seconds": times,
        "memory_bytes": {
            "graph": graph_bytes,
            "table": u.numel() * 4,
            "outputs": min(layers, 2) * u.numel() * 4,
        },
        "rss_before_data_mb": rss0,
        "peak_rss_mb": peak_rss_mb(),
    }
    return report, rows


def run_bench(spec: dict[str, Any], *, ranks: int, threads: int, single_max_users: int) -> dict[str, Any]:
    """Sharded phase first (spawned), then the single phase in this process when ``N`` allows."""
    report: dict[str, Any] = {
        "data": {
            **spec,
            "kind": f"random kNN graph, self in slot 0, locality {spec['locality']} "
            f"(±{NEAR_HALF_WIDTH} ids), scores U(0, 1); table rows N(0, 1)-ish Gaussian",
        },
        "load_avg_1_5_15_at_start": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    logger.info("sharded: N=%d on %d rank(s), %d layer(s)", spec["users"], ranks, spec["layers"])
    report["sharded"] = sharded_phase(spec, ranks, threads)
    if spec["users"] <= single_max_users:
        logger.info("single: N=%d in this process, %d thread(s)", spec["users"], threads)
        report["single"], single_rows = single_phase(spec, threads)
        sharded_rows = np.concatenate([r.pop("check_rows") for r in report["sharded"]["per_rank"]])
        report["max_abs_diff_sharded_vs_single"] = float(np.abs(sharded_rows - single_rows).max(initial=0.0))
        report["ratio_sharded_over_single_seconds_per_layer"] = (
            report["sharded"]["seconds_per_layer"] / report["single"]["seconds_per_layer"]
        )
    else:
        report["single"] = {
            "skipped": f"N={spec['users']} > single_max_users={single_max_users}: the full graph and table "
            "are not built in one process"
        }
        for r in report["sharded"]["per_rank"]:
            r.pop("check_rows")
    for r in report["sharded"]["per_rank"]:
        r["check_ids"] = int(len(r["check_ids"]))
    report["load_avg_1_5_15_at_end"] = list(os.getloadavg())
    return report
