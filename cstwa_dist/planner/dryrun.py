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
* **the structure step's peak** per rank (:func:`train_structure_estimate`,
  :func:`mining_structure_estimate`) for the row-sharded structure path (``structure/migrator.py``):
  a rank holds ``n_r = ceil(N/W)`` rows of each side (its row-wise shard of ``U``/``I``, its rows of
  ``Â``, its block of representations) plus what it fetches from, or serves to, the others; nothing
  of size ``N``. The formulas are the per-rank memory the structure modules state in their docstrings
  (``structure/migrator.py``, ``structure/ivf.py``, ``distributed/exchange.py``), evaluated at the
  largest block.

Nothing here allocates a table: memory is that of the meta model and the planner (well under 1 GB at
30M users), and planning 64 ranks takes well under a second.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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

from cstwa_dist.config import RunConfig, StructureConfig
from cstwa_dist.data.spec import DatasetSpec, FieldSpec, SpecError
from cstwa_dist.distributed.sharding import (
    RowWiseSharder,
    build_planner,
    dense_parameter_bytes,
    embedding_optimizer_name,
    prepare_tables,
)
from cstwa_dist.registry import get_model_spec
from cstwa_dist.structure.ivf import auto_nlist
from cstwa_dist.train.wrapper import ModelTrain

logger = logging.getLogger(__name__)

GIB = 1024**3
SYNTH_PREFIX = "synth:"
_PRESET_DIR = re.compile(r"^(?P<preset>.+?)(?:-(?P<scale>\d+(?:\.\d+)?))?$")

# Bytes per entity of the structure step, per unit of N·w (representation width) or N·k (graph degree).
BETA_UPDATE_COPIES = 5  # U, Â^L·U, (1−β)·U, β·Â^L·U and the new U, all [N, w] fp32 at once
NORMALISE_BYTES_PER_NW = 24  # gathered reps fp32 4 + float64 copy 8 + float64 quotient 8 + fp32 result 4
SEARCH_BYTES_PER_NW = 12  # reps, normalised copy, Faiss's own copy (fp32 each)
KNN_LIST_BYTES_PER_NK = 12  # scores fp32 + ids int64
GRAPH_BUILD_BYTES_PER_NK = 66  # kNN lists 12 + COO sort / normalisation temporaries and the CSR (measured 54)


# --- the spec: a dataset's spec.yaml, or the one a synth preset would write ----------------------------
def synth_spec(preset: str, scale: float = 1.0) -> DatasetSpec:
    """The spec ``cstwa-dist synth --preset PRESET --scale SCALE`` writes, without generating anything.

    Mirrors ``synth.dataset_spec`` from the preset's sizes alone (building the synth world would draw
    30M user clusters); ``tests/unit/test_plan.py`` checks the two agree.
    """
    from cstwa_dist.data import synth

    if preset not in synth.PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; valid: {sorted(synth.PRESETS)}")
    sizes = synth.PRESETS[preset].sizes(scale)
    fields = [FieldSpec(name="user_id", side="user", vocab_size=sizes["num_users"])]
    fields += [FieldSpec(name=n, side="user", vocab_size=v) for n, v in synth.USER_PROFILE_VOCAB.items()]
    fields.append(FieldSpec(name="item_id", side="item", vocab_size=sizes["num_items"]))
    fields += [FieldSpec(name=n, side="item", vocab_size=v) for n, v in synth.ITEM_PROFILE_VOCAB.items()]
    fields += [FieldSpec(name=n, side="context", vocab_size=v) for n, v in synth.CONTEXT_VOCAB.items()]
    return DatasetSpec(fields=tuple(fields), user_id="user_id", item_id="item_id")


def _parse_synth(text: str) -> tuple[str, float]:
    preset, _, scale = text.partition(":")
    try:
        return preset, float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"--spec {SYNTH_PREFIX}{text}: scale {scale!r} is not a number") from None


