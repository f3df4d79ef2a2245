"""Row-sharded ``Â`` (docs/method.md §1, Eq. 4-5) and row-sharded propagation (§2, Eq. 9-10).

Why: the single-process path (:mod:`~cstwa_dist.structure.graph`, :mod:`~cstwa_dist.structure.propagate`)
holds all of ``Â`` and all of ``U`` on every rank: ``N·k·12`` B of graph and ``N·d·4`` B of table
(2.9 GB + 5.4 GB at 30M users, k = 8, d = 45), plus rank 0 building the whole graph from gathered kNN
lists. Here a rank owns rows ``[lo, hi)`` (the same contiguous ``ranges`` as
:func:`~cstwa_dist.structure.ivf.distributed_knn`; uneven and empty ranges allowed) and never holds
anything of size ``N·d`` or the full graph:

1. :func:`shard_from_knn` turns the rank's own kNN lists into its rows of ``Â``. Eq. 5 scales entry
   ``(u, v)`` by ``d_u^{-1/2}·d_v^{-1/2}`` with ``d_v`` = row ``v``'s own degree (``A`` is not
   symmetric), so the degrees of foreign neighbour rows are fetched from their owners
   (:class:`~cstwa_dist.distributed.exchange.RowFetcher`, one float64 per distinct foreign column),
   never a full degree vector. Same float64 arithmetic in the same order as
   :func:`~cstwa_dist.structure.graph.normalise_adjacency`, so the rows are bit-identical.
2. :func:`save_graph_shard` / :func:`load_graph_rows`: every rank writes its part as three ``.npy``
   files, rank 0 writes ``manifest.json`` last; any rank at any later world size reads just the rows
   it owns, memory-mapped, from whichever parts overlap them.
3. :class:`ShardedPropagator`: per layer, fetch the foreign rows of the *current* ``U^(l)`` that the
   shard's columns name, then one local CSR product (Eq. 9); :meth:`ShardedPropagator.migrate` adds
   Eq. 10's mixing. Equals :func:`~cstwa_dist.structure.propagate.structure_migrate` on the
   concatenated rows.

**Per-rank memory** (``n_r`` own rows, ``z`` own nonzeros, ``f`` distinct foreign columns, ``s`` rows
served to peers, ``w`` width, ``b`` bytes per table element): the shard ``8·(n_r + 1) + 12·z`` B;
building it, :func:`shard_build_memory`; the propagator, resident, :func:`propagator_memory`; per
call, :func:`propagation_memory`, and with Eq. 10's mixing :func:`migrate_memory`. These functions are
the one source of the formulas (the dry run asks them); :meth:`ShardedPropagator.memory` reports the
same items from the tensors actually allocated. ``f ≤ min(N − n_r, z)``: how far below that it stays
depends on how local the graph is in id order (docs/structure-scaling.md).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cstwa_dist.distributed.exchange import (
    RowFetcher,
    all_gather_ints,
    check_ranges,
    comm_device,
    raise_together,
    world,
)
from cstwa_dist.fs import atomic_path, atomic_write_json, check_parts_cover, read_manifest
from cstwa_dist.structure.memory import MemoryItem
from cstwa_dist.structure.propagate import _check_beta, beta_update, beta_update_memory

logger = logging.getLogger(__name__)

__all__ = [
    "GraphShard",
    "ShardedPropagator",
    "graph_rows",
    "load_graph_rows",
    "migrate_memory",
    "propagation_memory",
    "propagator_memory",
    "save_graph_shard",
    "shard_build_memory",
    "shard_from_knn",
    "shard_of",
]

_FORMAT = "cstwa-graph-shards"
_FORMAT_VERSION = 1
_DTYPES = {"crow": np.dtype(np.int64), "col": np.dtype(np.int64), "val": np.dtype(np.float32)}
_SIDE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PART = re.compile(r"^part-\d+-of-\d+\.(crow|col|val)\.npy$")


@dataclass
class GraphShard:
    """Rows ``[lo, hi)`` of an ``n_total × n_total`` sparse matrix in CSR form, global column ids.

    ``crow`` int64 ``[hi − lo + 1]`` (starting at 0), ``col`` int64 global ids sorted within each row,
    ``val`` float32. CPU tensors; :class:`ShardedPropagator` moves what it needs to the table's device.
    """

    lo: int
    hi: int
    n_total: int
    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.val))

    def foreign_columns(self) -> torch.Tensor:
        """Sorted distinct column ids outside ``[lo, hi)``: the rows a product must fetch."""
        foreign = (self.col < self.lo) | (self.col >= self.hi)
        return torch.unique(self.col[foreign], sorted=True)

    def to_csr(self) -> torch.Tensor:
        """The shard as a ``[hi − lo, n_total]`` CSR tensor (global columns), e.g. to compare rows."""
        return torch.sparse_csr_tensor(self.crow, self.col, self.val, size=(self.rows, self.n_total))

    def validate(self) -> None:
        """Check shapes, dtypes and index ranges (``O(nnz)``); raises ``ValueError``."""
        if not 0 <= self.lo <= self.hi <= self.n_total:
            raise ValueError(f"shard rows [{self.lo}, {self.hi}) outside [0, {self.n_total})")
        for name, t, dtype in (
            ("crow", self.crow, torch.int64),
            ("col", self.col, torch.int64),
            ("val", self.val, torch.float32),
        ):
            if t.dim() != 1 or t.dtype != dtype:
                raise ValueError(f"shard {name} must be 1-D {dtype}, got {t.dim()}-D {t.dtype}")
        if self.crow.numel() != self.rows + 1 or int(self.crow[0]) != 0 or int(self.crow[-1]) != self.nnz:
            raise ValueError(f"shard crow must hold {self.rows + 1} offsets from 0 to nnz={self.nnz}")
        if self.val.numel() != self.nnz:
            raise ValueError(f"shard has {self.nnz} column ids but {self.val.numel()} values")
        if self.rows and bool((self.crow[1:] < self.crow[:-1]).any()):
            raise ValueError("shard crow is not non-decreasing")
        if self.nnz and (int(self.col.min()) < 0 or int(self.col.max()) >= self.n_total):
            raise ValueError(f"shard column ids outside [0, {self.n_total})")


def _dinv(deg: torch.Tensor) -> torch.Tensor:
    """``d^{-1/2}`` with 0 for degree 0: the exact expression of ``graph.normalise_adjacency``."""
    return torch.where(deg > 0, deg.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(deg))


def _own_triplets(
    scores: np.ndarray, indices: np.ndarray, lo: int, hi: int, n_total: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 4 on this rank's lists: (local row, global col, float32 value), sorted by (row, col).

    The rules of :func:`~cstwa_dist.structure.graph.knn_to_adjacency`, line for line: clamp negative
    cosines to 0, drop zeros and ``-1`` ids, reject a neighbour listed twice in a row.
    """
    if scores.shape != indices.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and indices {indices.shape} must be equal 2-D shapes")
    if scores.shape[0] != hi - lo:
        raise ValueError(f"expected one kNN row per own row: {scores.shape[0]} rows for range [{lo}, {hi})")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if indices.size and indices.max() >= n_total:
        raise ValueError(f"neighbour id {int(indices.max())} out of range for n={n_total}")
    n_r, k = indices.shape
    cols = indices.astype(np.int64, copy=False)
    vals = np.maximum(scores.astype(np.float32, copy=False), np.float32(0.0))
    keep = (cols >= 0) & (vals > 0)
    # Sort each row's k entries by column (dropped ones last) instead of a global lexsort over
    # (row, col): rows are already in order, and a k-wide sort per row is ~20× faster at 1M × 8
    # (the lexsort took 6 s). Same (row, col) order, so the triplets are identical.
    order = np.argsort(np.where(keep, cols, np.iinfo(np.int64).max), axis=1, kind="stable")
    keep = np.take_along_axis(keep, order, axis=1)
    cols = np.take_along_axis(cols, order, axis=1)[keep]
    vals = np.take_along_axis(vals, order, axis=1)[keep]
    rows = np.broadcast_to(np.arange(n_r, dtype=np.int64)[:, None], (n_r, k))[keep]
    if rows.size > 1 and ((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])).any():
        raise ValueError("a kNN row lists the same neighbour twice")
    return rows, cols, vals


