"""The Structure Migrator's trainer-side steps, for any model that declares structure tables.

``initialise``: ``U ← [r_u^cvr]_u`` (Eq. 8) from the model's CVR field tables, written into the
(sharded) trainable ``U``/``I`` tables. ``epoch_boundary``: ``U ← (1−β)·U + β·Â^L U`` (Eq. 9–10),
read from and written back into the live tables. ``mine_structure``: representations of the
pre-trained CTR model → exact kNN graph → normalised ``Â`` saved for training runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel

from cstwa_dist.config import StructureConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.distributed.sharding import submodule
from cstwa_dist.distributed.tables import read_full_table, write_full_table
from cstwa_dist.registry import StructureTable
from cstwa_dist.structure.graph import build_graph, load_graph, save_graph
from cstwa_dist.structure.profiles import entity_profiles
from cstwa_dist.structure.propagate import structure_migrate
from cstwa_dist.structure.readout import side_representations

logger = logging.getLogger(__name__)


def graph_path(graph_dir: str | Path, side: str) -> Path:
    return Path(graph_dir) / f"{side}_graph.pt"


class StructureMigrator:
    """Initialises and smooths a model's structure tables; holds the graphs and entity profiles."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        tables: list[StructureTable],
        spec: DatasetSpec,
        dataset: str,
        cfg: StructureConfig,
        env: DistEnv,
    ) -> None:
        self.dmp, self.tables, self.spec, self.cfg, self.env = dmp, tables, spec, cfg, env
        self.graphs: dict[str, torch.Tensor] = {}
        self.profiles: dict[str, np.ndarray] = {}
        for side in sorted({t.side for t in tables}):
            path = graph_path(cfg.graph_dir, side)
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found: this model needs the {side} graph; run `cstwa-dist pretrain` "
                    f"with the same config first (structure.graph_dir={cfg.graph_dir})"
                )
            g = load_graph(path)
            n = spec.num_users if side == "user" else spec.num_items
            if tuple(g.shape) != (n, n):
                raise ValueError(f"{path} is {tuple(g.shape)} but the dataset has {n} {side}s")
            self.graphs[side] = g
            self.profiles[side] = entity_profiles(dataset, spec, side)[0]

    def initialise(self) -> None:
        """Eq. 8: every entity's row of ``U``/``I`` = its CVR field embeddings, concatenated."""
        for t in self.tables:
            reps = side_representations(
                submodule(self.dmp, t.init_from), self.spec, t.side, self.profiles[t.side], self.env
            )
            write_full_table(submodule(self.dmp, t.collection), t.table, reps)
            logger.info(
                "structure migrator: initialised %s from %s (%s)", t.table, t.init_from, tuple(reps.shape)
            )

    def epoch_boundary(self, epoch: int) -> float:
        """Eq. 9–10 on every structure table; returns the seconds it took."""
        t0 = time.perf_counter()
        for t in self.tables:
            ebc = submodule(self.dmp, t.collection)
            cur = read_full_table(ebc, t.table, self.env.device).cpu()
            new = structure_migrate(self.graphs[t.side], cur, self.cfg.layers, self.cfg.beta)
            write_full_table(ebc, t.table, new)
            logger.info(
                "epoch %d: %s ← (1−%.2f)·U + %.2f·Â^%d U, mean |Δ| %.3g",
                epoch,
                t.table,
                self.cfg.beta,
                self.cfg.beta,
                self.cfg.layers,
                float((new - cur).abs().mean()),
            )
        return time.perf_counter() - t0


def mine_structure(
    dmp: DistributedModelParallel,
    source: str,
    spec: DatasetSpec,
    dataset: str,
    cfg: StructureConfig,
    env: DistEnv,
) -> dict[str, dict[str, float]]:
    """Representations from the pre-trained tables → kNN graphs → ``Â`` files in ``cfg.graph_dir``.

    Every rank takes part in the read-out (a collective); rank 0 builds and writes the graphs (exact
    Faiss search: the reference path; the distributed IVF path is a separate issue).
    """
    out_dir = Path(cfg.graph_dir)
    report: dict[str, dict[str, float]] = {}
    embeddings = submodule(dmp, source)
    for side in ("user", "item"):
        profiles, seen = entity_profiles(dataset, spec, side)
        reps = side_representations(embeddings, spec, side, profiles, env)
        if env.is_main:
            t0 = time.perf_counter()
            a_hat = build_graph(reps.numpy(), cfg.k, progress=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            save_graph(graph_path(out_dir, side), a_hat)
            np.save(out_dir / f"{side}_representations.npy", reps.numpy())
            report[side] = {
                "entities": float(reps.shape[0]),
                "seen_in_data": float(seen.sum()),
                "width": float(reps.shape[1]),
                "k": float(cfg.k),
                "nnz": float(a_hat.values().numel()),
                "seconds": time.perf_counter() - t0,
            }
            logger.info(
                "%s graph: %d nodes, %d edges, %.1fs → %s",
                side,
                reps.shape[0],
                a_hat.values().numel(),
                report[side]["seconds"],
                graph_path(out_dir, side),
            )
    if dist.is_initialized():
        dist.barrier()
    return report