def resolve_spec(spec_arg: str | None, dataset: str) -> tuple[DatasetSpec, str]:
    """The spec to plan with and where it came from; no data is read.

    ``spec_arg``: a ``spec.yaml``, a dataset folder, or ``synth:PRESET[:SCALE]``. Without it:
    ``<dataset>/spec.yaml`` when the data set exists, else the spec of the synth preset the folder is
    named after (``data/industrial-like`` → ``industrial-like``, ``data/aliccp-like-0.01`` →
    ``aliccp-like`` at scale 0.01), which is what ``cstwa-dist synth`` would write there.
    """
    if spec_arg is not None:
        if spec_arg.startswith(SYNTH_PREFIX):
            preset, scale = _parse_synth(spec_arg[len(SYNTH_PREFIX) :])
            return synth_spec(preset, scale), f"synth preset {preset} at scale {scale:g}"
        return DatasetSpec.load(spec_arg), str(spec_arg)
    path = Path(dataset) / "spec.yaml"
    if path.exists():
        return DatasetSpec.load(path), str(path)
    from cstwa_dist.data.synth import PRESETS

    m = _PRESET_DIR.match(Path(dataset).name)
    if m and m["preset"] in PRESETS:
        scale = float(m["scale"]) if m["scale"] else 1.0
        return (
            synth_spec(m["preset"], scale),
            f"synth preset {m['preset']} at scale {scale:g} ({path} does not exist)",
        )
    raise SpecError(
        f"{path} not found and {Path(dataset).name!r} names no synth preset ({sorted(PRESETS)}): "
        "give --spec FILE|DIR or --spec synth:PRESET[:SCALE]"
    )


# --- the structure step -----------------------------------------------------------------------------
IVF_TRAIN_PER_LIST = 39  # rows per IVF cell in rank 0's k-means sample (``IVFParams.train_per_list``)
KNN_BLOCK_ROWS = 65536  # the foreign query block of the kNN ring (``distributed_knn(block_rows=...)``)


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


def _dominant(terms: list[StructureTerm]) -> str:
    t = max(terms, key=lambda t: t.bytes)
    return f"{t.where}: {t.name} ({t.formula})"


def _train_side_terms(s: StructureSide, world_size: int, where: str) -> dict[str, list[StructureTerm]]:
    """One side's terms of the training job, by phase: ``resident`` (from the migrator's construction
    to the end of training), ``boundary`` (one epoch boundary of this side) and ``init`` (this side's
    SM initialisation, host)."""
    n_r, f_r, w, k = s.rows_per_rank(world_size), s.foreign_rows(world_size), s.width, s.k
    side = s.side
    return {
        "resident": [
            StructureTerm(
                side, f"own Â rows {side} (CSR)", where, n_r * k * 12 + (n_r + 1) * 8, "n_r·k·12 + (n_r+1)·8"
            ),
            StructureTerm(side, f"fetch id lists {side} (requested + served)", where, 16 * f_r, "16·f_r"),
        ],
        "boundary": [
            StructureTerm(side, f"fetched foreign rows {side}", where, f_r * w * 4, "f_r·w·4"),
            StructureTerm(side, f"served rows {side} (send buffer)", where, f_r * w * 4, "f_r·w·4"),
            StructureTerm(
                side,
                f"propagation {side} (current, layer output, new block)",
                where,
                3 * n_r * w * 4,
                "3·n_r·w·4",
            ),
        ],
        "init": [
            StructureTerm(
                side, f"profiles {side} (int64 + seen)", "host", n_r * (s.fields + 1) * 8, "n_r·(M+1)·8"
            ),
            StructureTerm(side, f"read-out {side}", "host", n_r * w * 4, "n_r·w·4"),
        ],
    }


