"""Sharding dry run (``cstwa-dist plan``): the plan TorchRec makes at a world size, and memory per rank.

Why: a multi-node retrain should fail on paper, not after the job has queued for 64 GPUs. The dry run
builds the model on ``meta`` exactly as training does (registry → ``ModelTrain`` → fused optimizer +
constraints: field tables table-wise, the structure tables ``U``/``I`` row-wise on the FUSED kernel,
:func:`~cstwa_dist.distributed.sharding.prepare_tables`, with the same
:class:`~cstwa_dist.distributed.sharding.RowWiseSharder` and
:func:`~cstwa_dist.distributed.sharding.build_planner`), asks TorchRec's planner for a plan at any
topology without a process group (``plan``, not ``collective_plan``: the planner only does
arithmetic, so a CPU-only machine plans for CUDA nodes), and adds what the planner does not see:

* **embedding bytes per table and rank**: weights plus fused-optimizer state (Adam: 2 x weights;
  row-wise Adagrad: one fp32 per row; none for a never-trained table, reading (b)'s P), from the
  plan's shards;
* **dense parameters**: replicated on every rank, as weights + grads + Adam's two moments = 4 x P;
* **the structure step's peak** per rank, for the row-sharded structure path: graph mining in
  ``pretrain`` and the Structure Migrator in training, assembled in ``structure/estimate.py`` from
  what each step states it allocates (the one source of each formula is the function next to the
  step's code, in ``structure/``).

Those steps and evaluation are also **reserved** (``train/reserves.py``): the planner is given
less capacity by their per-rank bytes, exactly as training's ``shard_model`` is, so that a plan
never hands a step's memory to the tables.

The spec comes from ``planner/specs.py`` and the report is ``planner/render.py``'s. Nothing here
allocates a table: memory is that of the meta model and the planner (well under 1 GB at 30M users),
and planning 64 ranks takes well under a second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cstwa_dist.config import RunConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.sharding import (
    Reserve,
    RowWiseSharder,
    build_planner,
    dense_parameter_bytes,
    prepare_tables,
    resolve_embedding_optimizer,
)
from cstwa_dist.export.weight import export_weights
from cstwa_dist.planner.render import GIB, render_dry_run
from cstwa_dist.planner.specs import resolve_spec, split_rows, synth_spec
from cstwa_dist.planner.verdict import NoPlan, TableDemand
from cstwa_dist.registry import get_model_spec
from cstwa_dist.structure.estimate import (
    NO_STRUCTURE,
    StructureEstimate,
    knn_madds_per_rank,
    mining_structure_estimate,
    structure_sides,
    train_structure_estimate,
)
from cstwa_dist.train.reserves import EVAL_SOURCE, evaluation_rows, mining_device_bytes, step_reserves
from cstwa_dist.train.wrapper import ModelTrain

logger = logging.getLogger(__name__)

# ``resolve_spec`` and ``synth_spec`` live in ``specs.py``; named here too for callers that import the
# dry run's entry points from this module.
__all__ = [
    "DryRun",
    "NoPlan",
    "RankPlan",
    "TablePlan",
    "dry_run",
    "resolve_spec",
    "synth_spec",
    "table_demands",
]


@dataclass(frozen=True)
class TablePlan:
    """One embedding table in the plan; ``bytes`` = weights + fused-optimizer state, all shards."""

    collection: str
    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    bytes: int
    bytes_per_rank: dict[int, int]


@dataclass(frozen=True)
class RankPlan:
    """One rank's memory: embeddings (ours and the planner's storage), dense state, structure step."""

    rank: int
    tables: list[str]
    embedding_bytes: int  # weights + optimizer state of the shards placed here
    plan_hbm: int  # the planner's storage estimate (adds input/output buffers)
    plan_ddr: int
    dense_bytes: int  # weights + grads + Adam moments
    structure_host: int  # the structure step's reserve (SM window or graph mining), host part
    structure_device: int  # and device part
    evaluation_bytes: int  # the evaluation reserve (host memory)
    device_total: int
    host_total: int
    table_capacity: int  # what the planner could give tables here, after every reservation


@dataclass
class DryRun:
    """Everything ``cstwa-dist plan`` prints; ``to_dict`` is the ``--json`` file."""

    model: str
    spec_source: str
    world_size: int
    local_world_size: int
    compute_device: str
    hbm_cap: int  # per device (0 on CPU)
    ddr_cap: int  # per rank
    embedding_optimizer: str
    embedding_optimizer_settings: dict[str, Any]  # kernel, lr, eps (sharding.resolve_embedding_optimizer)
    batch_size: int
    dense_params: int  # bytes of the dense weights (fp32)
    tables: list[TablePlan]
    ranks: list[RankPlan]
    structure: StructureEstimate  # the job's own structure phase (per-rank columns)
    mining: StructureEstimate  # graph mining in `pretrain`, which this job needs first (if it uses graphs)
    knn_madds_per_rank: int  # the configured kNN's multiply-adds on one rank (largest side)
    exact_knn_madds_per_rank: int  # the exact search through the same ring, for comparison
    plan_seconds: float
    plan_text: str
    reserves: list[Reserve]  # what the planner kept from the tables on every rank (train/reserves.py)
    eval_rows: int | None  # rows of the largest evaluated split (None: unknown, not reserved)
    export_line: str = ""  # what `export` would write (cstwa_dist/export/weight.py)

    @property
    def total_embedding_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for t in out["tables"]:
            t["bytes_per_rank"] = {str(r): b for r, b in t["bytes_per_rank"].items()}
        out["total_embedding_bytes"] = self.total_embedding_bytes
        return out

    def render(self) -> str:
        """The plain-text report (tables, ranks, structure step), one string."""
        return render_dry_run(self)


def _optimizer_state_bytes(param: nn.Parameter, rows: int, cols: int, elem: int) -> int:
    """Fused-optimizer state of a ``rows × cols`` shard, from the optimizer ``prepare_tables`` put on
    the table's weight (the attribute TorchRec's sharders read it from too)."""
    opt = getattr(param, "_optimizer_classes", [None])[0]
    if opt is torch.optim.SGD:  # a never-trained table (reading b's P): stateless
        return 0
    if opt is torch.optim.Adam:  # optim.embedding=adam (GPU only)
        return 2 * rows * cols * elem  # FBGEMM fused Adam: two moments per weight
    if opt is RowWiseAdagrad:  # optim.embedding=auto on every device
        return rows * 4  # exact row-wise Adagrad: one fp32 per row
    raise RuntimeError(f"no optimizer-state size known for {opt!r} (prepare_tables puts the optimizers)")


def _tables_from_plan(module: nn.Module, plan: ShardingPlan) -> list[TablePlan]:
    out: list[TablePlan] = []
    for path, ebc in module.named_modules():
        if not isinstance(ebc, EmbeddingBagCollection):
            continue
        module_plan = plan.plan.get(path)
        if module_plan is None:
            raise RuntimeError(f"the plan has no entry for collection {path!r}")
        for conf in ebc.embedding_bag_configs():
            ps = module_plan[conf.name]  # type: ignore[index]
            elem = data_type_to_dtype(conf.data_type).itemsize
            weight = ebc.embedding_bags[conf.name].weight
            per_rank: dict[int, int] = {}
            if ps.sharding_spec is None:  # data-parallel would have no spec (never allowed here)
                raise RuntimeError(f"table {conf.name!r} has no sharding spec ({ps.sharding_type})")
            for shard in ps.sharding_spec.shards:  # type: ignore[union-attr]
                rows, cols = shard.shard_sizes
                rank = shard.placement.rank()  # type: ignore[union-attr]
                b = rows * cols * elem + _optimizer_state_bytes(weight, rows, cols, elem)
                per_rank[rank] = per_rank.get(rank, 0) + b
            out.append(
                TablePlan(
                    collection=path,
                    name=conf.name,
                    rows=conf.num_embeddings,
                    dim=conf.embedding_dim,
                    sharding_type=ps.sharding_type,
                    compute_kernel=ps.compute_kernel,
                    ranks=sorted(ps.ranks or per_rank),
                    bytes=sum(per_rank.values()),
                    bytes_per_rank=per_rank,
                )
            )
    return out


def table_demands(module: nn.Module, row_wise: set[str], world_size: int) -> list[TableDemand]:
    """Every table's bytes (weights + fused-optimizer state) and its smallest share of one rank: a
    row-wise table's ``ceil(rows/W)`` rows, a table-wise table whole. What a failed plan is explained
    with: TorchRec's planner says only that nothing fits, not which table."""
    out: list[TableDemand] = []
    for _, ebc in module.named_modules():
        if not isinstance(ebc, EmbeddingBagCollection):
            continue
        for conf in ebc.embedding_bag_configs():
            elem = data_type_to_dtype(conf.data_type).itemsize
            weight = ebc.embedding_bags[conf.name].weight
            rows, dim = conf.num_embeddings, conf.embedding_dim
            total = rows * dim * elem + _optimizer_state_bytes(weight, rows, dim, elem)
            rw = conf.name in row_wise
            share = -(-rows // world_size) * (total // rows) if rw else total
            out.append(TableDemand(conf.name, rows, dim, "row_wise" if rw else "table_wise", total, share))
    return out


def _planner_storage(planner: EmbeddingShardingPlanner, world_size: int) -> tuple[list[int], list[int]]:
    """Per-rank (HBM, DDR) of the chosen plan, from the planner's sharding options.

    TorchRec keeps them in ``_best_plan`` only (no public accessor in 1.8.0); a missing attribute is
    an error here so that a TorchRec upgrade that moves it fails the tests, not a report silently.
    """
    best = getattr(planner, "_best_plan", None)
    if best is None:
        raise RuntimeError(
            "EmbeddingShardingPlanner._best_plan is missing: update planner/dryrun.py for this TorchRec"
        )
    hbm, ddr = [0] * world_size, [0] * world_size
    for option in best:
        for shard in option.shards:
            hbm[shard.rank] += int(shard.storage.hbm)
            ddr[shard.rank] += int(shard.storage.ddr)
    return hbm, ddr


def _table_capacity(planner: EmbeddingShardingPlanner, world_size: int, cuda: bool) -> list[int]:
    """Per rank, the HBM (GPU ranks) or host memory (CPU ranks) the planner could give the tables
    after its reservation (a share, the dense state, input buffers, the job's reserves).

    Read from the reservation's ``last_reserved_topology``; like ``_best_plan`` the planner keeps its
    reservation in a private attribute, so a TorchRec that moves it fails the tests, not a report.
    """
    reservation = getattr(planner, "_storage_reservation", None)
    topology = getattr(reservation, "last_reserved_topology", None)
    if topology is None:
        raise RuntimeError(
            "EmbeddingShardingPlanner._storage_reservation is missing: update planner/dryrun.py for "
            "this TorchRec"
        )
    out = [0] * world_size
    for device in topology.devices:
        out[device.rank] = int(device.storage.hbm if cuda else device.storage.ddr)
    return out


def dry_run(
    cfg: RunConfig,
    spec: DatasetSpec,
    *,
    model_name: str = "cstwa",
    world_size: int,
    gpus_per_node: int = 0,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    spec_source: str = "",
    rows_per_split: dict[str, int] | None = None,
    reserve_steps: bool = True,
) -> DryRun:
    """Plans ``model_name`` for ``world_size`` ranks without a process group and estimates memory.

    ``gpus_per_node > 0`` plans CUDA ranks (local world size = GPUs per node), else CPU ranks on one
    node. ``hbm_gb`` (GiB per GPU) and ``ddr_gb`` (GiB per rank) default to TorchRec's 32 and 128.
    Raises :class:`~cstwa_dist.planner.verdict.NoPlan` (a ``ValueError``) with every table's demand
    when TorchRec's planner finds no plan, so that the verdict can say which table does not fit where;
    a plan that exists but leaves ranks over their caps is returned (``verdict.judge`` says so).

    The planner plans with the job's reserves taken off every rank (``train/reserves.py``), as
    training does; ``reserve_steps=False`` plans without them (to show what they cost).
    ``rows_per_split`` (rows per split) sizes the evaluation reserve; by default
    :func:`~cstwa_dist.planner.specs.split_rows` of ``spec`` and ``cfg.data.dataset``.
    """
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    if gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if gpus_per_node and world_size % gpus_per_node:
        raise ValueError(f"--world-size {world_size} is not a multiple of --gpus-per-node {gpus_per_node}")
    for name, v in (("--hbm-gb", hbm_gb), ("--ddr-gb", ddr_gb)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if hbm_gb is not None and not gpus_per_node:
        # a cap that would be silently ignored: CPU ranks keep their tables in host memory
        raise ValueError(
            f"--hbm-gb {hbm_gb} applies to GPU ranks: add --gpus-per-node G, or cap CPU ranks' host memory "
            "with --ddr-gb"
        )
    compute_device = "cuda" if gpus_per_node else "cpu"
    local_world_size = gpus_per_node or world_size
    hbm_cap = (int(hbm_gb * GIB) if hbm_gb is not None else HBM_CAP) if compute_device == "cuda" else 0
    ddr_cap = int(ddr_gb * GIB) if ddr_gb is not None else DDR_CAP

    mspec = get_model_spec(model_name)
    cuda = compute_device == "cuda"
    emb_opt = resolve_embedding_optimizer(cfg.optim, torch.device(compute_device))
    own = mspec.settings_in(cfg)  # the model's own settings (models.<name>), as training builds it
    model = mspec.build(spec, cfg.model, torch.device("meta"), structure=cfg.structure, settings=own)
    module = ModelTrain(model, mspec.build_loss(cfg.loss, cfg.model, settings=own))
    tables = mspec.structure_tables(cfg.model, cfg.structure, settings=own)
    constraints = prepare_tables(module, cfg.optim, emb_opt, tables)

    # the structure steps (they depend on the model, not on the plan) and the reserves they make
    train_sides, mine_sides = structure_sides(model, model_name, spec, cfg)
    mining = mining_structure_estimate(
        mine_sides if train_sides or mspec.representation_source else [], world_size, cfg.structure
    )
    if train_sides:
        structure = train_structure_estimate(
            train_sides, world_size, on_device=cuda, layers=cfg.structure.layers
        )
    elif mspec.representation_source is not None:
        structure = mining
    else:
        structure = NO_STRUCTURE
    rows = rows_per_split if rows_per_split is not None else split_rows(spec, cfg.data.dataset)
    eval_rows = evaluation_rows(cfg, rows) if rows is not None else None
    mines = structure is mining and mining.phase == "pretrain"
    reserves = (
        step_reserves(
            compute_device=compute_device,
            world_size=world_size,
            structure=structure if structure.phase == "train" else NO_STRUCTURE,
            mining=mining if mines else None,
            mining_device=mining_device_bytes(mine_sides, world_size, cfg) if mines and cuda else 0,
            eval_rows=eval_rows,
        )
        if reserve_steps
        else []
    )
    planner = build_planner(
        module,
        constraints,
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap_bytes=hbm_cap if cuda else None,
        ddr_cap_bytes=ddr_cap,
        reserves=reserves,
    )
    t0 = time.perf_counter()
    try:
        plan = planner.plan(module, [RowWiseSharder()])
    except PlannerError as e:
        raise NoPlan(
            world_size=world_size,
            local_world_size=local_world_size,
            compute_device=compute_device,
            hbm_cap=hbm_cap,
            ddr_cap=ddr_cap,
            reason=e.error_type.value.replace("_", " "),
            demands=table_demands(module, {t.table for t in tables}, world_size),
            dense_state=4 * dense_parameter_bytes(module),
            reserves=reserves,
            planner_message=str(e),
        ) from None
    seconds = time.perf_counter() - t0
    logger.info("planned %s for %d %s ranks in %.2fs", model_name, world_size, compute_device, seconds)

    tables = _tables_from_plan(module, plan)
    hbm, ddr = _planner_storage(planner, world_size)
    dense_params = dense_parameter_bytes(module)
    dense_state = 4 * dense_params  # weights + grads + Adam exp_avg + exp_avg_sq
    capacity = _table_capacity(planner, world_size, cuda)
    # the structure step's figures are those of its reserve (planned without reserves: the estimate)
    step = next((x for x in reserves if x.source != EVAL_SOURCE), None)
    evaluation = next((x for x in reserves if x.source == EVAL_SOURCE), None)

    ranks: list[RankPlan] = []
    for r in range(world_size):
        emb = sum(t.bytes_per_rank.get(r, 0) for t in tables)
        if step is not None:
            s_host, s_device = step.host(r), step.hbm
        else:
            s_host = structure.host_rank0 if r == 0 else structure.host_other
            s_device = structure.device if cuda else 0
        ev = 0 if evaluation is None else evaluation.host(r)
        if cuda:
            device_total = hbm[r] + dense_state + s_device
            host_total = ddr[r] + s_host + ev
        else:
            device_total = 0
            host_total = ddr[r] + dense_state + s_host + ev
        ranks.append(
            RankPlan(
                rank=r,
                tables=[t.name for t in tables if r in t.bytes_per_rank],
                embedding_bytes=emb,
                plan_hbm=hbm[r],
                plan_ddr=ddr[r],
                dense_bytes=dense_state,
                structure_host=s_host,
                structure_device=s_device,
                evaluation_bytes=ev,
                device_total=device_total,
                host_total=host_total,
                table_capacity=capacity[r],
            )
        )
    knn = max(mine_sides, key=lambda s: s.entities)
    madds, exact_madds = (
        knn_madds_per_rank(knn, world_size, cfg.structure) if mining.phase != "none" else (0, 0)
    )
    return DryRun(
        model=model_name,
        spec_source=spec_source,
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap=hbm_cap,
        ddr_cap=ddr_cap,
        embedding_optimizer=emb_opt.name,
        embedding_optimizer_settings=emb_opt.to_dict(),
        batch_size=cfg.data.batch_size,
        dense_params=dense_params,
        tables=tables,
        ranks=ranks,
        structure=structure,
        mining=mining,
        knn_madds_per_rank=madds,
        exact_knn_madds_per_rank=exact_madds,
        plan_seconds=seconds,
        plan_text=str(plan),
        reserves=reserves,
        eval_rows=eval_rows,
        export_line=export_weights(model_name, cfg, spec).line(),
    )
