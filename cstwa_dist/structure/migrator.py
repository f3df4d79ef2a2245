"""The Structure Migrator's trainer-side steps, row-sharded end to end (docs/method.md §1–2).

Every rank works on the entities of its own row block and nothing of size ``N`` exists anywhere:

* ``mine_structure`` (after pre-training): this rank's entity profiles (``data/entities.py``, read
  shard-wise) → its rows' representations (a collective read-out of the pre-trained tables) →
  distributed IVF kNN (``structure/ivf.py``: the rows stay put, query blocks travel on a ring) →
  its rows of ``Â`` (Eq. 4–5, neighbour degrees fetched, ``structure/sharded_graph.py``) → one graph
  part per rank plus a manifest. The blocks are ``even_ranges(N, W)``.
* ``StructureMigrator.initialise`` (Eq. 8): ``U``/``I`` are row-wise sharded tables
  (``distributed/sharding.py``); each rank writes its own block: the id slot keeps the table's own
  random start, the other side fields' CVR embeddings are read out for the block's profiles.
* ``StructureMigrator.epoch_boundary`` (Eq. 9–10): each rank reads its block of the live table (a
  view, no copy of the table), propagates ``L`` layers fetching only the foreign neighbour rows each
  layer needs, and writes ``(1−β)·U + β·U^(L)`` back into its block, on the rank's device.
* ``structure.sm_init=pretrained`` (reading a): ``initialise`` copies the block's rows of the
  pre-trained representations the graph was mined from instead of Eq. 8. ``mine_structure`` saves
  them as one part per rank plus a manifest (``<graph_dir>/<side>_representations/``,
  :func:`save_representations`); a rank reads only rows ``[lo, hi)``, from the parts that overlap
  them (:func:`representation_rows`), so pretrain and train may run on different world sizes.
* ``structure.sm_reading=recomputed`` (reading b, docs/method.md §2): ``initialise`` and every
  ``epoch_boundary`` recompute, for the block, ``R`` from the live field tables (the read-out Eq. 8
  uses, every field of the side, id included), propagate it ``L`` layers like reading (a), and store
  ``P = Â^L R`` in the block. The model adds ``β·P`` detached, so ``P`` changes only here.

The training blocks are the table's row-wise shards (TorchRec's), which need not match the blocks the
graph was mined with: graph parts are read by row range (``load_graph_rows``), so pretrain and train
may run on different world sizes.

**Optimizer state of moved rows (decision).** The β update is not a gradient step: the fused
optimizer's per-row state (row-wise Adagrad's sum of squared gradients, Adam's moments) describes the
gradients a row has seen, and stays as it is. A row's next updates therefore keep the step size its
history earned; resetting the state would give every smoothed row a burst of large steps.

**Per-rank memory.** Nothing of size ``N`` in either reading: every rank holds its block's rows
and the foreign rows it fetches or serves. Each step states its own figure next to its code, and
``cstwa-dist plan`` adds them up: mining is ``readout.readout_memory`` + ``ivf.knn_memory`` (rank 0
also the quantizer's training sample) + ``sharded_graph.shard_build_memory``; training is
``sharded_graph.propagator_memory`` (resident) + ``sharded_graph.migrate_memory`` (an epoch
boundary, its mixing ``propagate.beta_update_memory``) and, at initialisation, ``readout_memory``
(``sm_init=pretrained``: the block's rows of the representation parts instead, ``n_r·w·4`` B). Reading (b)
reads ``R`` out at every boundary too (on the host, and once more on the table's device) and
propagates it like reading (a); ``P`` is written in place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel

from cstwa_dist.config import ConfigError, StructureConfig
from cstwa_dist.data.entities import read_entity_rows
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.distributed.exchange import (
    all_reduce_ints,
    comm_device,
    raise_together,
)
from cstwa_dist.distributed.sharding import submodule
from cstwa_dist.distributed.tables import local_rows
from cstwa_dist.registry import StructureTable
from cstwa_dist.structure.ivf import IVFParams, distributed_knn, even_ranges
from cstwa_dist.structure.readout import side_representations
from cstwa_dist.structure.representations import (
    _representation_rows,
    read_representation_manifest,
    save_representations,
)
from cstwa_dist.structure.sharded_graph import (
    ShardedPropagator,
    graph_rows,
    load_graph_rows,
    save_graph_shard,
    shard_from_knn,
)

logger = logging.getLogger(__name__)


def _num_entities(spec: DatasetSpec, side: str) -> int:
    return spec.num_users if side == "user" else spec.num_items


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StructureMigrator:
    """Initialises and smooths (reading a) or recomputes (reading b) a model's row-sharded structure
    tables over this rank's graph rows; ``cfg.sm_reading`` and ``cfg.sm_init`` choose (docs/method.md
    §2). Every method is collective: all ranks call it, in the same order."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        tables: list[StructureTable],
        spec: DatasetSpec,
        dataset: str,
        cfg: StructureConfig,
        env: DistEnv,
    ) -> None:
        self.dmp, self.tables, self.spec, self.dataset, self.cfg, self.env = (
            dmp,
            tables,
            spec,
            dataset,
            cfg,
            env,
        )
        self.propagators: dict[str, ShardedPropagator] = {}
        self.recomputed = cfg.sm_reading == "recomputed"
        for t in tables:
            if self.recomputed and not t.reads_id:
                raise ValueError(
                    f"{t.table}: structure.sm_reading=recomputed reads R out of every field of the "
                    f"{t.side} side, but {t.init_from} lacks the id table (build the model with the "
                    "same structure section: registry.ModelSpec.build(..., structure=cfg.structure))"
                )
            n = _num_entities(spec, t.side)
            try:
                rows = graph_rows(cfg.graph_dir, t.side)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"the {t.side} graph is not found ({e}): this model needs it; run `cstwa-dist "
                    f"pretrain` with the same config first (structure.graph_dir={cfg.graph_dir})"
                ) from None
            if rows != n:
                raise ValueError(
                    f"the {t.side} graph in {cfg.graph_dir} has {rows} rows but the dataset has {n} "
                    f"{t.side}s: it was mined from another dataset; run `cstwa-dist pretrain` again"
                )
            ranges, _ = local_rows(submodule(dmp, t.collection), t.table)
            lo, hi = ranges[env.rank]
            shard = load_graph_rows(cfg.graph_dir, t.side, lo, hi)
            self.propagators[t.table] = ShardedPropagator(shard, ranges, comm_device())
            logger.info(
                "structure migrator: %s rows [%d, %d) of %d, %d graph entries, %s",
                t.table,
                lo,
                hi,
                n,
                int(shard.val.numel()),
                {k: f"{v / 2**20:.1f} MiB" for k, v in self.propagators[t.table].memory().items()},
            )

    def initialise(self) -> None:
        """Eq. 8 on this rank's block: ``U[u] = [id slot ‖ CVR embeddings of u's other side fields]``.

        The id slot keeps the row's random start (the structure table is drawn with the bound of the
        CVR id table it stands in for: both have one row per entity); reading out the side fields is a
        collective, so every rank runs it even for an empty block. A table whose ``init_from`` holds the
        id table too (``reads_id``: shared tables) is read out whole. ``sm_init=pretrained``: the
        pre-trained rows instead. Reading (b): ``P = Â^L R`` (``recompute``).
        """
        if self.recomputed:
            self.recompute(0)
            return
        if self.cfg.sm_init == "pretrained":
            self._initialise_pretrained()
            return
        d = None
        for t in self.tables:
            ebc = submodule(self.dmp, t.collection)
            ranges, own = local_rows(ebc, t.table)
            lo, hi = ranges[self.env.rank]
            fields = self.spec.side_fields(t.side)
            d = own.shape[1] // len(fields)
            if not hasattr(self.dmp.module.model, t.init_from):
                logger.info(
                    "structure migrator: %s has no side fields besides the id; rows keep their start", t.side
                )
                continue
            profiles, _ = read_entity_rows(self.dataset, self.spec, t.side, lo, hi)
            reps = side_representations(
                submodule(self.dmp, t.init_from), self.spec, t.side, profiles, ranges, self.env
            )
            start = 0 if t.reads_id else d  # the id slot keeps its start unless the source has the id
            if reps.shape[1] != own.shape[1] - start:
                raise ValueError(f"{t.table}: {reps.shape[1]} side columns for a row of width {own.shape[1]}")
            with torch.no_grad():
                own[:, start:] = reps.to(device=own.device, dtype=own.dtype)
            logger.info(
                "structure migrator: initialised %s rows [%d, %d) from %s", t.table, lo, hi, t.init_from
            )

    def _initialise_pretrained(self) -> None:
        """``U[u] = r_u`` of the pre-trained CTR model (the vectors the graph was mined from), read
        from the parts under ``<graph_dir>/<side>_representations/`` that overlap this rank's rows.

        A bad or missing part concerns only the ranks whose rows it holds, so the read is followed by
        ``raise_together``: every rank raises (the reader's error names the file), none is left
        waiting in the next collective. Per-rank memory: the block's rows, ``n_r·w·4`` B.
        """
        for t in self.tables:
            ranges, own = local_rows(submodule(self.dmp, t.collection), t.table)
            lo, hi = ranges[self.env.rank]
            block, error = None, None
            try:
                block = pretrained_rows(
                    self.cfg, t.side, _num_entities(self.spec, t.side), lo, hi, own.shape[1]
                )
            except (OSError, ValueError) as e:
                error = e
            raise_together(error, comm_device())
            assert block is not None
            with torch.no_grad():
                own.copy_(block.to(device=own.device, dtype=own.dtype))
            logger.info(
                "structure migrator: initialised %s rows [%d, %d) from the pre-trained %s representations",
                t.table,
                lo,
                hi,
                t.side,
            )

    def recompute(self, epoch: int) -> float:
        """Reading (b) on this rank's block of every structure table: ``P = Â^L R``, ``R`` read out of
        the live field tables (``t.init_from``, every field of the side), written in place; returns
        the seconds it took. ``epoch`` 0 is the initialisation."""
        t0 = time.perf_counter()
        for t in self.tables:
            ranges, own = local_rows(submodule(self.dmp, t.collection), t.table)
            lo, hi = ranges[self.env.rank]
            profiles, _ = read_entity_rows(self.dataset, self.spec, t.side, lo, hi)
            reps = side_representations(
                submodule(self.dmp, t.init_from), self.spec, t.side, profiles, ranges, self.env
            )
            del profiles
            if reps.shape[1] != own.shape[1]:  # the same on every rank: all raise together
                raise ValueError(f"{t.table}: R has width {reps.shape[1]}, the table {own.shape[1]}")
            with torch.no_grad():
                r = reps.to(device=own.device, dtype=torch.float32)
                del reps
                p = self.propagators[t.table].propagate(r, self.cfg.layers)
                change = _mean_abs_change(p, own.detach().to(torch.float32), self.env)
                own.copy_(p.to(dtype=own.dtype))
            logger.info(
                "%s: %s ← Â^%d R, R read out of %s (x = (1−%.2f)·r + %.2f·P), mean |ΔP| %.3g",
                "initialisation" if epoch == 0 else f"epoch {epoch}",
                t.table,
                self.cfg.layers,
                t.init_from,
                self.cfg.beta,
                self.cfg.beta,
                change,
            )
        return time.perf_counter() - t0

    def epoch_boundary(self, epoch: int) -> float:
        """Eq. 9–10 on this rank's block of every structure table (reading b: ``recompute``);
        returns the seconds it took."""
        if self.recomputed:
            return self.recompute(epoch)
        t0 = time.perf_counter()
        for t in self.tables:
            _, own = local_rows(submodule(self.dmp, t.collection), t.table)
            prop = self.propagators[t.table]
            with torch.no_grad():
                cur = own.detach().to(torch.float32)
                new = prop.migrate(cur, self.cfg.layers, self.cfg.beta)
                change = _mean_abs_change(new, cur, self.env)
                own.copy_(new.to(dtype=own.dtype))
            logger.info(
                "epoch %d: %s ← (1−%.2f)·U + %.2f·Â^%d U, mean |Δ| %.3g",
                epoch,
                t.table,
                self.cfg.beta,
                self.cfg.beta,
                self.cfg.layers,
                change,
            )
        return time.perf_counter() - t0