def shard_from_knn(
    scores: np.ndarray,
    indices: np.ndarray,
    ranges: Sequence[tuple[int, int]],
    device: torch.device | None = None,
) -> GraphShard:
    """This rank's kNN rows (as :func:`~cstwa_dist.structure.ivf.distributed_knn` returns them) →
    its rows ``[lo, hi)`` of ``Â = D^{-1/2} A D^{-1/2}`` (Eq. 4-5). Collective.

    Equal, bit for bit, to rows ``[lo, hi)`` of ``normalise_adjacency(knn_to_adjacency(all lists))``:
    own-row degrees are summed in float64 with the same ``index_add_`` in the same (sorted column)
    order, foreign degrees come from their owners, and each value is ``val·d_u^{-1/2}·d_v^{-1/2}`` in
    float64, cast to float32 at the end; entries that become 0 (a zero-degree neighbour) are dropped.
    ``device``: where tensors travel (see :class:`~cstwa_dist.distributed.exchange.RowFetcher`).

    Per-rank memory: :func:`shard_build_memory`, besides the caller's lists.
    """
    rank, size = world()
    n_total = check_ranges(ranges, size)
    lo, hi = int(ranges[rank][0]), int(ranges[rank][1])
    dev = comm_device(device)
    error: BaseException | None = None
    try:
        rows, cols, vals = _own_triplets(np.asarray(scores), np.asarray(indices), lo, hi, n_total)
    except ValueError as e:
        error = ValueError(f"rank {rank}: {e}")
    raise_together(error, dev)

    row_t = torch.from_numpy(rows)
    col_t = torch.from_numpy(np.ascontiguousarray(cols))
    val_t = torch.from_numpy(np.ascontiguousarray(vals))
    val64 = val_t.to(torch.float64)
    deg = torch.zeros(hi - lo, dtype=torch.float64).index_add_(0, row_t, val64)
    own = (col_t >= lo) & (col_t < hi)
    needed = torch.unique(col_t[~own], sorted=True)
    fetcher = RowFetcher(ranges, needed, dev)
    foreign_deg = fetcher.fetch(deg.unsqueeze(1)).squeeze(1)

    dinv_own = _dinv(deg)
    dinv_col = torch.empty(col_t.numel(), dtype=torch.float64)
    dinv_col[own] = dinv_own[col_t[own] - lo]
    dinv_col[~own] = _dinv(foreign_deg)[torch.searchsorted(needed, col_t[~own])]
    new_val = (val64 * dinv_own[row_t] * dinv_col).to(torch.float32)
    keep = new_val != 0
    if not bool(keep.all()):
        row_t, col_t, new_val = row_t[keep], col_t[keep], new_val[keep]
    crow = torch.zeros(hi - lo + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(row_t, minlength=hi - lo), 0, out=crow[1:])
    logger.debug(
        "rank %d: shard [%d, %d) of %d, nnz %d, %d foreign neighbour rows",
        *(rank, lo, hi, n_total, new_val.numel(), needed.numel()),
    )
    return GraphShard(lo=lo, hi=hi, n_total=n_total, crow=crow, col=col_t.contiguous(), val=new_val)


