"""The structure step's peak memory per rank, assembled from what each step says it allocates.

Why: the dry run must not keep its own copy of a step's formula: a copy drifts from the code it
describes, and then the plan says a job fits that does not. So every figure here comes from the
function that sits next to the step's code and states what the step allocates on a rank
(:class:`~cstwa_dist.structure.memory.MemoryItem` lists), as TorchRec's planner asks its storage
estimators:

* read-out of a block's profiles into representations: ``structure.readout.readout_memory``;
* distributed kNN (IVF or exact, on the ring): ``structure.ivf.knn_memory``, its work
  ``structure.ivf.ring_madds``;
* building the rank's rows of ``Â``: ``structure.sharded_graph.shard_build_memory``;
* the row-sharded propagator, resident and per epoch boundary:
  ``structure.sharded_graph.propagator_memory`` and ``migrate_memory`` (which asks
  ``structure.propagate.beta_update_memory`` for Eq. 10's mixing).

What is decided here is only the assembly: the sizes of the largest row block (``n_r = ceil(N/W)``
rows of a side, at most ``f_r = min(n_r·k, N − n_r)`` foreign rows fetched or served), which phases
overlap, and where each lives (the rank's device or its host).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from cstwa_dist.config import RunConfig, StructureConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.registry import get_model_spec
from cstwa_dist.structure.ivf import knn_memory, resolve_cells, ring_madds
from cstwa_dist.structure.memory import MemoryItem, total_bytes
from cstwa_dist.structure.migrator import ivf_params
from cstwa_dist.structure.readout import readout_memory
from cstwa_dist.structure.sharded_graph import migrate_memory, propagator_memory, shard_build_memory

__all__ = [
    "NO_STRUCTURE",
    "StructureEstimate",
    "StructureSide",
    "StructureTerm",
    "knn_madds_per_rank",
    "mining_side_items",
    "mining_structure_estimate",
    "structure_sides",
    "train_side_items",
    "train_structure_estimate",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StructureSide:
    """One side's sizes as the structure step sees them (whole-side figures; per rank below)."""

    side: str
    entities: int  # N
    fields: int  # M: the side's fields (profile columns)
    width: int  # w: the representation / structure-table width (M·D for the current models)
    k: int

    def rows_per_rank(self, world_size: int) -> int:
        """``n_r = ceil(N/W)``: the largest row block a rank owns (TorchRec's row-wise shards and
        ``ivf.even_ranges`` both give at most this many rows to a rank)."""
        return _ceil_div(self.entities, world_size)

    def foreign_rows(self, world_size: int) -> int:
        """``f_r = min(n_r·k, N − n_r)``: a bound on the distinct foreign neighbour rows of a rank's
        graph rows (and, the same bound, on the rows it serves to the others)."""
        n_r = self.rows_per_rank(world_size)
        return max(0, min(n_r * self.k, self.entities - n_r))


@dataclass(frozen=True)
class StructureTerm:
    """One allocation of a structure phase on one rank: where it lives, its size and its formula."""

    side: str
    name: str
    where: str  # "device" (the rank's accelerator) | "host"
    bytes: int
    formula: str
    rank0_only: bool = False


@dataclass(frozen=True)
class StructureEstimate:
    """Peak memory of one structure phase, per rank: the sizes, the terms at the peak, the formulas.

    ``host_rank0`` and ``host_other`` differ only where rank 0 does extra work (the IVF quantizer's
    training sample in graph mining). ``device`` is on the rank's accelerator; on CPU ranks there is
    no device and everything is host memory (``device`` = 0). ``terms`` are the allocations alive at
    the peaks (``where`` says which peak), the sizes those of the largest row block ``n_r``.
    """

    phase: str  # "train" (SM initialisation + epoch boundary) | "pretrain" (graph mining) | "none"
    world_size: int
    host_rank0: int
    host_other: int
    device: int
    sides: list[StructureSide] = field(default_factory=list)
    terms: list[StructureTerm] = field(default_factory=list)
    formulas: list[str] = field(default_factory=list)
    dominant: str = ""
    notes: list[str] = field(default_factory=list)