def train_structure_estimate(
    sides: list[StructureSide], world_size: int, *, on_device: bool = True, layers: int = 1
) -> StructureEstimate:
    """SM during training (``StructureMigrator``), row-sharded: every rank alike, for its own rows.

    With ``W`` ranks, ``n_r = ceil(N/W)`` own rows of a side, ``f_r = min(n_r·k, N − n_r)`` (a bound
    on its distinct foreign neighbour rows, and on the rows it serves), ``w`` the table width and
    ``M`` the side's fields, per rank:

    * **resident** for the whole job, on the rank's device (the communication device: the GPU under
      NCCL), for both sides: its rows of ``Â`` as CSR, ``n_r·k·12 + (n_r+1)·8`` B, and the row
      fetcher's requested and served id lists, ``16·f_r`` B (``distributed/exchange.py``);
    * **epoch boundary**, one side at a time, on the device: the fetched foreign rows ``f_r·w·4``,
      the send buffer of the rows it serves ``f_r·w·4``, and the propagation temporaries
      ``3·n_r·w·4`` (current block, layer output, new block). ``L`` layers fetch again per layer but
      hold one layer's rows at a time, so ``L`` does not enter the peak. The block of ``U``/``I``
      itself is a view of the row-wise shard, already counted by the planner;
    * **SM initialisation**, one side at a time, on the host: the block's entity profiles
      ``n_r·(M+1)·8`` (int64 fields + ``seen``) and their read-out ``n_r·w·4``.

    So ``device = Σ_sides resident + max_side boundary`` and ``host = max_side init`` on GPU ranks;
    on CPU ranks (``on_device=False``) everything is host memory and initialisation and epoch
    boundaries never overlap: ``host = Σ_sides resident + max(max_side boundary, max_side init)``.
    Nothing is of size ``N``: every term shrinks as ``1/W``, down to the ``f_r`` bound ``N − n_r``.
    """
    if not sides:
        return NO_STRUCTURE
    where = "device" if on_device else "host"
    per_side = [_train_side_terms(s, world_size, where) for s in sides]
    resident = [t for p in per_side for t in p["resident"]]
    boundary = max((p["boundary"] for p in per_side), key=lambda ts: sum(t.bytes for t in ts))
    init = max((p["init"] for p in per_side), key=lambda ts: sum(t.bytes for t in ts))
    res_b, bnd_b, init_b = (sum(t.bytes for t in ts) for ts in (resident, boundary, init))
    resident_line = "Σ_sides n_r·k·12 + (n_r+1)·8 + 16·f_r  own Â rows (CSR) + fetch ids, resident"
    boundary_line = "max_side 2·f_r·w·4 + 3·n_r·w·4         epoch boundary: fetched/served rows, propagation"
    init_line = "max_side n_r·(M+1)·8 + n_r·w·4         SM initialisation: profiles + read-out"
    if on_device:
        terms = resident + boundary + init
        device, host = res_b + bnd_b, init_b
        formulas = [
            f"device, every rank = {resident_line}",
            f"                   + {boundary_line}",
            f"host, every rank   = {init_line}",
        ]
    else:
        terms = resident + (boundary if bnd_b >= init_b else init)
        terms = [StructureTerm(t.side, t.name, "host", t.bytes, t.formula) for t in terms]
        device, host = 0, res_b + max(bnd_b, init_b)
        formulas = [
            f"host, every rank   = {resident_line}",
            "                   + max(max_side 2·f_r·w·4 + 3·n_r·w·4,   epoch boundary,",
            "                         max_side n_r·(M+1)·8 + n_r·w·4)   or SM initialisation (never both)",
        ]
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
            f"L = {layers} layer(s): each layer fetches its foreign rows again, one layer at a time",
            "the U/I block itself is a view of the row-wise shard, counted above by the planner",
        ],
    )


def _knn_settings(s: StructureSide, cfg: StructureConfig) -> tuple[bool, int, int]:
    """(exact, nlist, nprobe) as ``distributed_knn`` resolves them for this side."""
    if cfg.knn == "exact":
        return True, 0, 0
    nlist = min(cfg.nlist or auto_nlist(s.entities), s.entities)
    return False, nlist, min(cfg.nprobe, nlist)


