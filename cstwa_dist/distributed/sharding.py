"""DistributedModelParallel wrapping: sharding plan, fused embedding optimizer, dense optimizer.

The CTR, CVR and structure embedding collections are separate ``EmbeddingBagCollection``s, each
sharded by the planner under explicit constraints (the planner never chooses a sharding type alone):

* **Field tables: table-wise.** Available on CPU and GPU, and never data-parallel (replicated tables
  would take the dense optimizer and a full all-reduce every step).
* **Structure tables (``U``/``I``, one row per entity): row-wise, FUSED kernel.** Every rank owns a
  contiguous block of entities, which is exactly the block the row-sharded structure step
  (``structure/migrator.py``) reads, smooths and writes back in place. The kernel is constrained to
  ``fused`` (weights in device memory; host memory on CPU): with ``fused_uvm_caching`` a write into
  the weights would bypass the cache, and cached rows would keep their pre-update values and later
  overwrite the update. CPU's default sharder does not offer row-wise; :class:`RowWiseSharder` adds it
  (docs/platform-notes.md), and every table is constrained, so that does not leak to other tables.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cstwa_dist.config import OptimConfig
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.distributed.init import init_dense, init_tables


class StructureTableRole(Protocol):
    """What sharding needs of a Structure Migrator table (the registry's ``StructureTable`` has it):
    its name, sharded row-wise, and whether it trains (a never-trained table gets a stateless
    optimizer). A protocol, so this room needs nothing from the registry above it."""

    @property
    def table(self) -> str: ...

    @property
    def trained(self) -> bool: ...


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """The fused table optimizer a run uses, resolved once from the config and the device.

    Why one object: the optimizer put on the tables (:func:`prepare_tables`), the state the dry run
    counts (``planner/dryrun.py``) and what ``metrics.json`` records must be the same choice, and a
    run's record must say which learning rate and epsilon the kernel got, not only its name.
    ``kwargs`` is what the kernel receives: TorchRec hands an in-backward optimizer's keyword
    arguments to FBGEMM (``lr`` renamed ``learning_rate``); anything not given takes FBGEMM's
    default, which is why ``eps`` is always given (the torch-side class's default differs).
    """

    name: str  # "rowwise_adagrad" | "adam"
    kernel: str  # FBGEMM's EmbOptimType
    lr: float
    eps: float
    state: str  # the optimizer state per table, in words (the dry run's report)
    betas: tuple[float, float] | None = None  # Adam's moments' decays (FBGEMM's defaults)
    weight_decay: float = 0.0  # the fused kernels carry no weight decay; the L2 is the dense Adam's

    def kwargs(self) -> dict[str, float]:
        return {"lr": self.lr, "eps": self.eps}

    def to_dict(self) -> dict[str, object]:
        """The ``metrics.json`` record (``embedding_optimizer_settings``)."""
        out: dict[str, object] = {
            "name": self.name,
            "kernel": f"FBGEMM {self.kernel}",
            "lr": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "state": self.state,
        }
        if self.betas is not None:
            out["betas"] = list(self.betas)
        return out


def resolve_embedding_optimizer(cfg: OptimConfig, device: torch.device) -> EmbeddingOptimizer:
    """The table optimizer for ``cfg`` on ``device``: ``auto`` is exact row-wise Adagrad at
    ``embedding_lr`` on CPU and GPU alike (FBGEMM has the kernel on both), so a GPU run trains the
    same model as every CPU measurement; ``adam`` is GPU only, at ``embedding_adam_lr``.

    Raises ``ValueError`` for ``adam`` on a device other than CUDA: FBGEMM's CPU kernels have no
    fused Adam (docs/platform-notes.md), and silently training another optimizer would make the
    run's record lie.
    """
    if cfg.embedding == "adam":
        if device.type != "cuda":
            raise ValueError(
                f"optim.embedding=adam runs on GPUs only, and this run's device is {device.type}: FBGEMM's "
                "CPU kernels have no fused Adam. Use optim.embedding=auto (exact row-wise Adagrad at "
                "optim.embedding_lr, the optimizer of every CPU measurement)"
            )
        if cfg.embedding_adam_lr is None:  # OptimConfig refuses this already; kept for hand-built ones
            raise ValueError("optim.embedding=adam needs optim.embedding_adam_lr")
        return EmbeddingOptimizer(
            name="adam",
            kernel="ADAM",
            lr=cfg.embedding_adam_lr,
            eps=cfg.embedding_eps,
            state="2 x weights",
            betas=(0.9, 0.999),
        )
    return EmbeddingOptimizer(
        name="rowwise_adagrad",
        kernel="EXACT_ROWWISE_ADAGRAD",
        lr=cfg.embedding_lr,
        eps=cfg.embedding_eps,
        state="one fp32 per row",
    )


def embedding_optimizer_name(cfg: OptimConfig, device: torch.device) -> str:
    """The resolved optimizer's name (:func:`resolve_embedding_optimizer`)."""
    return resolve_embedding_optimizer(cfg, device).name


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    embedding_optimizer: str  # recorded in metrics.json (docs/method.md's optimizer decision)
    plan: str
    # the resolved table optimizer, recorded in metrics.json as ``embedding_optimizer_settings``
    embedding_optimizer_settings: dict[str, object] = field(default_factory=dict)


def _local_world_size(env: DistEnv) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))