NO_STRUCTURE = StructureEstimate(phase="none", world_size=0, host_rank0=0, host_other=0, device=0)


def _terms(side: str, items: Sequence[MemoryItem], where: str) -> list[StructureTerm]:
    """A step's items as the report's terms of ``side``, living ``where``."""
    return [
        StructureTerm(
            side,
            f"{i.name} {side}" + (f" ({i.detail})" if i.detail else ""),
            where,
            i.bytes,
            i.formula,
            i.rank0_only,
        )
        for i in items
    ]


def _formula(items: Sequence[MemoryItem]) -> str:
    return " + ".join(i.formula for i in items)


def _aligned(parts: Sequence[tuple[str, str, str]], *, right_leads: bool = False) -> list[str]:
    """Formula lines from ``(lead, formula, what)``: the labels ``what`` in one column; with
    ``right_leads`` the leads right-aligned too, so that continuation lines start under the first."""
    lead_w = max(len(lead) for lead, _, _ in parts) if right_leads else 0
    texts = [f"{lead:>{lead_w}}{f}" for lead, f, _ in parts]
    width = max(len(t) for t in texts)
    return [f"{t:<{width}}  {what}".rstrip() for t, (_, _, what) in zip(texts, parts, strict=True)]


def _dominant(terms: list[StructureTerm]) -> str:
    t = max(terms, key=lambda t: t.bytes)
    return f"{t.where}: {t.name} ({t.formula})"


def _largest(groups: Sequence[list[MemoryItem]]) -> int:
    """Index of the group with the most bytes (the first on ties: the user side)."""
    return max(range(len(groups)), key=lambda i: total_bytes(groups[i]))


def train_side_items(s: StructureSide, world_size: int, layers: int = 1) -> dict[str, list[MemoryItem]]:
    """One side's items in the training job, by phase, as the steps state them: ``resident`` (the
    propagator, from the migrator's construction to the end of training), ``boundary`` (one epoch
    boundary of this side: :func:`~cstwa_dist.structure.sharded_graph.migrate_memory`) and ``init``
    (this side's SM initialisation: the read-out of the block's profiles)."""
    n_r, f_r = s.rows_per_rank(world_size), s.foreign_rows(world_size)
    return {
        "resident": propagator_memory(n_r, s.k, f_r),
        "boundary": migrate_memory(n_r, f_r, s.width, layers),
        "init": readout_memory(n_r, s.fields, s.width),
    }