def _mining_side_terms(s: StructureSide, world_size: int, cfg: StructureConfig) -> list[StructureTerm]:
    n_r, w, m, side = s.rows_per_rank(world_size), s.width, s.fields, s.side
    k = min(s.k, s.entities)
    exact, nlist, nprobe = _knn_settings(s, cfg)
    b = min(KNN_BLOCK_ROWS, n_r)
    terms = [
        StructureTerm(side, f"profiles {side} (int64 + seen)", "host", n_r * (m + 1) * 8, "n_r·(M+1)·8"),
        StructureTerm(side, f"representations {side}", "host", n_r * w * 4, "n_r·w·4"),
        StructureTerm(side, f"normalised copy {side}", "host", n_r * w * 4, "n_r·w·4"),
    ]
    if not exact:
        if cfg.pq_m:
            index, formula = n_r * (cfg.pq_m + 8) + nlist * w * 4, "n_r·(pq_m+8) + nlist·w·4"
        else:
            index, formula = n_r * (w * 4 + 8) + nlist * w * 4, "n_r·(w·4+8) + nlist·w·4"
        kind = "IVF-PQ" if cfg.pq_m else "IVF-flat"
        terms.append(StructureTerm(side, f"{kind} index {side} (+ centroids)", "host", index, formula))
    terms += [
        StructureTerm(
            side,
            f"foreign query block {side}",
            "host",
            b * (w * 4 + nprobe * 12),
            "b·w·4" if exact else "b·(w·4 + nprobe·12)",
        ),
        StructureTerm(side, f"kNN results {side} (top-k + result)", "host", 2 * n_r * k * 12, "2·n_r·k·12"),
        StructureTerm(side, f"Â rows {side} (CSR + build)", "host", n_r * k * 20, "n_r·k·(12+8)"),
    ]
    if not exact:
        terms.append(
            StructureTerm(
                side,
                f"IVF training sample {side} (nlist={nlist:,})",
                "host",
                min(nlist * IVF_TRAIN_PER_LIST, s.entities) * w * 4,
                "nlist·39·w·4",
                rank0_only=True,
            )
        )
    return terms


