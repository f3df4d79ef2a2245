"""Distributed cosine kNN over row-sharded representations: Faiss IVF per shard, queries on a ring.

Why: a graph of 30M users cannot be mined on one rank. Exact search costs ``N²·d`` multiply-adds, and
collecting the representations in one place would put ``N·d`` floats on it. So the rows stay where
they were read out: ``migrator.mine_structure`` reads out, on every rank, the representations of its
own row block only (``readout.side_representations``) and passes them here as ``x_local``, rank ``r``
holding rows ``[lo_r, hi_r)`` (the ranges are an input; uneven and empty ones are allowed). Each rank
gets back the kNN lists of its own rows, and ``sharded_graph.shard_from_knn`` turns them into its
rows of ``Â`` on the same rank: neither the rows (``N·d``) nor the lists (``N·k``) are gathered
anywhere.

Algorithm (docs/structure-scaling.md):

1. **Quantizer, once.** A sample of ``nlist · train_per_list`` rows is drawn by *global* row id
   (seeded, so it does not depend on the number of ranks), each rank contributes the sampled rows it
   holds, rank 0 gathers them (``O(nlist·39·d)`` floats), trains the empty IVF index (k-means
   centroids; PQ codebooks with ``pq_m``) and broadcasts it serialised. Every rank then adds its own
   rows to its copy: all shards share one quantizer, so list ``j`` means the same cell everywhere.
   Rank 0's training is the only step where others wait; it is bounded by the sample size (9–19 s
   at 1M rows on the 2-core development machine, ``train_s``/``broadcast_s`` in the timings; 3–10
   min projected at 30M on a CPU rank, about a second on a GPU) and done once per graph. On the GPU
   path k-means (and PQ's codebook k-means) assign with GPU flat indexes, and each rank clones the
   trained *empty* index to its GPU and adds its rows there, in chunks with a progress line each.
2. **Ring of query blocks.** Every rank's rows are also its queries. In round ``(c, t)`` rank ``r``
   sends its query chunk ``c`` (with its coarse assignment: the ``nprobe`` nearest cells, computed
   once by the owner) to rank ``r − t`` and receives chunk ``c`` of rank ``r + t``, searches it against
   its own shard (``search_preassigned``: no rank repeats the coarse search), returns the per-shard
   top-``k`` ``(scores, global ids)`` to its owner and merges the top-``k`` it gets back for its own
   chunk. After ``W`` rounds every query has met every shard. Every rank searches one block per round,
   so work is as even as the row ranges are; no rank computes while others wait in a collective.
3. **Same semantics as** :func:`~cstwa_dist.structure.knn.exact_knn`: cosine = inner product of
   L2-normalised rows (a zero row stays zero), scores are *not* clamped here (Eq. 4's clamp is
   ``knn_to_adjacency``'s job), ``k`` is clipped to ``N``, and the query's own id is forced into slot
   0 with :func:`~cstwa_dist.structure.knn.ensure_self_first` (docs/method.md §1.4 Decision; applied
   to the lists in place, ``block_rows`` rows at a time), so graphs
   built from either path are comparable. With PQ the candidates are re-scored with exact inner
   products on the owning rank, so graph weights are exact cosines either way.
4. **Recall@k** against exact search on a small seeded sample of queries (default 1,000; drawn by
   a seeded hash of the id, :func:`recall_sample_ids`, so the same at any W and ``O(sample)`` in
   memory), searched through the same ring with a brute-force flat search per shard, is returned
   with the result. The query itself is excluded from both lists (both paths force it into slot 0,
   so it would be a free hit): recall = (exact non-self neighbours found by the approximate list) /
   (exact non-self neighbours), i.e. over ``k − 1`` neighbours a query.

``IVFParams(exact=True)`` runs the exact search through the same ring (brute force per shard): the
``nprobe = nlist`` limit, used as the reference in tests and for recall.

**Per-rank memory** is :func:`per_rank_memory`'s (the one source: ``bench knn`` and the dry run
both ask it): the normalised shard, its index, one foreign query block with its results, the running
top-``k`` of the own rows, and on rank 0 the quantizer's training sample (:func:`knn_memory`).
Nothing is of size ``N``; the caller's raw ``x_local`` is not counted (it is normalised into a
float32 copy in ``block_rows`` chunks).

Faiss ships no type hints; the small functions prefixed ``_faiss_`` add them at the edge.
On a machine where ``faiss.get_num_gpus() > 0`` (:func:`faiss_device`) k-means, the shard index and
the flat search run on the rank's GPU (``faiss-gpu``); otherwise on CPU, unchanged. Every GPU symbol
is looked up only on that path (``_gpu_symbol``), so the module imports and runs with faiss-cpu.
Settings the GPU index lacks (HNSW quantizer, some PQ code sizes) are refused before any work by
:func:`check_ivf_supported`. The GPU path has not been executed on the development machine (no GPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist

from cstwa_dist.distributed.exchange import all_reduce_ints
from cstwa_dist.distributed.exchange import world as _world
from cstwa_dist.structure.faiss_memory import FAISS_GPU_TEMP_BYTES
from cstwa_dist.structure.knn import ensure_self_first, l2_normalise
from cstwa_dist.structure.memory import MemoryItem

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_ROWS",
    "GPU_MAX_K",
    "GPU_PQ_CODE_BYTES",
    "GPU_PQ_MAX_M_FLOAT32",
    "IVFParams",
    "KnnResult",
    "RingStats",
    "auto_nlist",
    "check_ivf_supported",
    "distributed_knn",
    "even_ranges",
    "faiss_device",
    "ivf_support_problems",
    "knn_memory",
    "merge_topk",
    "per_rank_bytes",
    "per_rank_memory",
    "quantizer_sample_rows",
    "recall_counts",
    "recall_sample_ids",
    "resolve_cells",
    "ring_madds",
]

#: Faiss's score for "no result" with an inner-product metric (finite, so graphs accept it).
MISSING_SCORE = np.float32(-np.finfo(np.float32).max)

#: Default rows of a query block on the ring (``distributed_knn(block_rows=...)``): it bounds the one
#: foreign block a rank holds, its results, and the merge and self-first temporaries.
BLOCK_ROWS = 65536


@dataclass(frozen=True)
class IVFParams:
    """How each shard is indexed and searched.

    ``nlist = 0`` picks :func:`auto_nlist` from the total row count. ``nprobe`` is clipped to
    ``nlist`` (``nprobe = nlist`` searches every cell: exact up to ties). ``pq_m > 0`` stores
    ``pq_m``-byte PQ codes instead of the float rows (memory ``n·(pq_m + 8)``, needs ``d % pq_m == 0``)
    and re-scores ``refine·k`` candidates exactly. Defaults are the measured ones
    (docs/structure-scaling.md).

    ``gpu_cpu_quantizer`` matters only where the index goes to a GPU: Faiss's GPU IVF indexes clone
    a flat coarse quantizer only, so an HNSW one is refused there (:func:`check_ivf_supported`)
    unless this asks to keep it on the host (``GpuClonerOptions.allowCpuCoarseQuantizer``; every
    search then runs its coarse step on the CPU).
    """

    nlist: int = 0
    nprobe: int = 16
    pq_m: int = 0
    pq_bits: int = 8
    refine: int = 4
    train_per_list: int = 39
    kmeans_iters: int = 10
    quantizer: str = "flat"
    hnsw_m: int = 32
    exact: bool = False
    seed: int = 0
    gpu_cpu_quantizer: bool = False

    def __post_init__(self) -> None:
        if self.quantizer not in ("flat", "hnsw"):
            raise ValueError(f"quantizer must be flat or hnsw, got {self.quantizer!r}")
        for name in ("nlist", "pq_m"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("nprobe", "pq_bits", "refine", "train_per_list", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RingStats:
    """What the ring did on this rank; the ``max_*`` fields bound what it allocated at once."""

    rounds: int = 0
    max_foreign_rows: int = 0  # rows of the largest foreign query block received
    max_foreign_blocks_live: int = 0  # foreign query blocks alive at the same time (1 by design)
    max_result_rows: int = 0  # rows of the largest result block sent or received
    search_s: float = 0.0
    comm_s: float = 0.0
    merge_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    _live: int = field(default=0, repr=False)

    def hold(self, rows: int) -> None:
        self._live += 1
        self.max_foreign_blocks_live = max(self.max_foreign_blocks_live, self._live)
        self.max_foreign_rows = max(self.max_foreign_rows, rows)

    def release(self) -> None:
        self._live -= 1

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class KnnResult:
    """This rank's rows ``[lo, hi)`` of the kNN lists, plus recall and timings.

    ``scores``/``indices`` are ``[hi − lo, k]`` (global ids, self in slot 0, descending up to the
    self rule), as :func:`~cstwa_dist.structure.knn.exact_knn` returns for those rows. ``recall`` is
    recall@k against exact search on ``recall_queries`` sampled rows (the same on every rank; ``None``
    when no sample was asked for, or with ``k = 1``), the query itself excluded from both lists:
    the fraction of each sampled query's ``k − 1`` exact non-self neighbours that its list holds.
    """

    lo: int
    hi: int
    n_total: int
    k: int
    scores: np.ndarray
    indices: np.ndarray
    recall: float | None
    recall_queries: int
    nlist: int
    nprobe: int
    timings: dict[str, float]
    ring: RingStats
    recall_ring: RingStats | None = None


# --- ranges, sampling, recall ------------------------------------------------------------------


def even_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous row ranges covering ``[0, n)``, sizes differing by at most one."""
    if n < 0 or world < 1:
        raise ValueError(f"need n >= 0 and world >= 1, got n={n}, world={world}")
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]


