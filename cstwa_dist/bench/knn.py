"""``cstwa-dist bench knn``: exact vs distributed IVF kNN on the same vectors, written as JSON.

Why: the structure step's cost at scale is the kNN search (docs/structure-scaling.md). This measures
the two paths on the same rows so that a default (``nlist``, ``nprobe``) or a projection always comes
with its recall and its time:

* **exact**: the reference path as ``pretrain`` runs it today (one process, ``IndexFlatIP`` over all
  ``N`` rows). At large ``N`` only ``exact_queries`` sampled queries are searched and the search time
  is extrapolated linearly in the number of queries (exact search is ``queries × N × d`` work with no
  fixed cost worth the name); the JSON says so (``extrapolated``).
* **ivf**: :func:`~cstwa_dist.structure.ivf.distributed_knn` on ``ranks`` processes spawned by
  :func:`~cstwa_dist.distributed.spawn.spawn_ranks` (gloo, one rank = one process, the same code
  path as a multi-rank job; rank ``r`` only ever generates or reads its own row range), with
  recall@k against exact search on ``recall_queries`` sampled rows.

Vectors: a mixture of ``clusters`` isotropic Gaussians in ``dim`` dimensions (centres ``N(0, I)``,
points ``centre + spread·N(0, I)``), generated block-wise from a seed so that any row range is
reproducible without generating the rest; or real rows from a ``.npy`` file (memory-mapped, each rank
reads its range). Uniform random vectors are not used: they have no neighbourhood structure, and IVF
recall on them says nothing about representations (docs/platform-notes.md).

Per-rank memory: the rank's rows (``n_r·d·4`` B) plus what ``distributed_knn`` states; the exact
phase holds all ``N`` rows twice (the array and the flat index). Peak RSS (``ru_maxrss``) is reported
per process together with the RSS before the rows were made, since importing torch and Faiss alone
costs a few hundred MB.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cstwa_dist.bench.common import clustered_rows, cpu_seconds, peak_rss_mb
from cstwa_dist.distributed.spawn import set_threads, spawn_ranks

logger = logging.getLogger(__name__)

#: a phase's ranks get this long (start-up included) before they are stopped as hung
RANKS_TIMEOUT_S = 3600.0


def _parts_folder(path: str | Path) -> tuple[Path, str] | None:
    """``(graph_dir, side)`` when ``path`` is a ``<graph_dir>/<side>_representations/`` parts folder
    (what ``pretrain`` writes), None for a single ``.npy`` file."""
    p = Path(path)
    if not p.is_dir():
        return None
    side = p.name.removesuffix("_representations")
    if side == p.name:
        raise ValueError(
            f"{p}: a representations folder is named <side>_representations (e.g. user_representations)"
        )
    return p.parent, side


def _rows(spec: dict[str, Any], lo: int, hi: int) -> np.ndarray:
    if spec.get("representations"):
        parts = _parts_folder(spec["representations"])
        if parts is not None:  # only the parts overlapping [lo, hi) are read (structure/migrator.py)
            from cstwa_dist.structure.representations import representation_rows

            return np.ascontiguousarray(representation_rows(parts[0], parts[1], lo, hi), dtype=np.float32)
        return np.ascontiguousarray(
            np.load(spec["representations"], mmap_mode="r", allow_pickle=False)[lo:hi], dtype=np.float32
        )
    return clustered_rows(
        lo, hi, spec["dim"], clusters=spec["clusters"], spread=spec["spread"], seed=spec["seed"]
    )


# --- the two phases ---------------------------------------------------------------------------


def exact_phase(spec: dict[str, Any], queries: int, threads: int) -> dict[str, Any]:
    """Exact ``IndexFlatIP`` over all rows in this process (the current ``pretrain`` path)."""
    import faiss

    from cstwa_dist.structure.knn import l2_normalise

    set_threads(threads)
    n, k = spec["users"], spec["k"]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    xn = l2_normalise(_rows(spec, 0, n))
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    build_s = time.perf_counter() - t0
    q = n if queries <= 0 or queries >= n else queries
    qids = (
        np.arange(n) if q == n else np.sort(np.random.default_rng(spec["seed"]).choice(n, q, replace=False))
    )
    t0 = time.perf_counter()
    for a in range(0, q, 65536):
        index.search(xn[qids[a : a + 65536]], min(k, n))
    search_s = time.perf_counter() - t0
    cpu_s = cpu_seconds() - c0
    full = search_s * n / q
    return {
        "build_s": build_s,
        "queries_searched": int(q),
        "search_s_measured": search_s,
        "search_s": full,
        "total_s": build_s + full,
        "cpu_s_measured": cpu_s,
        "cpu_s": cpu_s * n / q,
        "extrapolated": q < n,
        "note": "search time of the sampled queries × N / queries" if q < n else "all rows searched",
        "data_s": gen_s,
        "threads": threads,
        "rss_before_data_mb": rss0,
        "peak_rss_mb": peak_rss_mb(),
    }


def _ivf_rank(rank: int, world: int, spec: dict[str, Any], ivf: dict[str, Any]) -> dict[str, Any]:
    """One rank of the IVF phase: its own rows only, then ``distributed_knn`` (module-level: spawned)."""
    from cstwa_dist.structure.ivf import IVFParams, distributed_knn, even_ranges, per_rank_bytes

    logging.basicConfig(level=logging.WARNING)
    n = spec["users"]
    ranges = even_ranges(n, world)
    lo, hi = ranges[rank]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    x = _rows(spec, lo, hi)
    data_s = time.perf_counter() - t0
    rss_data = peak_rss_mb()
    params = IVFParams(**ivf["params"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = distributed_knn(
        x,
        ranges,
        spec["k"],
        params,
        recall_queries=ivf["recall_queries"],
        block_rows=ivf["block_rows"],
        progress=lambda msg: logger.debug("%s", msg),
    )
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tm = res.timings
    return {
        "rank": rank,
        "rows": hi - lo,
        "nlist": res.nlist,
        "nprobe": res.nprobe,
        "recall": res.recall,
        "recall_queries": res.recall_queries,
        "train_s": tm.get("train_s", 0.0),
        "add_s": tm.get("add_s", 0.0),
        "broadcast_s": tm.get("broadcast_s", 0.0),
        "build_s": sum(tm.get(key, 0.0) for key in ("normalise_s", "train_s", "broadcast_s", "add_s")),
        "search_s": tm["search_s"],
        "recall_s": tm.get("recall_s", 0.0),
        "wall_s": wall,
        "cpu_s": cpu,
        "ring": res.ring.as_dict(),
        "data_s": data_s,
        "rss_before_data_mb": rss0,
        "rss_after_data_mb": rss_data,
        "peak_rss_mb": peak_rss_mb(),
        "allocated_mb_by_formula": {
            key: v / 2**20
            for key, v in per_rank_bytes(
                hi - lo,
                x.shape[1],
                res.k,
                nlist=res.nlist,
                nprobe=res.nprobe,
                block_rows=ivf["block_rows"],
                pq_m=params.pq_m,
            ).items()
        },
        "self_in_slot0": bool((res.indices[:, 0] == np.arange(lo, hi)).all()),
    }


def ivf_phase(spec: dict[str, Any], ivf: dict[str, Any], ranks: int, threads: int) -> dict[str, Any]:
    """IVF on ``ranks`` spawned gloo processes with ``threads // ranks`` threads each."""
    per = max(1, threads // ranks)
    t0 = time.perf_counter()
    per_rank = spawn_ranks(
        _ivf_rank, ranks, spec, ivf, threads=per, timeout_s=RANKS_TIMEOUT_S, backend="gloo"
    )
    launch_wall = time.perf_counter() - t0
    build = max(r["build_s"] for r in per_rank)
    search = max(r["search_s"] for r in per_rank)
    return {
        "ranks": ranks,
        "threads_per_rank": per,
        "nlist": per_rank[0]["nlist"],
        "nprobe": per_rank[0]["nprobe"],
        "params": ivf["params"],
        "block_rows": ivf["block_rows"],
        "recall_at_k": per_rank[0]["recall"],
        "recall_queries": per_rank[0]["recall_queries"],
        "build_s": build,
        "search_s": search,
        "total_s": build + search,
        "recall_s": max(r["recall_s"] for r in per_rank),
        "cpu_s_all_ranks": sum(r["cpu_s"] for r in per_rank),
        "wall_with_spawn_s": launch_wall,
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in per_rank),
        "per_rank": per_rank,
    }


