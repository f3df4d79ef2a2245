"""What a job's steps need on every rank besides the tables: the reserves kept from TorchRec's planner.

Why: the planner fills whatever capacity its topology offers with tables. Three steps allocate on
the same ranks later and would find the memory taken: the Structure Migrator's per-epoch window
(training a model with structure tables), graph mining's Faiss index and its temporary memory (the
pre-training job that mines), and every evaluation pass. Each reserve is that step's own figure,
asked from the function that states it, never a copy of its formula:

* structure migrator: :func:`~cstwa_dist.structure.estimate.train_structure_estimate` (itself the sum
  of ``sharded_graph.propagator_memory``/``migrate_memory`` and ``readout.readout_memory``);
* graph mining: :func:`~cstwa_dist.structure.estimate.mining_structure_estimate` on the host, and on
  GPU ranks :func:`~cstwa_dist.structure.faiss_memory.knn_device_memory` (the IVF lists moved to the
  GPU and Faiss's temporary memory);
* evaluation: :func:`~cstwa_dist.distributed.ranking.evaluation_bytes_per_rank` for the largest split
  a pass reads, host memory on every device (the pass holds its columns in numpy).

:func:`job_reserves` is what training's ``shard_model`` and the dry run both plan with.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from cstwa_dist.config import RunConfig
from cstwa_dist.data.spec import DatasetSpec, dataset_split_rows
from cstwa_dist.distributed.ranking import evaluation_bytes_per_rank
from cstwa_dist.distributed.sharding import Reserve
from cstwa_dist.registry import get_model_spec
from cstwa_dist.structure.estimate import (
    NO_STRUCTURE,
    StructureEstimate,
    StructureSide,
    mining_structure_estimate,
    structure_sides,
    train_structure_estimate,
)
from cstwa_dist.structure.faiss_memory import knn_device_memory
from cstwa_dist.structure.memory import total_bytes
from cstwa_dist.structure.migrator import ivf_params

__all__ = ["evaluation_rows", "job_reserves", "mining_device_bytes", "step_reserves"]

SM_SOURCE = "structure.estimate.train_structure_estimate"
MINING_SOURCE = "structure.estimate.mining_structure_estimate + structure.faiss_memory.knn_device_memory"
EVAL_SOURCE = "distributed.ranking.evaluation_bytes_per_rank"


def evaluation_rows(cfg: RunConfig, rows: Mapping[str, int]) -> int:
    """Rows of the largest split one evaluation pass reads: the test split (``train.eval_split``) and,
    with ``validate_every_epoch``, the validation split (passes run one at a time)."""
    splits = {cfg.train.eval_split} | ({"val"} if cfg.train.validate_every_epoch else set())
    return max(int(rows.get(s, 0)) for s in splits)


def mining_device_bytes(sides: list[StructureSide], world_size: int, cfg: RunConfig) -> int:
    """Graph mining's device memory on a GPU rank: the larger side's
    :func:`~cstwa_dist.structure.faiss_memory.knn_device_memory` (sides are mined one at a time)."""
    return max(
        (
            total_bytes(
                knn_device_memory(
                    ivf_params(cfg.structure),
                    s.entities,
                    s.rows_per_rank(world_size),
                    s.width,
                    min(s.k, s.entities),
                )
            )
            for s in sides
        ),
        default=0,
    )


def step_reserves(
    *,
    compute_device: str,
    world_size: int,
    structure: StructureEstimate,
    mining: StructureEstimate | None,
    mining_device: int,
    eval_rows: int | None,
) -> list[Reserve]:
    """The reserves from the steps' figures: ``structure`` (the training job's SM phase, or
    ``NO_STRUCTURE``), ``mining`` (when this job mines; ``mining_device`` its GPU bytes) and
    ``eval_rows`` (``None``: unknown, nothing reserved; the report says so)."""
    cuda = compute_device == "cuda"
    out: list[Reserve] = []
    if structure.phase == "train":
        out.append(
            Reserve(
                name="structure migrator (epoch window)",
                hbm=structure.device if cuda else 0,
                ddr=structure.host_other,
                ddr_rank0=structure.host_rank0,
                source=SM_SOURCE,
            )
        )
    if mining is not None and mining.phase == "pretrain":
        out.append(
            Reserve(
                name="graph mining (Faiss index + temp)" if cuda else "graph mining (Faiss index)",
                hbm=mining_device if cuda else 0,
                ddr=mining.host_other,
                ddr_rank0=mining.host_rank0,
                source=MINING_SOURCE,
            )
        )
    if eval_rows is not None:
        b = evaluation_bytes_per_rank(eval_rows, world_size)
        # host memory on every device: the pass keeps its columns in numpy (distributed/ranking.py)
        # and moves only each collective's buffer to the communication device
        out.append(Reserve(name="evaluation", hbm=0, ddr=b, ddr_rank0=b, source=EVAL_SOURCE))
    return out


def job_reserves(
    cfg: RunConfig,
    model_name: str,
    spec: DatasetSpec,
    model: nn.Module,
    *,
    world_size: int,
    compute_device: str,
    dataset: str | Path | None = None,
    rows_per_split: Mapping[str, int] | None = None,
) -> list[Reserve]:
    """The reserves of training ``model_name`` (``model`` as built, on ``meta`` or not) on
    ``world_size`` ranks of ``compute_device``: what ``shard_model(..., reserves=...)`` takes.
    ``dataset`` (default ``cfg.data.dataset``) sizes the evaluation reserve from its ``stats.json``
    (``rows_per_split``, when given, instead: the dry run's sizes for a data set not written yet)."""
    mspec = get_model_spec(model_name)
    train_sides, mine_sides = structure_sides(model, model_name, spec, cfg)
    cuda = compute_device == "cuda"
    structure = (
        train_structure_estimate(train_sides, world_size, on_device=cuda, layers=cfg.structure.layers)
        if train_sides
        else None
    )
    mines = mspec.representation_source is not None and not train_sides
    mining = mining_structure_estimate(mine_sides, world_size, cfg.structure) if mines else None
    if rows_per_split is None:
        rows_per_split = dataset_split_rows(spec, dataset if dataset is not None else cfg.data.dataset)
    rows = rows_per_split
    return step_reserves(
        compute_device=compute_device,
        world_size=world_size,
        structure=structure or NO_STRUCTURE,
        mining=mining,
        mining_device=mining_device_bytes(mine_sides, world_size, cfg) if mines and cuda else 0,
        eval_rows=evaluation_rows(cfg, rows) if rows is not None else None,
    )