def shard_build_memory(rows: int, k: int, foreign: int) -> list[MemoryItem]:
    """Per-rank memory of :func:`shard_from_knn` on ``n_r = rows`` rows of ``k``-wide kNN lists, at
    its peak (the float64 normalisation), beyond the lists themselves (the caller's: ``own_topk`` of
    :func:`~cstwa_dist.structure.ivf.per_rank_memory`). With ``nnz ≤ n_r·k`` entries and ``f ≤ f_r =
    foreign`` distinct foreign columns:

    * ``triplets``: Eq. 4's (row, column, value), int64 + int64 + float32, ``n_r·k·20`` (the column
      array becomes the shard's);
    * ``normalisation``: the float64 values, the column factors, the gathered row factors, two
      float64 products and the own-column mask, ``n_r·k·41``;
    * ``degrees``: own degrees and their inverse roots ``16·n_r``; the ids to request, the ids to
      serve, the fetched degrees and their inverse roots ``32·f_r``.

    Measured on one rank at 1M rows × 8: 62.8 B per entry above the lists; the formula gives 63. The
    finished shard, ``8·(n_r + 1) + 12·nnz``, is smaller and reuses the triplets' columns; writing it
    (:func:`save_graph_shard`) allocates nothing more.
    """
    entries = rows * k
    return [
        MemoryItem("triplets", "Â build triplets", entries * 20, "n_r·k·20", detail="COO"),
        MemoryItem("normalisation", "Â build normalisation", entries * 41, "n_r·k·41", detail="float64"),
        MemoryItem(
            "degrees", "Â build degrees", 16 * rows + 32 * foreign, "16·n_r + 32·f_r", detail="+ fetch ids"
        ),
    ]