def run_bench(
    spec: dict[str, Any],
    ivf: dict[str, Any],
    *,
    ranks: int,
    threads: int,
    exact_queries: int,
    skip_exact: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    """Both phases on the same rows; ``exact`` runs in a spawned 1-process group (clean peak RSS).

    With ``repeats > 1`` each phase runs that many times and the fastest run is reported (the others'
    totals are listed): on a shared machine the minimum is the least disturbed measurement.
    IVF settings this machine's index cannot run (``ivf.check_ivf_supported``: e.g. an HNSW
    quantizer or some PQ code sizes on a GPU) are refused before any rows are made.
    """
    from cstwa_dist.structure.ivf import IVFParams, check_ivf_supported, faiss_device

    check_ivf_supported(
        IVFParams(**ivf["params"]), faiss_device(), d=spec["dim"], k=min(spec["k"], spec["users"])
    )
    report: dict[str, Any] = {"data": dict(spec), "load_avg_1_5_15_at_start": list(os.getloadavg())}
    if spec.get("representations"):
        report["data"]["kind"] = f"real representations from {spec['representations']}"
    else:
        report["data"]["kind"] = (
            f"mixture of {spec['clusters']} isotropic Gaussians (centres N(0, I), spread {spec['spread']})"
        )
    if not skip_exact:
        logger.info("exact: N=%d, %s queries", spec["users"], exact_queries or "all")
        runs = [
            spawn_ranks(
                _exact_rank,
                1,
                spec,
                exact_queries,
                threads,
                threads=threads,
                timeout_s=RANKS_TIMEOUT_S,
                backend="gloo",
            )[0]
            for _ in range(repeats)
        ]
        report["exact"] = min(runs, key=lambda r: r["total_s"])
        report["exact"]["repeats_total_s"] = [r["total_s"] for r in runs]
        logger.info("exact: %.1f s (%s)", report["exact"]["total_s"], report["exact"]["note"])
    logger.info("ivf: N=%d on %d ranks", spec["users"], ranks)
    ivf_runs = [ivf_phase(spec, ivf, ranks, threads) for _ in range(repeats)]
    report["ivf"] = min(ivf_runs, key=lambda r: r["total_s"])
    report["ivf"]["repeats_total_s"] = [r["total_s"] for r in ivf_runs]
    logger.info(
        "ivf: build %.1f s, search %.1f s, recall@%d %.4f",
        report["ivf"]["build_s"],
        report["ivf"]["search_s"],
        spec["k"],
        report["ivf"]["recall_at_k"] or float("nan"),
    )
    report["load_avg_1_5_15_at_end"] = list(os.getloadavg())  # the machine is shared: context for times
    if "exact" in report:
        report["speedup_exact_over_ivf"] = report["exact"]["total_s"] / max(report["ivf"]["total_s"], 1e-9)
    return report


def _exact_rank(rank: int, world: int, spec: dict[str, Any], queries: int, threads: int) -> dict[str, Any]:
    return exact_phase(spec, queries, threads)


def representation_dims(path: str | Path) -> tuple[int, int]:
    """``(rows, width)`` of a ``.npy`` representation file, or of a ``pretrain`` parts folder
    (``<graph_dir>/<side>_representations/``, from its manifest), without reading the rows."""
    parts = _parts_folder(path)
    if parts is not None:
        from cstwa_dist.structure.representations import representation_shape

        return representation_shape(parts[0], parts[1])
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array [N, d], got shape {arr.shape}")
    return int(arr.shape[0]), int(arr.shape[1])