def _collections(module: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, EmbeddingBagCollection)]


def dense_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters outside the embedding collections (fp32): replicated on every rank."""
    table_params = {id(p) for _, ebc in _collections(module) for p in ebc.parameters()}
    return sum(p.numel() * 4 for p in module.parameters() if id(p) not in table_params)


class RowWiseSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder with row-wise offered on every device (its CPU list lacks it)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def prepare_tables(
    module: nn.Module,
    cfg: OptimConfig,
    emb_opt: EmbeddingOptimizer,
    structure: Sequence[StructureTableRole] = (),
) -> dict[str, ParameterConstraints]:
    """Puts the fused optimizer on every embedding table and returns every table's constraints.

    The model's ``structure`` tables (registry) get row-wise sharding on the FUSED kernel; all others
    table-wise (module doc). The planner reads the optimizer class off the parameters (Adam: 2 extra
    states per weight; row-wise Adagrad: one float per row), so this must run before planning, dry
    run included. A structure table that is never trained (``trained=False``: only written by the
    migrator and read detached, reading (b)'s ``P``) gets stateless SGD, so it carries no optimizer
    state (an accidental gradient would still move it, which the tests of reading (b) rely on).
    """
    row_wise = {t.table for t in structure}
    frozen = {t.table for t in structure if not t.trained}
    constraints: dict[str, ParameterConstraints] = {}
    for _, ebc in _collections(module):
        for t in ebc.embedding_bag_configs():
            weight = [ebc.embedding_bags[t.name].weight]
            if t.name in frozen:
                apply_optimizer_in_backward(torch.optim.SGD, weight, {"lr": cfg.embedding_lr})
            elif emb_opt.name == "adam":
                apply_optimizer_in_backward(torch.optim.Adam, weight, emb_opt.kwargs())
            else:
                apply_optimizer_in_backward(RowWiseAdagrad, weight, emb_opt.kwargs())
            if t.name in row_wise:
                constraints[t.name] = ParameterConstraints(
                    sharding_types=[ShardingType.ROW_WISE.value],
                    compute_kernels=[EmbeddingComputeKernel.FUSED.value],
                )
            else:
                constraints[t.name] = ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
    unknown = row_wise - set(constraints)
    if unknown:
        raise ValueError(f"row-wise tables {sorted(unknown)} are not in the model's collections")
    return constraints


@dataclass(frozen=True)
class Reserve:
    """Memory one step of the job needs on every rank besides the tables, kept from the planner.

    The TorchRec planner places tables into whatever its topology offers; a step that later
    allocates on the same device (the Structure Migrator's epoch window, graph mining's Faiss
    index, an evaluation pass) would then find the memory taken. Each figure is the step's own
    formula (``source`` names it; ``train/reserves.py`` asks it), per rank: ``hbm`` on the rank's
    GPU (0 on CPU ranks), ``ddr`` host memory on every rank but rank 0, ``ddr_rank0`` on rank 0
    (which alone trains the IVF quantizer).
    """

    name: str
    hbm: int
    ddr: int
    ddr_rank0: int
    source: str

    def host(self, rank: int) -> int:
        return self.ddr_rank0 if rank == 0 else self.ddr


class StepReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation (a share of every device, the dense state, input buffers),
    then every :class:`Reserve` taken off each rank's device as well.

    Why a reservation and not a smaller cap: the reserves are absolute bytes a step allocates, not
    a share of the device, and the planner's own figures (``last_reserved_topology``) then say what
    was left for the tables. A rank left with less than nothing is refused here with the reserves
    named, instead of TorchRec's generic "insufficient storage". A subclass, so TorchRec's stats
    and logs still find the heuristic's figures where they look for them.
    """

    def __init__(self, *, percentage: float, dense_tensor_estimate: int, reserves: Sequence[Reserve]) -> None:
        super().__init__(percentage=percentage, dense_tensor_estimate=dense_tensor_estimate)
        self.reserves = list(reserves)

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: list,  # TorchRec's ModuleSharder list
        constraints: dict[str, ParameterConstraints] | None = None,
    ) -> Topology:
        out = super().reserve(topology, batch_size, module, sharders, constraints)
        cuda = out.compute_device == "cuda"
        for device in out.devices:
            device.storage.hbm -= sum(r.hbm for r in self.reserves) if cuda else 0
            device.storage.ddr -= sum(r.host(device.rank) for r in self.reserves)
            if (device.storage.hbm if cuda else device.storage.ddr) < 0:
                named = ", ".join(
                    f"{r.name} {r.hbm if cuda else r.host(device.rank):,} B" for r in self.reserves
                )
                where = "HBM" if cuda else "host memory"
                raise PlannerError(
                    error_type=PlannerErrorType.INSUFFICIENT_STORAGE,
                    message=f"rank {device.rank} has no {where} left for tables after the reserves ({named})",
                )
        self._last_reserved_topology = copy.deepcopy(out)
        return out