def mining_structure_estimate(
    sides: list[StructureSide], world_size: int, cfg: StructureConfig | None = None
) -> StructureEstimate:
    """Graph mining after pre-training (``mine_structure``), row-sharded, one side at a time, on the host.

    Every rank reads out its own block of ``n_r = ceil(N/W)`` entities and runs the distributed kNN
    (``structure/ivf.py``) on them, then builds its rows of ``Â``. Per rank and side (``w`` the
    representation width M·D, ``k`` the graph degree, ``b = min(65536, n_r)`` the ring's query block,
    ``nlist = structure.nlist`` or ``ivf.auto_nlist(N)`` = ``round(4·√N)`` capped at ``N // 39``):

    * profiles ``n_r·(M+1)·8`` + representations ``n_r·w·4`` + their L2-normalised copy ``n_r·w·4``;
    * the shard's index: IVF-flat ``n_r·(w·4 + 8)``, IVF-PQ ``n_r·(pq_m + 8)``, plus the shared
      centroids ``nlist·w·4`` (none with ``structure.knn = exact``);
    * one foreign query block at a time ``b·(w·4 + nprobe·12)`` (exact: ``b·w·4``);
    * the kNN lists ``2·n_r·k·12`` (running top-k and the result) and the rows of ``Â``
      ``n_r·k·(12+8)`` (CSR + build temporaries);
    * rank 0 only: the quantizer's training sample ``nlist·39·w·4`` (IVF only; at most ``N`` rows).

    The sum is an upper bound: the index and the normalised copy are freed before ``Â``'s rows are
    built. The peak is the larger side's. With faiss-gpu the index and searches move to the GPU; the
    estimate counts them on the host.
    """
    if not sides:
        return NO_STRUCTURE
    cfg = cfg or StructureConfig()
    per_side = [_mining_side_terms(s, world_size, cfg) for s in sides]
    terms = max(per_side, key=lambda ts: sum(t.bytes for t in ts))
    exact = cfg.knn == "exact"
    index = "n_r·(pq_m+8) + nlist·w·4" if cfg.pq_m else "n_r·(w·4+8) + nlist·w·4"
    parts = [
        (
            "host, every rank   = max_side [",
            "n_r·(M+1)·8 + 2·n_r·w·4",
            "profiles, representations, normalised copy",
        ),
        *([] if exact else [("  + ", index, "shard index + centroids")]),
        ("  + ", "b·w·4" if exact else "b·(w·4 + nprobe·12)", "one foreign query block"),
        ("  + ", "2·n_r·k·12 + n_r·k·20]", "kNN lists, own Â rows"),
        *(
            []
            if exact
            else [("host, rank 0 also            + ", "nlist·39·w·4", "the IVF quantizer's training sample")]
        ),
    ]
    formulas = [f"{lead:>31}{f:<26} {what}" for lead, f, what in parts]  # leads right-aligned at "["
    return StructureEstimate(
        phase="pretrain",
        world_size=world_size,
        host_rank0=max(sum(t.bytes for t in ts) for ts in per_side),
        host_other=max(sum(t.bytes for t in ts if not t.rank0_only) for ts in per_side),
        device=0,
        sides=list(sides),
        terms=terms,
        formulas=formulas,
        dominant=_dominant(terms),
        notes=[
            *(_knn_note(s, cfg) for s in sides),
            "an upper bound: the index and the normalised copy are freed before Â's rows are built",
        ],
    )


def _knn_note(s: StructureSide, cfg: StructureConfig) -> str:
    exact, nlist, nprobe = _knn_settings(s, cfg)
    if exact:
        return f"{s.side}: exact kNN through the ring (structure.knn = exact)"
    kind = f"IVF-PQ pq_m={cfg.pq_m}" if cfg.pq_m else "IVF-flat"
    return f"{s.side}: {kind}, nlist={nlist:,} nprobe={nprobe}; rank 0 trains the quantizer"


def knn_madds_per_rank(s: StructureSide, world_size: int, cfg: StructureConfig) -> tuple[int, int]:
    """(multiply-adds of the configured kNN on one rank, of the exact search through the same ring).

    Every rank searches all ``N`` queries against its ``n_r`` rows: exact ``N·n_r·w``; IVF visits
    ``nprobe/nlist`` of the shard per query, plus the coarse assignment of its own rows
    ``n_r·nlist·w``: ``N·n_r·w·nprobe/nlist + n_r·nlist·w``.
    """
    n_r, w, n = s.rows_per_rank(world_size), s.width, s.entities
    exact_madds = n * n_r * w
    is_exact, nlist, nprobe = _knn_settings(s, cfg)
    if is_exact:
        return exact_madds, exact_madds
    return n * n_r * w * nprobe // nlist + n_r * nlist * w, exact_madds


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
    for t in mspec.structure_tables(cfg.model, cfg.structure):
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


# --- the dry run ------------------------------------------------------------------------------------
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
    structure_host: int
    structure_device: int
    device_total: int
    host_total: int


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
        return _render(self)


def _optimizer_state_bytes(param: nn.Parameter, rows: int, cols: int, elem: int) -> int:
    """Fused-optimizer state of a ``rows × cols`` shard, from the optimizer ``prepare_tables`` put on
    the table's weight (the attribute TorchRec's sharders read it from too)."""
    opt = getattr(param, "_optimizer_classes", [None])[0]
    if opt is torch.optim.SGD:  # a never-trained table (reading b's P): stateless
        return 0
    if opt is torch.optim.Adam:
        return 2 * rows * cols * elem  # FBGEMM fused Adam: two moments per weight
    if opt is RowWiseAdagrad:
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