def propagator_memory(rows: int, k: int, foreign: int) -> list[MemoryItem]:
    """Resident per-rank memory of a :class:`ShardedPropagator` over ``n_r = rows`` graph rows of at
    most ``k`` entries (built once per graph, kept for the job), ``foreign`` bounding both the rows it
    requests and the rows it serves:

    * ``csr``: its local CSR, offsets ``(n_r+1)·8`` and per entry an int64 window column and a
      float32 value, ``n_r·k·12 + (n_r+1)·8``. That is the copy on the table's device: on a GPU rank
      the CPU master it was made from stays on the host as well (not counted here);
    * ``ids``: its :class:`~cstwa_dist.distributed.exchange.RowFetcher`'s request and serve lists,
      ``8·(f + s) ≤ 16·f_r``.
    """
    return [
        MemoryItem("csr", "own Â rows", rows * k * 12 + (rows + 1) * 8, "n_r·k·12 + (n_r+1)·8", detail="CSR"),
        MemoryItem("ids", "fetch id lists", 16 * foreign, "16·f_r", detail="requested + served"),
    ]


def propagation_memory(
    rows: int, foreign: int, width: int, layers: int, itemsize: int = 4
) -> list[MemoryItem]:
    """Per-rank memory of one :meth:`ShardedPropagator.propagate` call (the items
    :meth:`ShardedPropagator.memory` reports, less the caller's ``own_rows`` and the resident
    :func:`propagator_memory`): ``n_r = rows`` own rows of width ``w``, ``b = itemsize``, ``f ≤ f_r =
    foreign`` rows fetched and, the same bound, served:

    * ``fetched_rows``: the foreign rows in the fetch window, ``f_r·w·b``;
    * ``send_buffers``: the rows served to one peer at a time, at most ``f_r·w·b``;
    * ``window_own_copy``: the window's copy of the own rows, ``n_r·w·b`` (none when nothing is
      fetched: the product then reads the own rows directly);
    * ``layer_outputs``: ``min(L, 2)·n_r·w·b``: a layer's input and output block are alive together,
      so ``L`` layers never hold more than two.

    No layer, no exchange and nothing allocated.
    """
    if layers == 0:
        return []
    block, fetched = rows * width * itemsize, foreign * width * itemsize
    outputs = min(layers, 2)
    items = []
    if foreign:
        items += [
            MemoryItem("fetched_rows", "fetched foreign rows", fetched, f"f_r·w·{itemsize}"),
            MemoryItem("send_buffers", "served rows", fetched, f"f_r·w·{itemsize}", detail="send buffer"),
            MemoryItem("window_own_copy", "window's own rows", block, f"n_r·w·{itemsize}"),
        ]
    items.append(
        MemoryItem(
            "layer_outputs",
            "layer outputs",
            outputs * block,
            f"{outputs}·n_r·w·{itemsize}" if outputs > 1 else f"n_r·w·{itemsize}",
        )
    )
    return items


def migrate_memory(rows: int, foreign: int, width: int, layers: int, itemsize: int = 4) -> list[MemoryItem]:
    """Peak per-rank memory of one :meth:`ShardedPropagator.migrate` call (an epoch boundary of one
    table, Eq. 9–10), as the larger of its two phases, which never overlap:

    * propagating: :func:`propagation_memory`;
    * mixing: the propagated block ``Â^L·U`` (``n_r·w·b``; the fetch window and the other layer
      output are freed by then) and :func:`~cstwa_dist.structure.propagate.beta_update_memory`.

    The rows of ``U`` themselves are a view of the table's shard, not counted (nor, with ``L = 0``, the
    propagated block: it is ``U``). With foreign rows to
    fetch the propagation is usually the larger (``2·f_r ≥ n_r`` on ``W ≥ 2`` ranks); on one rank the
    mixing is.
    """
    propagating = propagation_memory(rows, foreign, width, layers, itemsize)
    propagated = MemoryItem("propagated", "propagated block", rows * width * itemsize, f"n_r·w·{itemsize}")
    mixing = [*([propagated] if layers else []), *beta_update_memory(rows, width, itemsize)]
    return max(propagating, mixing, key=lambda items: sum(i.bytes for i in items))


def shard_of(a: torch.Tensor, lo: int, hi: int) -> GraphShard:
    """Rows ``[lo, hi)`` of a full single-process graph (CSR/COO/dense) as a :class:`GraphShard`.

    For tests and for migrating a single-file graph (``graph.save_graph``) to the sharded layout;
    it reads the whole graph, so it is not a path for large ``N``.
    """
    from cstwa_dist.structure.graph import _as_csr

    csr = _as_csr(a)
    n = int(csr.shape[0])
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows [{lo}, {hi}) outside [0, {n})")
    crow = csr.crow_indices().to(torch.int64)
    s, e = int(crow[lo]), int(crow[hi])
    return GraphShard(
        lo=lo,
        hi=hi,
        n_total=n,
        crow=(crow[lo : hi + 1] - s).contiguous(),
        col=csr.col_indices().to(torch.int64)[s:e].contiguous(),
        val=csr.values().to(torch.float32)[s:e].contiguous(),
    )