def _mean_abs_change(new: torch.Tensor, old: torch.Tensor, env: DistEnv) -> float:
    """Mean ``|new − old|`` per element over every rank's block (the log line of both readings): the
    block's sum and row count travel in one collective (all ranks call it)."""
    stats = torch.tensor(
        [float((new - old).abs().sum()), float(new.shape[0])], dtype=torch.float64, device=comm_device()
    )
    if dist.is_initialized() and env.world_size > 1:
        dist.all_reduce(stats)
    return float(stats[0]) / max(float(stats[1]) * new.shape[1], 1.0)


def pretrained_rows(cfg: StructureConfig, side: str, n: int, lo: int, hi: int, width: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the pre-trained ``side`` representations under ``cfg.graph_dir`` (float32,
    read from the parts that overlap them: :func:`representation_rows`). Raises FileNotFoundError when
    ``pretrain`` did not save them (or saved the old single-file layout), ValueError when they have
    another ``N`` than the dataset's ``n`` or a part is bad, and ConfigError when their width is not
    the structure table's ``width``. Per-rank memory: the ``(hi − lo)·width·4`` B returned."""
    try:
        out, m = read_representation_manifest(cfg.graph_dir, side)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"structure.sm_init=pretrained: {e}; or use structure.sm_init=fields"
        ) from None
    path = out / "manifest.json"
    if m["n_total"] != n:
        raise ValueError(
            f"{path} lists {m['n_total']} rows but the dataset has {n} {side}s: mined from other data; run "
            "`cstwa-dist pretrain` again with this dataset"
        )
    if m["width"] != width:
        raise ConfigError(
            f"{path} has width {m['width']} but the {side} structure table's rows have width {width} "
            f"(fields of the side × model.embedding_dim): pre-training used another embedding_dim or "
            "field set; run `cstwa-dist pretrain` again with this config, or use structure.sm_init=fields"
        )
    return torch.from_numpy(_representation_rows(out, m, lo, hi, verify=True))