def train_structure_estimate(
    sides: list[StructureSide], world_size: int, *, on_device: bool = True, layers: int = 1
) -> StructureEstimate:
    """SM during training (``StructureMigrator``), row-sharded: every rank alike, for its own rows.

    Per rank (sizes of the largest block, items from :func:`train_side_items`):

    * **resident** for the whole job, on the rank's device (the communication device: the GPU under
      NCCL), for both sides: the propagator's rows of ``Â`` and its fetcher's id lists;
    * **epoch boundary**, one side at a time, on the device: the larger of propagating (fetched and
      served foreign rows, the window's own rows, the layer outputs) and mixing (Eq. 10). ``L``
      layers fetch again per layer but hold at most two layer outputs. The block of ``U``/``I``
      itself is a view of the row-wise shard, already counted by the planner;
    * **SM initialisation**, one side at a time, on the host: the block's profiles and read-out.

    So ``device = Σ_sides resident + max_side boundary`` and ``host = max_side init`` on GPU ranks;
    on CPU ranks (``on_device=False``) everything is host memory and initialisation and epoch
    boundaries never overlap: ``host = Σ_sides resident + max(max_side boundary, max_side init)``.
    Nothing is of size ``N``: every term shrinks as ``1/W``, down to the ``f_r`` bound ``N − n_r``.
    """
    if not sides:
        return NO_STRUCTURE
    where = "device" if on_device else "host"
    per_side = [train_side_items(s, world_size, layers) for s in sides]
    b = _largest([p["boundary"] for p in per_side])
    i = _largest([p["init"] for p in per_side])
    boundary_items, init_items = per_side[b]["boundary"], per_side[i]["init"]
    resident = [t for s, p in zip(sides, per_side, strict=True) for t in _terms(s.side, p["resident"], where)]
    boundary = _terms(sides[b].side, boundary_items, where)
    init = _terms(sides[i].side, init_items, "host")
    res_b, bnd_b, init_b = (sum(t.bytes for t in ts) for ts in (resident, boundary, init))
    resident_f = f"Σ_sides [{_formula(per_side[0]['resident'])}]"
    boundary_f, init_f = f"max_side [{_formula(boundary_items)}]", f"max_side [{_formula(init_items)}]"
    if on_device:
        terms = resident + boundary + init
        device, host = res_b + bnd_b, init_b
        parts = [
            ("device, every rank = ", resident_f, "resident"),
            ("                   + ", boundary_f, "epoch boundary"),
            ("host, every rank   = ", init_f, "SM initialisation"),
        ]
    else:
        terms = resident + (boundary if bnd_b >= init_b else init)
        terms = [StructureTerm(t.side, t.name, "host", t.bytes, t.formula) for t in terms]
        device, host = 0, res_b + max(bnd_b, init_b)
        parts = [
            ("host, every rank   = ", resident_f, "resident"),
            ("                   + max(", boundary_f + ",", "epoch boundary,"),
            ("                         ", init_f + ")", "or SM initialisation (never both)"),
        ]
    formulas = _aligned(parts)
    return StructureEstimate(
        phase="train",
        world_size=world_size,
        host_rank0=host,
        host_other=host,
        device=device,
        sides=list(sides),
        terms=terms,
        formulas=formulas,
        dominant=_dominant(terms),
        notes=[
            f"L = {layers} layer(s): each layer fetches its foreign rows again; at most two layer "
            "outputs are alive",
            "the U/I block itself is a view of the row-wise shard, counted above by the planner",
        ],
    )


#: The kNN's items that hold the rank's shard (``structure.ivf.per_rank_memory`` keys): one formula
#: line of the report, the ring's blocks and lists the next.
_SHARD = ("shard", "index")


def mining_side_items(s: StructureSide, world_size: int, cfg: StructureConfig) -> dict[str, list[MemoryItem]]:
    """One side's items in graph mining, by step, as the steps state them: ``readout`` (the block's
    profiles and representations), ``knn`` (the distributed kNN on rank 0, whose training sample is
    its only rank-0 item) and ``build`` (the rank's rows of ``Â``, beside the kNN's lists)."""
    n_r = s.rows_per_rank(world_size)
    k = min(s.k, s.entities)
    return {
        "readout": readout_memory(n_r, s.fields, s.width),
        "knn": knn_memory(ivf_params(cfg), s.entities, n_r, s.width, k, rank0=True),
        "build": shard_build_memory(n_r, k, s.foreign_rows(world_size)),
    }