# --- files --------------------------------------------------------------------------------------


def _graph_dir(graph_dir: str | Path, side: str) -> Path:
    if not isinstance(side, str) or not _SIDE.match(side):
        raise ValueError(f"side must be a plain name like 'user' or 'item', got {side!r}")
    return Path(graph_dir) / f"{side}_graph"


def _part_names(index: int, world_size: int) -> dict[str, str]:
    return {key: f"part-{index:05d}-of-{world_size:05d}.{key}.npy" for key in ("crow", "col", "val")}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def save_graph_shard(
    graph_dir: str | Path,
    side: str,
    shard: GraphShard,
    ranges: Sequence[tuple[int, int]],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write this rank's part of ``Â`` under ``<graph_dir>/<side>_graph/``; rank 0 writes the
    manifest last. Collective; ``graph_dir`` must be a file system every rank sees.

    Order, and why: (1) rank 0 removes an old ``manifest.json``, so from here on a reader sees an
    incomplete directory rather than a manifest over a mix of old and new parts; (2) every rank writes
    ``part-<r>-of-<W>.{crow,col,val}.npy`` atomically (temp file, fsync, rename); (3) after all ranks
    agree their parts are written, rank 0 checks the files exist (a non-shared ``graph_dir`` fails
    here), writes ``manifest.json`` (``n_total``, ``nnz``, per part ``lo``/``hi``/``nnz``/files, and
    ``meta``, e.g. ``k`` and recall) and removes part files of earlier writes that it does not list.
    A failure on any rank raises on every rank (no rank is left in a barrier).

    Per-rank memory: nothing beyond the shard (the arrays are written from its tensors).
    """
    rank, size = world()
    dev = comm_device()
    error: BaseException | None = None
    try:
        out = _graph_dir(graph_dir, side)
        n_total = check_ranges(ranges, size)
        if (shard.lo, shard.hi, shard.n_total) != (int(ranges[rank][0]), int(ranges[rank][1]), n_total):
            raise ValueError(
                f"rank {rank}: shard rows [{shard.lo}, {shard.hi}) of {shard.n_total} do not match its "
                f"range {tuple(ranges[rank])} of {n_total}"
            )
        shard.validate()
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict (written into the manifest), got {type(meta).__name__}")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").unlink(missing_ok=True)
    except (OSError, TypeError, ValueError) as e:
        error = e
    raise_together(error, dev)

    names = _part_names(rank, size)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for key, t in (("crow", shard.crow), ("col", shard.col), ("val", shard.val)):
            _save_npy(out / names[key], t.detach().cpu().numpy().astype(_DTYPES[key], copy=False))
    except OSError as e:
        error = OSError(f"rank {rank}: writing {out / names['crow']} etc. failed: {e}")
    raise_together(error, dev)

    nnz_all = [row[0] for row in all_gather_ints([shard.nnz], dev)]
    if rank == 0:
        try:
            parts = []
            for r, (lo, hi) in enumerate(ranges):
                files = _part_names(r, size)
                for name in files.values():
                    if not (out / name).is_file():
                        raise FileNotFoundError(
                            f"{out / name}: rank {r}'s part is not visible to rank 0; graph_dir must be on a "
                            "file system shared by all ranks"
                        )
                parts.append(
                    {"index": r, "lo": int(lo), "hi": int(hi), "nnz": int(nnz_all[r]), "files": files}
                )
            manifest = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "side": side,
                "n_total": n_total,
                "nnz": int(sum(nnz_all)),
                "dtypes": {key: str(dt) for key, dt in _DTYPES.items()},
                "world_size": size,
                "parts": parts,
                "meta": meta or {},
            }
            atomic_write_json(out / "manifest.json", manifest, sort_keys=False)
            listed = {name for p in parts for name in p["files"].values()}
            for stale in out.iterdir():
                if _PART.match(stale.name) and stale.name not in listed:
                    stale.unlink(missing_ok=True)
            logger.info(
                "%s graph: %d rows, nnz %d in %d part(s) → %s", side, n_total, sum(nnz_all), size, out
            )
        except OSError as e:
            error = e
    raise_together(error, dev)


def _read_manifest(graph_dir: str | Path, side: str) -> tuple[Path, dict[str, Any]]:
    out = _graph_dir(graph_dir, side)
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the {side} graph in {out} is missing or incomplete (the manifest is written "
            "last, after every part)"
        )
    m = read_manifest(path, _FORMAT, _FORMAT_VERSION)
    n_total, parts = m.get("n_total"), m.get("parts")
    if not isinstance(n_total, int) or n_total < 0 or not isinstance(parts, list) or not parts:
        raise ValueError(f"{path}: needs a non-negative integer n_total and a non-empty list of parts")
    for i, p in enumerate(parts):
        ok = (
            isinstance(p, dict)
            and all(isinstance(p.get(key), int) for key in ("lo", "hi", "nnz"))
            and isinstance(p.get("files"), dict)
            and all(isinstance(p["files"].get(key), str) and _PART.match(p["files"][key]) for key in _DTYPES)
        )
        if not ok:
            raise ValueError(f"{path}: part {i} needs integer lo, hi, nnz and crow/col/val part file names")
        if p["nnz"] < 0:
            raise ValueError(f"{path}: part {i} has nnz {p['nnz']} < 0")
    check_parts_cover(path, parts, n_total)
    return out, m


def graph_rows(graph_dir: str | Path, side: str) -> int:
    """``N`` of the sharded graph under ``<graph_dir>/<side>_graph`` (from its manifest)."""
    return int(_read_manifest(graph_dir, side)[1]["n_total"])


def _open_part(path: Path, key: str, length: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: listed in the manifest but missing; the graph directory is incomplete"
        )
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable part file ({e})") from None
    if arr.ndim != 1 or arr.shape[0] != length or arr.dtype != _DTYPES[key]:
        raise ValueError(
            f"{path}: expected {length} {_DTYPES[key]} values, found shape {arr.shape} {arr.dtype}"
        )
    return arr


def load_graph_rows(graph_dir: str | Path, side: str, lo: int, hi: int) -> GraphShard:
    """Rows ``[lo, hi)`` of the sharded graph, from whichever parts overlap them (written at any world
    size). Not collective.

    Part files are memory-mapped (``np.load(mmap_mode="r", allow_pickle=False)``), so only the needed
    slices are read: two ``crow`` entries per part to find the slice, then the slice itself. Checks
    the manifest (format, ``n_total``, parts covering ``[0, n_total)``) and each file read (dtype,
    length, offsets consistent, columns in range); every error is one line naming the file.

    Per-rank memory: the returned shard only (``8·(hi − lo + 1) + 12·nnz`` B), plus page cache.
    """
    out, m = _read_manifest(graph_dir, side)
    n_total = int(m["n_total"])
    if isinstance(lo, bool) or isinstance(hi, bool) or not 0 <= int(lo) <= int(hi) <= n_total:
        raise ValueError(f"rows [{lo}, {hi}) outside [0, {n_total}) of {out / 'manifest.json'}")
    lo, hi = int(lo), int(hi)
    crows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    base = 0
    for p in m["parts"]:
        a, b = max(lo, p["lo"]), min(hi, p["hi"])
        if a >= b:
            continue
        files = {key: out / p["files"][key] for key in _DTYPES}
        crow = _open_part(files["crow"], "crow", p["hi"] - p["lo"] + 1)
        col = _open_part(files["col"], "col", p["nnz"])
        val = _open_part(files["val"], "val", p["nnz"])
        if int(crow[0]) != 0 or int(crow[-1]) != p["nnz"]:
            raise ValueError(f"{files['crow']}: offsets must run from 0 to the part's nnz={p['nnz']}")
        seg = np.array(crow[a - p["lo"] : b - p["lo"] + 1], dtype=np.int64)
        if (seg[1:] < seg[:-1]).any():
            raise ValueError(f"{files['crow']}: offsets decrease")
        s, e = int(seg[0]), int(seg[-1])
        c = np.array(col[s:e], dtype=np.int64)
        if c.size and (int(c.min()) < 0 or int(c.max()) >= n_total):
            raise ValueError(f"{files['col']}: column ids outside [0, {n_total})")
        crows.append(seg[1:] - s + base)
        cols.append(c)
        vals.append(np.array(val[s:e], dtype=np.float32))
        base += e - s
    crow_all = np.concatenate([np.zeros(1, dtype=np.int64), *crows])
    return GraphShard(
        lo=lo,
        hi=hi,
        n_total=n_total,
        crow=torch.from_numpy(crow_all),
        col=torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *cols])),
        val=torch.from_numpy(np.concatenate([np.zeros(0, np.float32), *vals])),
    )


# --- propagation --------------------------------------------------------------------------------


class ShardedPropagator:
    """``Â^L`` and Eq. 10 on row-sharded tables: every rank holds ``Â``'s rows ``[lo, hi)`` and
    ``U``'s rows ``[lo, hi)``. Construction and every call are collective.

    Built once per graph: the :class:`~cstwa_dist.distributed.exchange.RowFetcher` for the shard's
    distinct foreign columns, and a local CSR whose columns are remapped into the fetch window
    ``[foreign < lo ‖ own ‖ foreign ≥ hi]`` (global-id order, so every row's terms are summed in the
    same order as in the full graph). Per layer: fetch the foreign rows of the *current* ``U^(l)``
    into the window, then ``U^(l+1)_own = CSR @ window`` (Eq. 9), on ``x_local``'s device.

    Per-rank memory: resident :func:`propagator_memory`, per call :func:`propagation_memory` (with
    Eq. 10, :func:`migrate_memory`); :meth:`memory` reports what was allocated.
    """

    def __init__(
        self, shard: GraphShard, ranges: Sequence[tuple[int, int]], device: torch.device | None = None
    ) -> None:
        rank, size = world()
        self.device = comm_device(device)
        error: BaseException | None = None
        try:
            n_total = check_ranges(ranges, size)
            if (shard.lo, shard.hi, shard.n_total) != (int(ranges[rank][0]), int(ranges[rank][1]), n_total):
                raise ValueError(
                    f"rank {rank}: shard rows [{shard.lo}, {shard.hi}) of {shard.n_total} do not match "
                    f"its range {tuple(ranges[rank])} of {n_total}"
                )
            shard.validate()
        except ValueError as e:
            error = e
        raise_together(error, self.device)
        self.rank = rank
        self.lo, self.hi, self.n_total = shard.lo, shard.hi, shard.n_total
        self.nnz = shard.nnz
        needed = shard.foreign_columns()
        self.fetcher = RowFetcher(ranges, needed, self.device)
        n_own, below = shard.rows, self.fetcher.below
        col = shard.col
        own = (col >= self.lo) & (col < self.hi)
        pos = torch.searchsorted(needed, col)
        local_col = torch.where(own, col - self.lo + below, pos + torch.where(col >= self.hi, n_own, 0))
        self.window_rows = self.fetcher.window_rows()
        self._crow, self._col, self._val = shard.crow, local_col.contiguous(), shard.val
        self._csr: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._held: dict[str, int] = {}
        self.last_stats: dict[str, float] = {}

    def _matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._csr:
            self._csr[key] = torch.sparse_csr_tensor(
                self._crow.to(device),
                self._col.to(device),
                self._val.to(device=device, dtype=dtype),
                size=(self.hi - self.lo, self.window_rows),
                check_invariants=False,  # remapped from a validated shard, order preserved
            )
        return self._csr[key]

    def _csr_bytes(self) -> int:
        """Bytes of the local CSR copies built so far (the CPU master before the first call)."""
        if not self._csr:
            return sum(t.numel() * t.element_size() for t in (self._crow, self._col, self._val))
        return sum(
            t.numel() * t.element_size()
            for m in self._csr.values()
            for t in (m.crow_indices(), m.col_indices(), m.values())
        )

    def _agree(self, error: BaseException | None, layers: int, width: int, dtype: torch.dtype) -> None:
        """One small collective before any fetch: every rank must run the same number of layers on
        tables of the same width and dtype (else the row messages would not match and ranks would
        block), and a bad argument on one rank raises everywhere."""
        rank, size = world()
        if size == 1:
            if error is not None:
                raise error
            return
        code = [int(error is not None), layers, width, zlib.crc32(str(dtype).encode())]
        rows = all_gather_ints(code, self.device)
        if error is not None:
            raise error
        if any(r[0] for r in rows):
            raise RuntimeError(f"rank(s) {[i for i, r in enumerate(rows) if r[0]]} rejected their arguments")
        if len({tuple(r[1:]) for r in rows}) > 1:
            raise ValueError(f"ranks disagree on (layers, width, dtype): {[r[1:] for r in rows]}")

    def _propagate(self, x_local: torch.Tensor, layers: int, error: BaseException | None) -> torch.Tensor:
        if error is None:
            try:
                if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
                    raise ValueError(f"layers must be a non-negative integer, got {layers!r}")
                if not isinstance(x_local, torch.Tensor) or x_local.dim() != 2:
                    raise ValueError(
                        f"x_local must be 2-D [rows, d], got {getattr(x_local, 'shape', x_local)!r}"
                    )
                if x_local.shape[0] != self.hi - self.lo:
                    raise ValueError(
                        f"rank {self.rank}: x_local has {x_local.shape[0]} rows, its range "
                        f"[{self.lo}, {self.hi}) needs {self.hi - self.lo}"
                    )
                if not x_local.is_floating_point():
                    raise ValueError(f"x_local must be floating point, got {x_local.dtype}")
            except ValueError as e:
                error = e
        ok = error is None
        self._agree(
            error,
            layers if ok else -1,
            int(x_local.shape[1]) if ok else -1,
            x_local.dtype if ok else torch.float32,
        )
        if layers == 0:
            return x_local
        w, itemsize = int(x_local.shape[1]), x_local.element_size()
        a = self._matrix(x_local.device, x_local.dtype)
        # Nothing to fetch (one rank, or a graph without foreign columns here): the window would be a
        # copy of the own rows, so multiply them directly; the fetch still runs, to serve the peers.
        direct = self.fetcher.rows_requested == 0
        window = (
            None if direct else torch.empty((self.window_rows, w), dtype=x_local.dtype, device=x_local.device)
        )
        sent0, recv0, comm0 = self.fetcher.bytes_sent, self.fetcher.bytes_received, self.fetcher.comm_s
        t0 = time.perf_counter()
        cur = x_local
        for _ in range(layers):
            if window is None:
                self.fetcher.fetch(cur)
                operand = cur
            else:
                operand = self.fetcher.fetch_window(cur, out=window)
            cur = a @ operand if self.hi > self.lo else x_local.new_zeros((0, w))
        wall = time.perf_counter() - t0
        n_own, f = self.hi - self.lo, self.fetcher.rows_requested
        self._held = {
            "own_rows": n_own * w * itemsize,
            "fetched_rows": f * w * itemsize,
            "window_own_copy": 0 if window is None else n_own * w * itemsize,
            "layer_outputs": min(layers, 2) * n_own * w * itemsize,
            "send_buffers": self.fetcher.max_send_bytes,
            "csr": self._csr_bytes(),
            "ids": self.fetcher.index_bytes(),
        }
        self.last_stats = {
            "layers": layers,
            "seconds": wall,
            "seconds_per_layer": wall / layers,
            "exchange_s": self.fetcher.comm_s - comm0,
            "bytes_sent": self.fetcher.bytes_sent - sent0,
            "bytes_received": self.fetcher.bytes_received - recv0,
        }
        return cur

    def propagate(self, x_local: torch.Tensor, layers: int) -> torch.Tensor:
        """Own rows of ``Â^layers · U`` (Eq. 9) from own rows ``x_local`` ``[hi − lo, d]``.

        ``layers = 0`` returns ``x_local`` unchanged (no copy), like the reference. The graph's values
        are cast to ``x_local``'s dtype (float64 tables in tests); the products run on its device.
        """
        return self._propagate(x_local, layers, None)

    def migrate(self, x_local: torch.Tensor, layers: int, beta: float) -> torch.Tensor:
        """``(1−β)·x + β·Â^L x`` on own rows (Eq. 10); ``β`` is checked before any exchange."""
        error: BaseException | None = None
        try:
            _check_beta(beta)
        except (TypeError, ValueError) as e:
            error = e if isinstance(e, ValueError) else ValueError(str(e))
        return beta_update(x_local, self._propagate(x_local, layers, error), beta)

    def memory(self) -> dict[str, int]:
        """Bytes this rank held in the last :meth:`propagate` (tables) and holds now (CSR, ids).

        Keys: ``own_rows`` (the caller's ``x_local``), ``fetched_rows`` (foreign rows in the window),
        ``window_own_copy``, ``layer_outputs`` (at most two alive), ``send_buffers`` (the largest one),
        ``csr`` (every device/dtype copy), ``ids`` (fetcher lists), ``total``. Before any call the
        table items are 0.
        """
        held = dict(self._held) or {
            "own_rows": 0,
            "fetched_rows": 0,
            "window_own_copy": 0,
            "layer_outputs": 0,
            "send_buffers": 0,
        }
        held["csr"] = self._csr_bytes()
        held["ids"] = self.fetcher.index_bytes()
        held.pop("total", None)
        held["total"] = sum(held.values())
        return held