def ivf_params(cfg: StructureConfig, seed: int = 0) -> IVFParams:
    """The kNN search ``pretrain`` runs, from the ``structure`` config section."""
    return IVFParams(nlist=cfg.nlist, nprobe=cfg.nprobe, pq_m=cfg.pq_m, exact=cfg.knn == "exact", seed=seed)


def mine_structure(
    dmp: DistributedModelParallel,
    source: str,
    spec: DatasetSpec,
    dataset: str,
    cfg: StructureConfig,
    env: DistEnv,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Representations of the pre-trained tables → distributed kNN → ``Â`` parts in ``cfg.graph_dir``.

    Every rank calls it (the read-out, the kNN ring and the degree exchange are collective) and
    writes its own graph part; rank 0 writes each side's manifest last. Returns the report rank 0
    writes to ``structure.json`` (sizes, recall@k, timings).
    """
    out_dir = Path(cfg.graph_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    embeddings = submodule(dmp, source)
    params = ivf_params(cfg, seed)
    comm = comm_device()
    for side in ("user", "item"):
        t0 = time.perf_counter()
        n = _num_entities(spec, side)
        ranges = even_ranges(n, env.world_size)
        lo, hi = ranges[env.rank]
        profiles, seen = read_entity_rows(dataset, spec, side, lo, hi)
        reps = side_representations(embeddings, spec, side, profiles, ranges, env).numpy()
        t_read = time.perf_counter() - t0
        knn = distributed_knn(reps, ranges, cfg.k, params, recall_queries=cfg.recall_queries, device=comm)
        t_knn = time.perf_counter() - t0 - t_read
        shard = shard_from_knn(knn.scores, knn.indices, ranges, comm)
        meta = {
            "k": knn.k,
            "knn": cfg.knn,
            "nlist": knn.nlist,
            "nprobe": knn.nprobe,
            "pq_m": cfg.pq_m,
            "recall_at_k": knn.recall,
            "recall_queries": knn.recall_queries,
            "width": int(reps.shape[1]),
        }
        save_graph_shard(out_dir, side, shard, ranges, meta)
        if cfg.save_representations:
            save_representations(out_dir, side, reps, ranges)
        nnz, seen_total = all_reduce_ints([int(shard.val.numel()), int(seen.sum())], comm)
        report[side] = {
            "entities": n,
            "seen_in_data": seen_total,
            "width": int(reps.shape[1]),
            "k": knn.k,
            "knn": cfg.knn,
            "nlist": knn.nlist,
            "nprobe": knn.nprobe,
            "recall_at_k": knn.recall,
            "recall_queries": knn.recall_queries,
            "nnz": nnz,
            "ranks": env.world_size,
            "read_out_s": t_read,
            "knn_s": t_knn,
            "knn_timings_rank0": knn.timings,
            "seconds": time.perf_counter() - t0,
        }
        logger.info(
            "%s graph: %d nodes, %d edges, recall@%d %s, %.1fs → %s",
            side,
            n,
            nnz,
            knn.k,
            "n/a" if knn.recall is None else f"{knn.recall:.4f}",
            report[side]["seconds"],
            out_dir / f"{side}_graph",
        )
    _barrier()
    return report