def build_planner(
    module: nn.Module,
    constraints: dict[str, ParameterConstraints],
    *,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    hbm_cap_bytes: int | None = None,
    ddr_cap_bytes: int | None = None,
    dry_run: bool | None = None,
    reserves: Sequence[Reserve] = (),
) -> EmbeddingShardingPlanner:
    """The planner ``shard_model`` uses; ``cstwa-dist plan`` builds the same one for any topology.

    Capacities are per device (HBM) and per rank (host memory); without them the topology takes
    TorchRec's defaults. ``dry_run`` (default: whether any capacity is given) marks a planning-only
    topology (``TrainerConfig.is_dry_run``); training passes the machine's real capacities with
    ``dry_run=False`` (:func:`device_capacities`). The
    storage reservation keeps 15 % of each device plus 6 x the dense parameter bytes (weights, grads,
    Adam state, DDP buckets) out of the tables' reach, and then every one of ``reserves`` (the job's
    steps: structure migrator, graph mining, evaluation; :class:`StepReservation`).
    """
    if dry_run is None:
        dry_run = hbm_cap_bytes is not None or ddr_cap_bytes is not None
    trainer_config = (
        TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            is_dry_run=True,
            dry_run_hbm_bytes=hbm_cap_bytes,
            dry_run_ddr_bytes=ddr_cap_bytes,
        )
        if dry_run
        else TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=hbm_cap_bytes,
            ddr_cap_bytes=ddr_cap_bytes,
        )
    )
    topology = TopologyFactory.create_topology(
        trainer_config=trainer_config, kernel_config=KernelConfig(compute_device=compute_device)
    )
    dense_bytes = dense_parameter_bytes(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice; the estimate below is what it asks for
        reservation = StepReservation(
            percentage=0.15, dense_tensor_estimate=6 * dense_bytes, reserves=reserves
        )
    return EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, storage_reservation=reservation
    )


#: The memory limit files of this process's cgroup, read in this order: v2 (``memory.max``), v1. In a
#: Kubernetes pod (its own cgroup namespace) they hold the pod's / container's memory limit.
CGROUP_MEMORY_FILES: tuple[str, ...] = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
#: A v1 limit at or above this is "no limit" (the kernel writes ``PAGE_COUNTER_MAX`` pages, ~2^63 B).
_NO_CGROUP_LIMIT = 1 << 60