def _check_ranges(ranges: Sequence[tuple[int, int]], world: int) -> int:
    if len(ranges) != world:
        raise ValueError(f"need one row range per rank: {len(ranges)} ranges for {world} ranks")
    pos = 0
    for r, (lo, hi) in enumerate(ranges):
        if lo != pos or hi < lo:
            raise ValueError(f"ranges must be contiguous from 0 in rank order; rank {r} has [{lo}, {hi})")
        pos = hi
    return pos


def per_rank_memory(
    rows: int,
    d: int,
    k: int,
    *,
    nlist: int,
    nprobe: int,
    block_rows: int = BLOCK_ROWS,
    pq_m: int = 0,
) -> list[MemoryItem]:
    """What :func:`distributed_knn` allocates on a rank holding ``rows`` rows of width ``d`` (``w`` in
    the formulas), item by item; ``nlist = 0`` means the exact (flat) search. Rank 0's training sample is
    :func:`knn_memory`'s. With ``n_r = rows`` and ``b = min(block_rows, n_r)``, the largest query
    block (``_ring_search`` cuts every rank's queries into chunks of at most ``block_rows``):

    * ``shard``: the L2-normalised copy of the rows the rank searches against, ``n_r·w·4``;
    * ``index``: the shard's IVF lists, float rows ``n_r·(w·4 + 8)`` (IVF-PQ: ``pq_m``-byte codes,
      ``n_r·(pq_m + 8)``), plus the shared centroids ``nlist·w·4``; none for the exact search. On
      the GPU path (:func:`faiss_device`) this item is in the GPU's memory, the host holds none of it;
    * ``foreign_block``: the one foreign query block a rank holds at a time (``RingStats`` checks
      there is never a second) with its coarse assignment, ``b·(w·4 + nprobe·12)`` (exact: ``b·w·4``);
    * ``result_blocks``: that block's per-shard top-``k`` and the top-``k`` returned for the own
      chunk, ``2·b·k·12`` (IVF-PQ re-scores ``refine·k`` candidates per query first: a few more
      ``b``-sized temporaries, not counted);
    * ``own_topk``: the running top-``k`` of the own rows, ``n_r·k·12`` (``best_s``/``best_i`` of
      ``_ring_search``), plus ``b·k·52`` for one block's merge (``merge_topk``: the ``2k``-wide
      candidates, their sort key and order, the merged rows) or self-first pass
      (``ensure_self_first``'s copies, key and order, about ``b·k·42``).

    The own lists are counted once, not twice: ``distributed_knn`` applies the self-first rule to the
    running top-``k`` in place, ``block_rows`` rows at a time, and returns those arrays, so no second
    list of the rank's size ever exists (a single ``ensure_self_first`` call on all rows would add
    ``n_r·k·42`` B of copies and result, measured). The sum is an upper bound of the peak: the search
    items are freed before the self-first pass.
    """
    block = min(block_rows, rows)
    exact = nlist == 0
    items = [MemoryItem("shard", "normalised copy", rows * d * 4, "n_r·w·4")]
    if not exact:
        per_row, formula = (pq_m, "n_r·(pq_m+8) + nlist·w·4") if pq_m else (d * 4, "n_r·(w·4+8) + nlist·w·4")
        items.append(
            MemoryItem(
                "index",
                "IVF-PQ index" if pq_m else "IVF-flat index",
                rows * (per_row + 8) + nlist * d * 4,
                formula,
                detail="+ centroids",
            )
        )
    items += [
        MemoryItem(
            "foreign_block",
            "foreign query block",
            block * (d * 4 + (0 if exact else nprobe * 12)),
            "b·w·4" if exact else "b·(w·4 + nprobe·12)",
        ),
        MemoryItem(
            "result_blocks", "result blocks", 2 * block * k * 12, "2·b·k·12", detail="foreign + returned"
        ),
        MemoryItem(
            "own_topk",
            "own running top-k",
            rows * k * 12 + block * k * 52,
            "n_r·k·12 + b·k·52",
            detail="+ one block's merge",
        ),
    ]
    return items