def _planner_storage(planner: EmbeddingShardingPlanner, world_size: int) -> tuple[list[int], list[int]]:
    """Per-rank (HBM, DDR) of the chosen plan, from the planner's sharding options.

    TorchRec keeps them in ``_best_plan`` only (no public accessor in 1.8.0); a missing attribute is
    an error here so that a TorchRec upgrade that moves it fails the tests, not a report silently.
    """
    best = getattr(planner, "_best_plan", None)
    if best is None:
        raise RuntimeError("EmbeddingShardingPlanner._best_plan is missing: update plan.py for this TorchRec")
    hbm, ddr = [0] * world_size, [0] * world_size
    for option in best:
        for shard in option.shards:
            hbm[shard.rank] += int(shard.storage.hbm)
            ddr[shard.rank] += int(shard.storage.ddr)
    return hbm, ddr


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
) -> DryRun:
    """Plans ``model_name`` for ``world_size`` ranks without a process group and estimates memory.

    ``gpus_per_node > 0`` plans CUDA ranks (local world size = GPUs per node), else CPU ranks on one
    node. ``hbm_gb`` (GiB per GPU) and ``ddr_gb`` (GiB per rank) default to TorchRec's 32 and 128.
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
    compute_device = "cuda" if gpus_per_node else "cpu"
    local_world_size = gpus_per_node or world_size
    hbm_cap = (int(hbm_gb * GIB) if hbm_gb is not None else HBM_CAP) if compute_device == "cuda" else 0
    ddr_cap = int(ddr_gb * GIB) if ddr_gb is not None else DDR_CAP

    mspec = get_model_spec(model_name)
    emb_opt = embedding_optimizer_name(cfg.optim, torch.device(compute_device))
    model = mspec.build(spec, cfg.model, torch.device("meta"), structure=cfg.structure)
    module = ModelTrain(model, mspec.build_loss(cfg.loss, cfg.model))
    constraints = prepare_tables(module, cfg.optim, emb_opt, mspec.structure_tables(cfg.model, cfg.structure))
    planner = build_planner(
        module,
        constraints,
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap_bytes=hbm_cap if compute_device == "cuda" else None,
        ddr_cap_bytes=ddr_cap,
    )
    t0 = time.perf_counter()
    try:
        plan = planner.plan(module, [RowWiseSharder()])
    except PlannerError as e:
        raise ValueError(f"no sharding plan fits {world_size} ranks: {e}") from None
    seconds = time.perf_counter() - t0
    logger.info("planned %s for %d %s ranks in %.2fs", model_name, world_size, compute_device, seconds)

    tables = _tables_from_plan(module, plan)
    hbm, ddr = _planner_storage(planner, world_size)
    dense_params = dense_parameter_bytes(module)
    dense_state = 4 * dense_params  # weights + grads + Adam exp_avg + exp_avg_sq

    train_sides, mine_sides = structure_sides(model, model_name, spec, cfg)
    mining = mining_structure_estimate(
        mine_sides if train_sides or mspec.representation_source else [], world_size, cfg.structure
    )
    if train_sides:
        structure = train_structure_estimate(
            train_sides, world_size, on_device=compute_device == "cuda", layers=cfg.structure.layers
        )
    elif mspec.representation_source is not None:
        structure = mining
    else:
        structure = NO_STRUCTURE

    ranks: list[RankPlan] = []
    for r in range(world_size):
        emb = sum(t.bytes_per_rank.get(r, 0) for t in tables)
        s_host = structure.host_rank0 if r == 0 else structure.host_other
        if compute_device == "cuda":
            device_total = hbm[r] + dense_state + structure.device
            host_total = ddr[r] + s_host
        else:
            device_total = 0
            host_total = ddr[r] + dense_state + s_host
        ranks.append(
            RankPlan(
                rank=r,
                tables=[t.name for t in tables if r in t.bytes_per_rank],
                embedding_bytes=emb,
                plan_hbm=hbm[r],
                plan_ddr=ddr[r],
                dense_bytes=dense_state,
                structure_host=s_host,
                structure_device=structure.device if compute_device == "cuda" else 0,
                device_total=device_total,
                host_total=host_total,
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
        embedding_optimizer=emb_opt,
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
    )


# --- rendering --------------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    """Human-readable binary size: 1.50 GiB, 312.0 MiB, 4.0 KiB, 12 B."""
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) <= 4:
        return ",".join(map(str, ranks))
    return f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def _render(d: DryRun) -> str:
    nodes = d.world_size // d.local_world_size
    if d.compute_device == "cuda":
        topo = (
            f"{d.world_size} ranks = {nodes} node(s) x {d.local_world_size} GPUs, "
            f"HBM {fmt_bytes(d.hbm_cap)} per GPU, host {fmt_bytes(d.ddr_cap)} per rank"
        )
    else:
        topo = f"{d.world_size} CPU ranks, host {fmt_bytes(d.ddr_cap)} per rank"
    opt_state = "2 x weights" if d.embedding_optimizer == "adam" else "one fp32 per row"
    lines = [
        f"sharding dry run: model {d.model}, spec from {d.spec_source}",
        f"topology: {topo}",
        f"embedding optimizer: fused {d.embedding_optimizer} (state {opt_state}); dense: Adam; "
        f"batch {d.batch_size} per rank; planned in {d.plan_seconds:.2f}s",
        "",
        f"embedding tables ({len(d.tables)}); bytes = weights + optimizer state",
    ]
    rows = [("table", "rows x dim", "sharding", "kernel", "ranks", "bytes")]
    for t in d.tables:
        rows.append(
            (
                t.name,
                f"{t.rows:,} x {t.dim}",
                t.sharding_type,
                t.compute_kernel,
                _ranks_text(t.ranks),
                fmt_bytes(t.bytes),
            )
        )
    rows.append(("total", "", "", "", "", fmt_bytes(d.total_embedding_bytes)))
    lines += _table(rows, right={1, 5})

    cuda = d.compute_device == "cuda"
    lines += [
        "",
        "per rank: emb w+opt = this rank's shards, weights + optimizer state; "
        f"plan {'HBM' if cuda else 'DDR'} = the planner's storage for them (adds input/output buffers);",
        f"  dense = {fmt_bytes(d.dense_params)} of dense weights x 4 (weights, grads, Adam's 2 moments) on "
        "every rank; struct = the structure step's peak (below); totals leave out the process itself "
        "(torch, CUDA context) and the node's Ray runtime"
        + ("" if cuda else ", its device transients included (host memory on CPU ranks)"),
    ]
    header: tuple[str, ...] = ("rank", "tables", "emb w+opt")
    if cuda:
        header += ("plan HBM", "dense", "struct dev", "device total", "plan DDR", "struct host", "host total")
    else:
        header += ("plan DDR", "dense", "struct host", "host total")
    rows = [header]
    over_device = over_host = 0
    for r in d.ranks:
        dflag = "!" if cuda and r.device_total > d.hbm_cap else ""
        hflag = "!" if r.host_total > d.ddr_cap else ""
        over_device += bool(dflag)
        over_host += bool(hflag)
        row: tuple[str, ...] = (
            str(r.rank),
            (",".join(r.tables) if len(r.tables) <= 2 else f"{len(r.tables)} tables") or "-",
            fmt_bytes(r.embedding_bytes),
        )
        if cuda:
            row += (
                fmt_bytes(r.plan_hbm),
                fmt_bytes(r.dense_bytes),
                fmt_bytes(r.structure_device),
                fmt_bytes(r.device_total) + dflag,
            )
        else:
            row += (fmt_bytes(r.plan_ddr), fmt_bytes(r.dense_bytes))
        row += ((fmt_bytes(r.plan_ddr),) if cuda else ()) + (
            fmt_bytes(r.structure_host),
            fmt_bytes(r.host_total) + hflag,
        )
        rows.append(row)
    lines += _table(rows, right=set(range(2, len(header))))
    per_node = d.local_world_size
    node_host = max(
        sum(r.host_total for r in d.ranks[i : i + per_node]) for i in range(0, d.world_size, per_node)
    )
    if cuda:
        worst = max(d.ranks, key=lambda r: r.device_total)
        lines.append(
            f"  largest device total: rank {worst.rank}, {fmt_bytes(worst.device_total)} of "
            f"{fmt_bytes(d.hbm_cap)}; ranks over the HBM cap: {over_device}"
        )
    worst = max(d.ranks, key=lambda r: r.host_total)
    lines.append(
        f"  largest host total: rank {worst.rank}, {fmt_bytes(worst.host_total)} of {fmt_bytes(d.ddr_cap)}; "
        f"ranks over the host cap: {over_host}; busiest node ({per_node} ranks): {fmt_bytes(node_host)} host"
    )

    lines += [
        "",
        "structure step, row-sharded: a rank holds n_r = ceil(N/W) rows of each side (its shard of U/I,",
        "counted above by the planner; its rows of Â; its block of representations) and the foreign rows",
        "it fetches or serves (f_r <= min(n_r·k, N − n_r)); nothing of size N",
    ]
    lines += _structure_lines(d.structure, "this job")
    if d.mining.phase != "none" and d.mining is not d.structure:
        lines += _structure_lines(d.mining, "before it, `pretrain`")
    if d.knn_madds_per_rank:
        lines.append(
            f"  kNN per rank (largest side, ring over {d.world_size} ranks): {d.knn_madds_per_rank:.2e} "
            f"multiply-adds; exact search through the ring N·n_r·w = {d.exact_knn_madds_per_rank:.2e}"
        )
    return "\n".join(lines) + "\n"


def _structure_lines(s: StructureEstimate, title: str) -> list[str]:
    if s.phase == "none":
        return [f"  {title}: this model reads no graphs, no structure step"]
    what = "SM initialisation + epoch-boundary β update" if s.phase == "train" else "graph mining"
    out = [f"  {title}: {what}, row-sharded over {s.world_size} rank(s)"]
    for x in s.sides:
        n_r, f_r = x.rows_per_rank(s.world_size), x.foreign_rows(s.world_size)
        out.append(
            f"    {x.side}: N={x.entities:,} n_r={n_r:,} M={x.fields} w={x.width} k={x.k} f_r<={f_r:,}"
        )
    out += [f"    {f}" for f in s.formulas]
    peaks = {"device": s.device, "host": s.host_rank0}
    rows: list[tuple[str, ...]] = [("where", "term", "formula", "bytes", "share")]
    for t in s.terms:
        share = 100 * t.bytes / peaks[t.where] if peaks[t.where] else 0.0
        name = t.name + (" [rank 0 only]" if t.rank0_only else "")
        rows.append((t.where, name, t.formula, fmt_bytes(t.bytes), f"{share:.1f} %"))
    out += ["  " + line for line in _table(rows, right={3, 4})]
    host = (
        f"host {fmt_bytes(s.host_rank0)} on every rank"
        if s.host_rank0 == s.host_other
        else f"host {fmt_bytes(s.host_rank0)} on rank 0, {fmt_bytes(s.host_other)} on the others"
    )
    device = f"device {fmt_bytes(s.device)} per rank; " if s.device else ""
    out.append(f"    peak: {device}{host} (shares: of that peak, rank 0)")
    out.append(f"    dominant term: {s.dominant}")
    out += [f"    note: {n}" for n in s.notes]
    return out


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  " + "  ".join(cells).rstrip()

    out = [line(rows[0]), "  " + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return out