def cgroup_memory_limit(files: Sequence[str | os.PathLike[str]] = CGROUP_MEMORY_FILES) -> int | None:
    """The cgroup memory limit in bytes from the first of ``files`` that can be read; ``None`` when
    none can, or when it says there is none (``max`` in v2, a value near 2^63 in v1)."""
    for file in files:
        try:
            with open(file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            logger.warning("%s: unexpected content %r; the cgroup memory limit is ignored", file, text[:40])
            return None
        return value if 0 < value < _NO_CGROUP_LIMIT else None
    return None


def host_memory_bytes(cgroup_files: Sequence[str | os.PathLike[str]] = CGROUP_MEMORY_FILES) -> int:
    """The memory this process's node (or pod) can use: the physical RAM (``sysconf``), capped by the
    cgroup's memory limit (:func:`cgroup_memory_limit`): a pod limited to 64 GiB on a 1 TiB node
    has 64 GiB, and planning for the node's RAM gets the pod OOM-killed."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit(cgroup_files)
    return ram if limit is None else min(ram, limit)


def device_capacities(
    env: DistEnv, cgroup_files: Sequence[str | os.PathLike[str]] = CGROUP_MEMORY_FILES
) -> tuple[int | None, int]:
    """This rank's real memory for the planner: the GPU's total memory (``None`` on CPU) and the
    host memory (:func:`host_memory_bytes`: RAM capped by the cgroup limit) divided among the node's
    ranks. TorchRec's defaults (32 GiB HBM, 128 GiB host) would let it plan tables onto memory a node
    does not have, or refuse plans that fit."""
    hbm = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
    host = host_memory_bytes(cgroup_files)
    return hbm, host // max(1, _local_world_size(env))


def shard_model(
    module: nn.Module,
    env: DistEnv,
    cfg: OptimConfig,
    structure: Sequence[StructureTableRole] = (),
    *,
    seed: int,
    reserves: Sequence[Reserve] = (),
) -> ShardedModel:
    """Applies the fused optimizer to every embedding table, plans, shards, builds the dense Adam.

    ``structure``: the model's structure tables (registry), sharded by rows (:func:`prepare_tables`).
    ``seed``: the dense layers are drawn from ``(seed, "dense")`` before sharding and every table from
    ``(seed, table, global row)`` right after it (``distributed/init.py``), the same at any world size
    and plan, and before anything else (structure-table initialisation, warm start, resume) writes.
    ``reserves``: what the job's steps need on every rank besides the tables
    (``train.reserves.job_reserves``), kept from the planner (:class:`StepReservation`).
    """
    emb_opt = resolve_embedding_optimizer(cfg, env.device)
    constraints = prepare_tables(module, cfg, emb_opt, structure)
    hbm, host = device_capacities(env)
    planner = build_planner(
        module,
        constraints,
        world_size=env.world_size,
        local_world_size=_local_world_size(env),
        compute_device=env.device.type,
        hbm_cap_bytes=hbm,
        ddr_cap_bytes=host,
        dry_run=False,
        reserves=reserves,
    )
    sharders = [RowWiseSharder()]
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    sum_embedding_gradients()
    table_params = {id(p) for _, ebc in _collections(module) for p in ebc.parameters()}
    init_dense(module, env.device, seed, skip=table_params)
    dmp = DistributedModelParallel(module=module, device=env.device, plan=plan, sharders=sharders)
    init_tables(dmp, seed)
    sum_dense_gradients(dmp)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return ShardedModel(
        dmp=dmp,
        optimizer=optimizer,
        embedding_optimizer=emb_opt.name,
        plan=str(plan),
        embedding_optimizer_settings=emb_opt.to_dict(),
    )


def _allreduce_sum_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP rejects string annotations here
    """DDP communication hook: sum the bucket over ranks (DDP's default also divides by the world size).

    ``(state, bucket: dist.GradBucket) -> Future[Tensor]``; left unannotated because DDP checks the
    annotation object, and this module's annotations are strings (``from __future__ import annotations``).
    """
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_embedding_gradients() -> None:
    """Makes TorchRec's embedding collectives pass gradients back SUMMED over ranks, not averaged.

    Each rank's loss is its share of the global batch's mean (``losses/common.py``), so the gradient
    of one process on the concatenated batch is the SUM of the ranks' gradients. TorchRec's pooled
    all-to-all and reduce-scatter divide the gradient they pass back by the world size by default (to
    match DDP's averaging), which would give every table 1/W of it. Row-wise Adagrad's per-row
    normalisation hides a constant factor in rows whose gradients stand well above its ``eps``, not in
    rows with small gradients (the mixture-of-experts baselines' tables: the 1-vs-2-rank check in
    tests/distributed/test_dmp.py). The switch is TorchRec's process-wide flag, read at every lookup.
    """
    from torchrec.distributed.comm_ops import set_gradient_division

    set_gradient_division(False)


def sum_dense_gradients(dmp: DistributedModelParallel) -> int:
    """Makes DDP SUM dense gradients over ranks instead of averaging them; returns the hooks installed.

    Each rank's loss is its share of the global batch's mean (``losses/common.py``), so the gradient
    of one process on the concatenated batch is the SUM of the ranks' gradients; the embedding tables
    get that sum through :func:`sum_embedding_gradients`. With DDP's default averaging the dense
    parameters would get 1/W of it, and one real row in a rank's partial batch would weigh as much as
    a full batch elsewhere.
    """
    from torch.nn.parallel import DistributedDataParallel

    hooks = 0
    for m in dmp.modules():
        if isinstance(m, DistributedDataParallel):
            m.register_comm_hook(state=None, hook=_allreduce_sum_hook)
            hooks += 1
    return hooks


def submodule(dmp: DistributedModelParallel, path: str) -> nn.Module:
    """The (possibly sharded) submodule at ``path`` inside the model that ``ModelTrain`` wraps."""
    m: nn.Module = dmp.module.model
    for part in path.split("."):
        m = getattr(m, part)
    return m