def per_rank_bytes(
    rows: int, d: int, k: int, *, nlist: int, nprobe: int, block_rows: int = BLOCK_ROWS, pq_m: int = 0
) -> dict[str, int]:
    """:func:`per_rank_memory` as ``{key: bytes}`` plus ``total`` (``index`` is 0 for the exact
    search), the form ``bench knn`` records next to the measured peak."""
    items = per_rank_memory(rows, d, k, nlist=nlist, nprobe=nprobe, block_rows=block_rows, pq_m=pq_m)
    out = {"shard": 0, "index": 0} | {i.key: i.bytes for i in items}
    out["total"] = sum(i.bytes for i in items)
    return out


def resolve_cells(params: IVFParams, n_total: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` as :func:`distributed_knn` runs them for ``n_total`` rows: ``(0, 0)`` for
    the exact search, else ``params.nlist`` (0: :func:`auto_nlist`) capped at ``n_total`` and
    ``params.nprobe`` capped at ``nlist``."""
    if params.exact:
        return 0, 0
    nlist = min(params.nlist or auto_nlist(n_total), n_total)
    return nlist, min(params.nprobe, nlist)


#: Bytes per PQ code (``pq_m`` sub-quantizers of 8 bits) that Faiss's GPU IVF-PQ implements in its
#: classic list layout, the one ``index_cpu_to_gpu`` builds with cuVS switched off (as here).
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)

#: Largest ``pq_m`` whose float32 distance lookup table (``pq_m·256·4`` B) fits the 48 KiB of shared
#: memory per block GPU IVF-PQ keeps it in. 56, 64 and 96 need float16 tables, which would change the
#: approximate scores that pick the candidates, so they are refused rather than switched on.
GPU_PQ_MAX_M_FLOAT32 = 48

#: Largest ``k`` (and ``nprobe``) Faiss's GPU k-selection returns (2048 in CUDA builds since Faiss
#: 1.7; 1024 before).
GPU_MAX_K = 2048


def faiss_device() -> str:
    """``"gpu"`` where :func:`distributed_knn` builds its index on the rank's GPU (a Faiss with GPU
    support that sees a GPU), else ``"cpu"``: the ``device`` argument of :func:`check_ivf_supported`."""
    return "gpu" if _faiss_num_gpus() > 0 else "cpu"


def ivf_support_problems(
    params: IVFParams, device: str, *, d: int | None = None, k: int | None = None
) -> list[str]:
    """What of ``params`` the index on ``device`` (``"cpu"`` or ``"gpu"``) cannot do, one sentence
    each (empty: supported). A pure function of its arguments, so a config can be refused before any
    rank reads, trains or waits, and so the rules are testable without a GPU. ``d`` (row width) and
    ``k`` (neighbours) add the checks that need them when known.

    GPU rules (Faiss's GPU IVF, classic implementation): the coarse quantizer is cloned to the GPU
    only when flat, so ``quantizer="hnsw"`` needs ``gpu_cpu_quantizer``; IVF-PQ needs 8-bit codes
    and ``pq_m`` in :data:`GPU_PQ_CODE_BYTES`, at most :data:`GPU_PQ_MAX_M_FLOAT32`; ``nprobe`` and
    the candidates per query (``k``, or ``refine·k`` with PQ) at most :data:`GPU_MAX_K`. Any width
    per sub-quantizer ``d / pq_m`` is accepted: current Faiss falls back to a matrix-multiply kernel
    for widths without a specialised one. On both devices ``pq_m`` must divide ``d``.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    problems: list[str] = []
    if d is not None and params.pq_m and not params.exact and d % params.pq_m:
        problems.append(f"pq_m={params.pq_m} must divide the row width d={d}")
    if device == "cpu":
        return problems
    if k is not None and k * (params.refine if params.pq_m and not params.exact else 1) > GPU_MAX_K:
        per = f"refine·k = {params.refine}·{k}" if params.pq_m and not params.exact else f"k={k}"
        problems.append(f"GPU search returns at most {GPU_MAX_K} candidates per query; {per} asks more")
    if params.exact:
        return problems
    if params.quantizer == "hnsw" and not params.gpu_cpu_quantizer:
        problems.append(
            "quantizer='hnsw' is not available on the GPU: Faiss's GPU IVF clones only a flat coarse "
            "quantizer; use quantizer='flat', or set gpu_cpu_quantizer=True to keep the HNSW "
            "quantizer on the host (GpuClonerOptions.allowCpuCoarseQuantizer)"
        )
    probe = min(params.nprobe, params.nlist) if params.nlist else params.nprobe
    if probe > GPU_MAX_K:
        problems.append(f"nprobe={probe} exceeds the GPU IVF limit of {GPU_MAX_K}")
    if params.pq_m:
        if params.pq_bits != 8:
            problems.append(f"pq_bits={params.pq_bits}: GPU IVF-PQ stores 8-bit codes only (pq_bits=8)")
        if params.pq_m not in GPU_PQ_CODE_BYTES:
            problems.append(
                f"pq_m={params.pq_m} bytes per code is not implemented by GPU IVF-PQ; use one of "
                f"{', '.join(str(m) for m in GPU_PQ_CODE_BYTES if m <= GPU_PQ_MAX_M_FLOAT32)}"
            )
        elif params.pq_m > GPU_PQ_MAX_M_FLOAT32:
            problems.append(
                f"pq_m={params.pq_m} needs float16 lookup tables on the GPU (a float32 table of "
                f"{params.pq_m}·256·4 B exceeds 48 KiB of shared memory), which this project does "
                f"not enable; use pq_m <= {GPU_PQ_MAX_M_FLOAT32}"
            )
    return problems


def check_ivf_supported(
    params: IVFParams, device: str, *, d: int | None = None, k: int | None = None
) -> None:
    """Raise ``ValueError`` listing every :func:`ivf_support_problems` of ``params`` on ``device``."""
    problems = ivf_support_problems(params, device, d=d, k=k)
    if problems:
        raise ValueError(f"IVF settings not supported on {device}: " + "; ".join(problems))


def quantizer_sample_rows(n_total: int, nlist: int, train_per_list: int) -> int:
    """Rows of the quantizer's training sample: ``nlist·train_per_list``, at most ``n_total``; 0 for
    the exact search (``nlist = 0``)."""
    return min(nlist * train_per_list, n_total) if nlist else 0


def knn_memory(
    params: IVFParams,
    n_total: int,
    rows: int,
    d: int,
    k: int,
    *,
    block_rows: int = BLOCK_ROWS,
    rank0: bool = False,
) -> list[MemoryItem]:
    """Per-rank memory of ``distributed_knn(x_local, ranges, k, params, block_rows=block_rows)`` on a
    rank holding ``rows`` of ``n_total`` rows: :func:`per_rank_memory` with the settings it resolves
    (:func:`resolve_cells`, ``k`` clipped to ``n_total``), and with ``rank0`` the quantizer's
    training sample of ``s`` = :func:`quantizer_sample_rows` rows (``min(nlist·train_per_list, N)``).
    Gathering it
    (``_gather_rows_to_rank0``), rank 0 holds its own sampled rows and their padded copy (about
    ``s·n_r/N`` rows each: the sample is uniform by global id), every rank's part (``s`` rows) and
    their concatenation (``s``) at once: ``(2·s + 2·s·n_r/N)·w·4``. Faiss's k-means afterwards needs
    the sample and ``12·s`` B of assignments, less. On one rank nothing is gathered: the sample's
    copy, ``s·w·4``.
    """
    nlist, nprobe = resolve_cells(params, n_total)
    items = per_rank_memory(
        rows, d, min(k, n_total), nlist=nlist, nprobe=nprobe, block_rows=block_rows, pq_m=params.pq_m
    )
    sample = quantizer_sample_rows(n_total, nlist, params.train_per_list)
    if rank0 and sample:
        if rows >= n_total:
            held, formula = sample, "s·w·4"
        else:
            held, formula = 2 * sample + 2 * -(-sample * rows // n_total), "(2·s + 2·s·n_r/N)·w·4"
        items.append(
            MemoryItem(
                "train_sample",
                "IVF training sample",
                held * d * 4,
                formula,
                detail=f"nlist={nlist:,}: s = {sample:,} rows",
                rank0_only=True,
            )
        )
    return items


def ring_madds(n_total: int, rows: int, d: int, *, nlist: int, nprobe: int) -> int:
    """Multiply-adds of the ring search on a rank holding ``rows`` rows: every rank searches all
    ``N`` queries against its shard. Exact (``nlist = 0``): ``N·n_r·w``. IVF visits ``nprobe/nlist``
    of the shard per query, plus the coarse assignment of its own rows against the centroids:
    ``N·n_r·w·nprobe/nlist + n_r·nlist·w``."""
    if nlist == 0:
        return n_total * rows * d
    return n_total * rows * d * nprobe // nlist + rows * nlist * d


def auto_nlist(n: int) -> int:
    """Default number of IVF cells for ``n`` rows: ``4·√n`` (Faiss's guideline; measured in
    docs/structure-scaling.md), at most ``n // 39`` so that k-means has 39 points per centroid."""
    if n <= 0:
        return 1
    return int(max(1, min(round(4.0 * math.sqrt(n)), n // 39)))


#: Ids hashed per step by :func:`recall_sample_ids` (bounds its temporaries: about 40 B a row).
_SAMPLE_CHUNK = 1 << 18

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(ids: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of ``ids + seed·φ`` (uint64, wrapping): a bijection of ``ids`` for a fixed seed, so
    distinct ids never tie."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed % (1 << 64)) * _GOLDEN
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def recall_sample_ids(n: int, queries: int, seed: int, *, chunk: int = _SAMPLE_CHUNK) -> np.ndarray:
    """Sorted global ids of a seeded sample of ``min(queries, n)`` of the ids ``0..n-1``.

    The sample is the ``m`` ids with the smallest seeded hash (:func:`_splitmix64`), so it is a
    function of ``(n, queries, seed)`` alone: identical on every rank and at every world size. The
    ids are hashed ``chunk`` at a time and only the running ``m`` smallest are kept, so memory is
    ``O(m + chunk)`` (never an ``arange(n)`` or a permutation of ``n``), time ``O(n)`` hashes (about
    a second at 30M rows). Used for the recall queries and for the quantizer's training rows.
    """
    m = min(max(0, int(queries)), int(n))
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    keep_h = np.zeros(0, dtype=np.uint64)
    keep_i = np.zeros(0, dtype=np.int64)
    bound: np.uint64 | None = None  # the m-th smallest hash so far, once m are kept
    for a in range(0, n, max(1, chunk)):
        ids = np.arange(a, min(n, a + max(1, chunk)), dtype=np.int64)
        h = _splitmix64(ids, seed)
        if bound is not None:
            below = h < bound
            ids, h = ids[below], h[below]
        keep_h = np.concatenate([keep_h, h])
        keep_i = np.concatenate([keep_i, ids])
        if keep_h.size > m:
            part = np.argpartition(keep_h, m - 1)[:m]
            keep_h, keep_i = keep_h[part], keep_i[part]
        if keep_h.size == m:
            bound = keep_h.max()
    return np.sort(keep_i)


def recall_counts(
    approx: np.ndarray, exact: np.ndarray, query_ids: np.ndarray | None = None
) -> tuple[int, int]:
    """``(found, total)``: exact neighbours also in the approximate list, and exact neighbours.

    Counts (not a ratio) so that ranks can sum them; rows compared as sets, ``-1`` never matches.
    With ``query_ids`` (row ``u``'s query id), the query itself is dropped from both lists: it is
    always its own nearest neighbour (forced into slot 0 on both paths), and counting it would add
    a free hit to every row.
    """
    approx = np.asarray(approx, dtype=np.int64)
    exact = np.asarray(exact, dtype=np.int64)
    if approx.shape[0] != exact.shape[0] or approx.ndim != 2 or exact.ndim != 2:
        raise ValueError(f"need 2-D arrays with equal row counts, got {approx.shape} and {exact.shape}")
    valid = exact >= 0
    if query_ids is not None:
        q = np.asarray(query_ids, dtype=np.int64).reshape(-1, 1)
        if q.shape[0] != exact.shape[0]:
            raise ValueError(f"need one query id per row, got {q.shape[0]} for {exact.shape[0]} rows")
        valid &= exact != q
    hit = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & valid
    return int(hit.sum()), int(valid.sum())


def merge_topk(
    s_a: np.ndarray, i_a: np.ndarray, s_b: np.ndarray, i_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of the union of two candidate lists per row (descending, stable: ``a`` wins ties).

    The shards are disjoint, so an id never appears in both lists (missing entries, id ``-1``, sort
    last with :data:`MISSING_SCORE`).
    """
    s = np.concatenate([s_a, s_b], axis=1)
    i = np.concatenate([i_a, i_b], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _pad_topk(s: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a search result to exactly ``k`` columns, missing entries as ``(MISSING_SCORE, -1)``."""
    m = s.shape[0]
    out_s = np.full((m, k), MISSING_SCORE, dtype=np.float32)
    out_i = np.full((m, k), -1, dtype=np.int64)
    w = min(k, s.shape[1])
    out_s[:, :w], out_i[:, :w] = s[:, :w], i[:, :w]
    out_s[out_i < 0] = MISSING_SCORE
    return out_s, out_i


# --- typed Faiss edge -------------------------------------------------------------------------


def _faiss_num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _faiss_new_ivf(d: int, nlist: int, params: IVFParams) -> Any:
    if params.quantizer == "hnsw":  # coarse search in O(log nlist): lets nlist grow with N
        quantizer = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efSearch = max(64, 2 * params.nprobe)
    else:
        quantizer = faiss.IndexFlatIP(d)
    if params.pq_m:
        if d % params.pq_m:
            raise ValueError(f"pq_m={params.pq_m} must divide the width d={d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, params.pq_m, params.pq_bits, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = params.kmeans_iters
    index.cp.seed = params.seed
    index.cp.spherical = True  # unit-norm rows: centroids on the sphere, cells by cosine
    index.cp.max_points_per_centroid = params.train_per_list
    return index


#: An index k-means assigns points with, built for a width and a metric (``_faiss_train_serialised``).
AssignIndexFactory = Callable[[int, int], Any]


def _faiss_train_serialised(
    sample: np.ndarray, nlist: int, params: IVFParams, *, assign: AssignIndexFactory | None = None
) -> np.ndarray:
    """Train an empty IVF index on ``sample`` and return it serialised (uint8), ready to broadcast.

    ``assign(width, metric)``, when given, supplies the index k-means searches with: the coarse
    k-means' (``IndexIVF.clustering_index``, inner product) and, with PQ, the sub-quantizers'
    (``ProductQuantizer.assign_index``, L2, width ``d / pq_m``). Everything else (sample, seed,
    iterations, spherical centroids, sub-sampling) is Faiss's own training, unchanged. The GPU path
    passes GPU flat indexes (:func:`_gpu_flat_index`), which moves k-means' multiply-adds to the GPU;
    with CPU flat indexes the result is byte-identical to ``assign=None`` (tested), so the GPU
    training differs from the CPU one only by floating-point summation order. The override indexes
    are detached before serialising: they belong to this rank's device, not to the index.
    """
    index = _faiss_new_ivf(sample.shape[1], nlist, params)
    overrides: list[Any] = []  # Faiss keeps raw pointers: the Python objects must outlive train()
    if assign is not None:
        overrides.append(assign(sample.shape[1], faiss.METRIC_INNER_PRODUCT))
        index.clustering_index = overrides[-1]
        if params.pq_m:
            overrides.append(assign(sample.shape[1] // params.pq_m, faiss.METRIC_L2))
            index.pq.assign_index = overrides[-1]
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    finally:
        index.clustering_index = None
        if params.pq_m:
            index.pq.assign_index = None
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def _faiss_ivf_from_bytes(blob: np.ndarray, rows: np.ndarray, nprobe: int) -> Any:
    """The CPU path: the broadcast index with this rank's rows added on the host."""
    index = _faiss_trained_from_bytes(blob, nprobe)
    if rows.shape[0]:
        index.add(rows)  # local ids 0..n_r-1; the searcher adds lo
    return index


def _faiss_trained_from_bytes(blob: np.ndarray, nprobe: int) -> Any:
    index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
    index.nprobe = nprobe
    quantizer = faiss.downcast_index(index.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * nprobe)
    return index


#: Rows per ``add`` call on the GPU path: one progress line each (the GPU index pages its input
#: to the device itself, so this bounds no memory).
GPU_ADD_ROWS = 1 << 20


def _gpu_symbol(name: str) -> Any:
    """``faiss.<name>`` of a GPU build; a clear error where the installed Faiss has none."""
    sym = getattr(faiss, name, None)
    if sym is None:
        raise RuntimeError(
            f"faiss.{name} is missing: the GPU path needs faiss-gpu (faiss {faiss.__version__})"
        )
    return sym


def _gpu_flat_index(width: int, metric: int) -> Any:
    """A flat GPU index on this rank's CUDA device (:data:`AssignIndexFactory` for k-means)."""
    config = _gpu_symbol("GpuIndexFlatConfig")()
    config.device = torch.cuda.current_device()
    name = "GpuIndexFlatIP" if metric == faiss.METRIC_INNER_PRODUCT else "GpuIndexFlatL2"
    return _gpu_symbol(name)(_gpu_resources(), width, config)


def _faiss_gpu_ivf_from_bytes(
    blob: np.ndarray, rows: np.ndarray, nprobe: int, params: IVFParams, say: Callable[[str], None]
) -> Any:
    """The GPU path: the broadcast *empty* index cloned to this rank's GPU (centroids, PQ codebooks:
    small), then the rank's rows added there, :data:`GPU_ADD_ROWS` at a time with a progress line
    each. The lists are never built on the host (before: a host add, then a copy of the filled
    index). Cloner options keep the semantics of the CPU index: float32 lists, coarse quantizer and
    lookup tables, 64-bit ids, no precomputed tables, the classic implementation (cuVS off, where
    the build has it). An HNSW quantizer stays on the host when ``gpu_cpu_quantizer`` asks for it
    (:func:`check_ivf_supported` refuses it otherwise, before this runs).

    Per-rank device memory: the lists, ``n_r·(w·4 + 8)`` (IVF-PQ: ``n_r·(pq_m + 8)``), plus the
    centroids ``nlist·w·4``; the host keeps only the trained empty index while cloning.
    """
    index = _faiss_trained_from_bytes(blob, nprobe)  # the clone copies nprobe
    options = _gpu_symbol("GpuClonerOptions")()
    options.useFloat16 = False
    options.useFloat16CoarseQuantizer = False
    options.usePrecomputed = False
    options.indicesOptions = _gpu_symbol("INDICES_64_BIT")
    if hasattr(options, "use_cuvs"):
        options.use_cuvs = False
    if params.quantizer == "hnsw":
        if not hasattr(options, "allowCpuCoarseQuantizer"):
            raise RuntimeError(
                f"faiss {faiss.__version__} has no GpuClonerOptions.allowCpuCoarseQuantizer: an HNSW "
                "coarse quantizer cannot stay on the host; use quantizer='flat'"
            )
        options.allowCpuCoarseQuantizer = True
    clone = _gpu_symbol("index_cpu_to_gpu")
    gpu_index = clone(_gpu_resources(), torch.cuda.current_device(), index, options)
    del index
    n = rows.shape[0]
    for a in range(0, n, GPU_ADD_ROWS):
        b = min(n, a + GPU_ADD_ROWS)
        gpu_index.add(np.ascontiguousarray(rows[a:b]))  # local ids a..b-1; the searcher adds lo
        say(f"ivf: {b:,} of {n:,} rows added to the GPU index")
    return gpu_index


def _faiss_coarse(index: Any, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``nprobe`` nearest cells of each query: ``(scores [m, p] float32, cells [m, p] int64)``."""
    quantizer = faiss.downcast_index(index.quantizer)
    d, i = quantizer.search(q, nprobe)
    return np.asarray(d, dtype=np.float32), np.asarray(i, dtype=np.int64)


def _faiss_search_preassigned(
    index: Any, q: np.ndarray, k: int, cells: np.ndarray, cell_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    d, i = index.search_preassigned(q, k, cells, cell_scores)
    return np.asarray(d, dtype=np.float32), np.asarray(i, dtype=np.int64)


def _faiss_flat_knn(q: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k`` of ``q`` against ``base`` (no index copy of ``base``)."""
    if _faiss_num_gpus() > 0 and hasattr(faiss, "knn_gpu"):
        res = _gpu_resources()
        d, i = faiss.knn_gpu(res, q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        d, i = faiss.knn(q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(d, dtype=np.float32), np.asarray(i, dtype=np.int64)


_GPU_RES: Any = None


def _gpu_resources() -> Any:
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = _gpu_symbol("StandardGpuResources")()
        # the amount the planner reserves (its default differs between Faiss releases)
        _GPU_RES.setTempMemory(FAISS_GPU_TEMP_BYTES)
    return _GPU_RES


# --- per-shard search -------------------------------------------------------------------------


class _ShardSearcher:
    """Searches foreign query blocks against this rank's shard; returns global ids.

    ``extras(q)`` is what the owner computes once per query block and sends along (the coarse
    assignment for the CPU IVF index; nothing for the flat search, nor for the GPU index, which
    redoes the coarse step itself: cheap there, and it saves sending ``nprobe·12`` B a query).
    ``index`` is the host IVF index, ``gpu_index`` the GPU one (:func:`_faiss_gpu_ivf_from_bytes`);
    neither means the brute-force flat search.
    """

    def __init__(
        self,
        shard: np.ndarray,
        lo: int,
        index: Any | None,
        nprobe: int,
        params: IVFParams,
        gpu_index: Any | None = None,
    ) -> None:
        self.shard, self.lo, self.index, self.nprobe, self.params = shard, lo, index, nprobe, params
        self.gpu_index = gpu_index

    def extras(self, q: np.ndarray) -> list[np.ndarray]:
        if self.index is None or self.gpu_index is not None:
            return []
        if q.shape[0] == 0:
            return [np.zeros((0, self.nprobe), np.int64), np.zeros((0, self.nprobe), np.float32)]
        cell_scores, cells = _faiss_coarse(self.index, q, self.nprobe)
        return [cells, cell_scores]

    def extra_shapes(self, m: int) -> list[tuple[tuple[int, ...], np.dtype]]:
        if self.index is None or self.gpu_index is not None:
            return []
        return [((m, self.nprobe), np.dtype(np.int64)), ((m, self.nprobe), np.dtype(np.float32))]

    def search(self, q: np.ndarray, extras: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        n_local = self.shard.shape[0]
        if q.shape[0] == 0 or n_local == 0:
            return _pad_topk(np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64), k)
        if self.index is None and self.gpu_index is None:
            s, i = _faiss_flat_knn(q, self.shard, min(k, n_local))
        else:
            kk = k * self.params.refine if self.params.pq_m else k
            if self.gpu_index is not None:
                s, i = self.gpu_index.search(q, kk)
                s, i = np.asarray(s, np.float32), np.asarray(i, np.int64)
            else:
                s, i = _faiss_search_preassigned(self.index, q, kk, extras[0], extras[1])
            if self.params.pq_m:  # PQ scores are approximate: re-score exactly, keep the best k
                valid = i >= 0
                exact = np.full(s.shape, MISSING_SCORE, dtype=np.float32)
                rows = np.nonzero(valid)[0]
                exact[valid] = np.einsum("ij,ij->i", q[rows], self.shard[i[valid]])
                order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
                s, i = np.take_along_axis(exact, order, axis=1), np.take_along_axis(i, order, axis=1)
        s, i = _pad_topk(s, i, k)
        i = np.where(i >= 0, i + self.lo, -1)
        return s, i


# --- the ring ---------------------------------------------------------------------------------


def _chunk_bounds(n: int, chunks: int, c: int) -> tuple[int, int]:
    return n * c // chunks, n * (c + 1) // chunks


def _exchange(
    send: list[np.ndarray],
    dst: int,
    recv_shapes: list[tuple[tuple[int, ...], np.dtype]],
    src: int,
    device: torch.device,
    stats: RingStats,
) -> list[np.ndarray]:
    """Send ``send`` to ``dst`` and receive arrays of ``recv_shapes`` from ``src``, concurrently.

    Batched point-to-point (``batch_isend_irecv``: grouped for NCCL, plain isend/irecv on gloo), so the
    two directions cannot deadlock. Empty arrays are skipped on both sides (sizes are known to both).
    """
    t0 = time.perf_counter()
    ops = []
    out_t: list[torch.Tensor] = []
    for tag, a in enumerate(send):
        if a.size:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
            ops.append(dist.P2POp(dist.isend, t, dst, tag=tag))
            stats.bytes_sent += a.nbytes
    for tag, (shape, dtype) in enumerate(recv_shapes):
        buf = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=device)
        out_t.append(buf)
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, src, tag=tag))
            stats.bytes_received += buf.numel() * buf.element_size()
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    stats.comm_s += time.perf_counter() - t0
    return [t.cpu().numpy() for t in out_t]


def _ring_search(
    queries: np.ndarray,
    counts: Sequence[int],
    searcher: _ShardSearcher,
    k: int,
    block_rows: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, RingStats]:
    """Global top-``k`` of this rank's ``queries`` against every rank's shard (see the module doc).

    ``counts[r]`` is rank ``r``'s number of queries (all ranks must pass the same list). Queries are
    cut into ``C = max_r ⌈counts[r] / block_rows⌉`` chunks per rank so that all ranks run the same
    ``C·W`` rounds; in round ``(c, t)`` this rank serves chunk ``c`` of rank ``r + t``.
    """
    rank, world = _world()
    stats = RingStats()
    m = queries.shape[0]
    if m != counts[rank]:
        raise ValueError(f"rank {rank}: {m} queries but counts says {counts[rank]}")
    chunks = max(1, max(math.ceil(c / block_rows) for c in counts))
    best_s = np.full((m, k), MISSING_SCORE, dtype=np.float32)
    best_i = np.full((m, k), -1, dtype=np.int64)
    d = queries.shape[1]
    for c in range(chunks):
        a, b = _chunk_bounds(m, chunks, c)
        own_q = np.ascontiguousarray(queries[a:b])
        own_extras = searcher.extras(own_q)
        for t in range(world):
            stats.rounds += 1
            src, dst = (rank + t) % world, (rank - t) % world
            if t == 0:
                fq, fx = own_q, own_extras
            else:
                fa, fb = _chunk_bounds(counts[src], chunks, c)
                shapes = [((fb - fa, d), np.dtype(np.float32)), *searcher.extra_shapes(fb - fa)]
                got = _exchange([own_q, *own_extras], dst, shapes, src, device, stats)
                fq, fx = got[0], got[1:]
                stats.hold(fq.shape[0])
            t0 = time.perf_counter()
            rs, ri = searcher.search(fq, fx, k)
            stats.search_s += time.perf_counter() - t0
            if t == 0:
                back_s, back_i = rs, ri
            else:
                stats.max_result_rows = max(stats.max_result_rows, rs.shape[0], b - a)
                back = _exchange(
                    [rs, ri],
                    src,
                    [((b - a, k), np.dtype(np.float32)), ((b - a, k), np.dtype(np.int64))],
                    dst,
                    device,
                    stats,
                )
                back_s, back_i = back
                del fq, fx, rs, ri
                stats.release()
            t0 = time.perf_counter()
            best_s[a:b], best_i[a:b] = merge_topk(best_s[a:b], best_i[a:b], back_s, back_i, k)
            stats.merge_s += time.perf_counter() - t0
    return best_s, best_i, stats


# --- training and the public entry point ------------------------------------------------------


def _gather_rows_to_rank0(rows: np.ndarray, device: torch.device) -> np.ndarray | None:
    """Rank-ordered concatenation of every rank's ``rows`` on rank 0 (``None`` elsewhere). Small data."""
    rank, world = _world()
    if world == 1:
        return rows
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(1, max(counts))
    padded = torch.zeros((longest, rows.shape[1]), dtype=torch.from_numpy(rows[:0]).dtype, device=device)
    padded[: rows.shape[0]] = torch.from_numpy(rows).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, gather_list=parts, dst=0)
    if rank != 0:
        return None
    assert parts is not None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts, strict=True)])


def _self_first_in_place(
    scores: np.ndarray, indices: np.ndarray, lo: int, self_scores: np.ndarray, chunk: int
) -> None:
    """:func:`~cstwa_dist.structure.knn.ensure_self_first` on the rank's lists ``chunk`` rows at a
    time, written back in place. The rule is per row, so the lists equal one call on all rows; its
    copies then cost ``chunk·k`` instead of ``n_r·k`` rows (see :func:`per_rank_memory`)."""
    for a in range(0, scores.shape[0], chunk):
        b = min(a + chunk, scores.shape[0])
        ids = np.arange(lo + a, lo + b, dtype=np.int64)
        scores[a:b], indices[a:b] = ensure_self_first(scores[a:b], indices[a:b], ids, self_scores[a:b])


def _normalise_rows(x: np.ndarray, chunk: int) -> np.ndarray:
    """:func:`~cstwa_dist.structure.knn.l2_normalise` (row-wise, so bit-identical) in row chunks:
    its float64 temporaries then cost ``chunk·d·16`` bytes instead of ``n_r·d·16`` (720 MB at 1M × 45)."""
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, x.shape[0], chunk):
        out[a : a + chunk] = l2_normalise(x[a : a + chunk])
    return out


def _broadcast_bytes(blob: np.ndarray | None, device: torch.device) -> np.ndarray:
    rank, world = _world()
    if world == 1:
        assert blob is not None
        return blob
    size = torch.tensor([0 if blob is None else blob.size], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if rank == 0:
        assert blob is not None
        buf.copy_(torch.from_numpy(blob))
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy()


def distributed_knn(
    x_local: np.ndarray,
    ranges: Sequence[tuple[int, int]],
    k: int,
    params: IVFParams | None = None,
    *,
    recall_queries: int = 1000,
    block_rows: int = BLOCK_ROWS,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> KnnResult:
    """Cosine top-``k`` of this rank's rows against all ranks' rows, without gathering the rows.

    Every rank of the default process group (or this process alone, without one) calls it with its
    own rows ``x_local = X[lo_r:hi_r]`` and the same ``ranges``. Returns this rank's ``[hi − lo, k]``
    lists with the semantics of :func:`~cstwa_dist.structure.knn.exact_knn`, plus recall@k against
    exact search on ``recall_queries`` sampled rows (0 skips it; the query itself not counted, see
    :class:`KnnResult`). ``block_rows`` bounds the foreign
    query block a rank holds (see the module doc for the per-rank memory). ``device`` is where
    tensors travel for collectives: CPU for gloo, the rank's GPU for NCCL (default: CPU, or the
    current CUDA device when the group is NCCL).
    """
    params = params or IVFParams()
    rank, world = _world()
    n_total = _check_ranges(ranges, world)
    lo, hi = ranges[rank]
    if device is None:
        nccl = world > 1 and dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    if n_total == 0:
        raise ValueError("need at least one row in total")
    x_local = np.asarray(x_local)
    if x_local.ndim != 2 or x_local.shape[0] != hi - lo:
        raise ValueError(
            f"rank {rank}: x_local has shape {x_local.shape}, its range [{lo}, {hi}) needs {hi - lo} rows"
        )
    k = int(k)
    if k > n_total:
        logger.warning("k=%d exceeds the number of rows N=%d; clipping k to %d", k, n_total, n_total)
        k = n_total
    on_gpu = faiss_device() == "gpu"
    # before any work: every rank refuses the same settings, so none is left waiting in a collective
    check_ivf_supported(params, "gpu" if on_gpu else "cpu", d=x_local.shape[1], k=k)
    say = progress or (lambda msg: logger.info("%s", msg))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    xn = _normalise_rows(x_local, block_rows)
    self_scores = np.einsum("ij,ij->i", xn, xn).astype(np.float32)
    timings["normalise_s"] = time.perf_counter() - t0

    nlist = nprobe = 0
    index = gpu_index = None
    if not params.exact:
        nlist, nprobe = resolve_cells(params, n_total)
        t0 = time.perf_counter()
        sample_ids = recall_sample_ids(
            n_total, quantizer_sample_rows(n_total, nlist, params.train_per_list), params.seed + 1
        )
        mine = sample_ids[(sample_ids >= lo) & (sample_ids < hi)] - lo
        sample = _gather_rows_to_rank0(np.ascontiguousarray(xn[mine]), device)
        blob = None
        if sample is not None:  # rank 0; on the GPU path k-means runs on its GPU
            say(f"ivf: training nlist={nlist} on {sample.shape[0]:,} rows ({'gpu' if on_gpu else 'cpu'})")
            blob = _faiss_train_serialised(sample, nlist, params, assign=_gpu_flat_index if on_gpu else None)
        timings["train_s"] = time.perf_counter() - t0  # ranks > 0: the sample gather only
        t0 = time.perf_counter()
        blob = _broadcast_bytes(blob, device)
        timings["broadcast_s"] = time.perf_counter() - t0  # ranks > 0: includes the wait for rank 0
        t0 = time.perf_counter()
        if on_gpu:
            gpu_index = _faiss_gpu_ivf_from_bytes(blob, xn, nprobe, params, say)
        else:
            index = _faiss_ivf_from_bytes(blob, xn, nprobe)
        timings["add_s"] = time.perf_counter() - t0
        say(
            f"ivf: nlist={nlist} nprobe={nprobe} pq_m={params.pq_m}; shard of {hi - lo} rows indexed "
            f"on the {'gpu' if on_gpu else 'cpu'}"
        )
    searcher = _ShardSearcher(xn, lo, index, nprobe, params, gpu_index)
    counts = [b - a for a, b in ranges]

    t0 = time.perf_counter()
    scores, indices, ring = _ring_search(xn, counts, searcher, k, block_rows, device)
    _self_first_in_place(scores, indices, lo, self_scores, block_rows)
    timings["search_s"] = time.perf_counter() - t0
    say(f"kNN of {hi - lo} rows against {n_total} in {timings['search_s']:.1f}s ({ring.rounds} rounds)")

    recall: float | None = None
    recall_ring: RingStats | None = None
    sample_ids = recall_sample_ids(n_total, recall_queries, params.seed)
    if sample_ids.size:
        t0 = time.perf_counter()
        qcounts = [int(((sample_ids >= a) & (sample_ids < b)).sum()) for a, b in ranges]
        mine = sample_ids[(sample_ids >= lo) & (sample_ids < hi)] - lo
        flat = _ShardSearcher(xn, lo, None, 0, params)
        es, ei, recall_ring = _ring_search(
            np.ascontiguousarray(xn[mine]), qcounts, flat, k, block_rows, device
        )
        es, ei = ensure_self_first(es, ei, mine + lo, self_scores[mine])
        found, total = recall_counts(indices[mine], ei, mine + lo)
        found, total = all_reduce_ints([found, total], device)
        recall = found / total if total else None
        timings["recall_s"] = time.perf_counter() - t0
        say(f"recall@{k} against exact on {sample_ids.size} queries: {recall}")
    return KnnResult(
        lo=lo,
        hi=hi,
        n_total=n_total,
        k=k,
        scores=scores,
        indices=indices,
        recall=recall,
        recall_queries=int(sample_ids.size),
        nlist=nlist,
        nprobe=nprobe,
        timings=timings,
        ring=ring,
        recall_ring=recall_ring,
    )