def mining_structure_estimate(
    sides: list[StructureSide], world_size: int, cfg: StructureConfig | None = None
) -> StructureEstimate:
    """Graph mining after pre-training (``mine_structure``), row-sharded, one side at a time, on the host.

    Every rank reads out its own block of ``n_r = ceil(N/W)`` entities, runs the distributed kNN
    (``structure/ivf.py``) on them, then builds its rows of ``Â``; :func:`mining_side_items` gives
    each step's items. The peak is the larger side's sum of all of them, an upper bound: the kNN's
    index, normalised copy and query blocks are freed before ``Â``'s rows are built. Rank 0 also
    holds the IVF quantizer's training sample. With faiss-gpu the index and searches move to the GPU;
    this estimate still counts them on the host (an upper bound there), and the mining job's planner
    reserves their device side, Faiss's temporary memory included, from
    ``structure.faiss_memory.knn_device_memory`` (``train/reserves.py``).
    """
    if not sides:
        return NO_STRUCTURE
    cfg = cfg or StructureConfig()
    per_side = [mining_side_items(s, world_size, cfg) for s in sides]
    flat = [[i for step in p.values() for i in step] for p in per_side]
    top = _largest(flat)
    terms = _terms(sides[top].side, flat[top], "host")
    steps = per_side[top]
    knn_all = [i for i in steps["knn"] if not i.rank0_only]
    rank0 = [i for i in steps["knn"] if i.rank0_only]
    parts = [
        ("host, every rank   = max_side [", _formula(steps["readout"]), "read-out"),
        ("+ ", _formula([i for i in knn_all if i.key in _SHARD]), "kNN: the shard and its index"),
        ("+ ", _formula([i for i in knn_all if i.key not in _SHARD]), "kNN: query blocks, own lists"),
        ("+ ", _formula(steps["build"]) + "]", "Â's rows"),
        *(
            [("host, rank 0 also            + ", _formula(rank0), "the IVF quantizer's sample")]
            if rank0
            else []
        ),
    ]
    formulas = _aligned(parts, right_leads=True)
    return StructureEstimate(
        phase="pretrain",
        world_size=world_size,
        host_rank0=max(total_bytes(items) for items in flat),
        host_other=max(total_bytes(items, rank0=False) for items in flat),
        device=0,
        sides=list(sides),
        terms=terms,
        formulas=formulas,
        dominant=_dominant(terms),
        notes=[
            *(_knn_note(s, cfg) for s in sides),
            "an upper bound: the kNN's index, normalised copy and query blocks are freed before Â's "
            "rows are built",
        ],
    )


def _knn_note(s: StructureSide, cfg: StructureConfig) -> str:
    nlist, nprobe = resolve_cells(ivf_params(cfg), s.entities)
    if nlist == 0:
        return f"{s.side}: exact kNN through the ring (structure.knn = exact)"
    kind = f"IVF-PQ pq_m={cfg.pq_m}" if cfg.pq_m else "IVF-flat"
    return f"{s.side}: {kind}, nlist={nlist:,} nprobe={nprobe}; rank 0 trains the quantizer"


def knn_madds_per_rank(s: StructureSide, world_size: int, cfg: StructureConfig) -> tuple[int, int]:
    """(multiply-adds of the configured kNN on one rank, of the exact search through the same ring),
    from ``structure.ivf.ring_madds`` at this side's largest block."""
    n_r, w, n = s.rows_per_rank(world_size), s.width, s.entities
    nlist, nprobe = resolve_cells(ivf_params(cfg), n)
    return ring_madds(n, n_r, w, nlist=nlist, nprobe=nprobe), ring_madds(n, n_r, w, nlist=0, nprobe=0)


def _collection_at(module: nn.Module, path: str) -> nn.Module:
    m = module
    for part in path.split("."):
        m = getattr(m, part)
    return m


def structure_sides(
    model: nn.Module, model_name: str, spec: DatasetSpec, cfg: RunConfig
) -> tuple[list[StructureSide], list[StructureSide]]:
    """(sides the training job smooths, sides graph mining reads out) for this model and config.

    Training sides come from the registry's structure tables, sized by the model's own tables; mining
    sides from the spec (``r_u`` = the side's field embeddings concatenated, width M·D).
    """
    mspec = get_model_spec(model_name)
    k, dim = cfg.structure.k, cfg.model.embedding_dim
    train_sides = []
    for t in mspec.structure_tables(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)):
        ebc = _collection_at(model, t.collection)
        conf = next(c for c in ebc.embedding_bag_configs() if c.name == t.table)
        train_sides.append(
            StructureSide(
                side=t.side,
                entities=conf.num_embeddings,
                fields=len(spec.side_fields(t.side)),
                width=conf.embedding_dim,
                k=k,
            )
        )
    mine_sides = [
        StructureSide(
            side=side,
            entities=spec.num_users if side == "user" else spec.num_items,
            fields=len(spec.side_fields(side)),
            width=len(spec.side_fields(side)) * dim,
            k=k,
        )
        for side in ("user", "item")
    ]
    return train_sides, mine_sides
