"""Seeded initialisation that does not depend on the world size, the sharding plan or the rank.

**Tables.** TorchRec initialises each rank's shards from that rank's own torch stream, so a table's
starting values depend on which rank holds it and on how many ranks there are. :func:`init_tables`
overwrites every embedding table after DistributedModelParallel is built (``sharding.shard_model``,
the one place every training path builds its model) with values that are a function of
``(seed, table name, global row)`` alone (and of the table's width and init bounds): the table is cut
into blocks of :data:`BLOCK_ROWS` rows, and block ``b`` is drawn, ``BLOCK_ROWS × width`` row-major,
from a ``torch.Generator`` seeded by :func:`stable_seed` ``(seed, table, b)`` (a BLAKE2b digest, not
Python's salted ``hash``). Each rank draws only the blocks that overlap its own shards and copies the
overlap (rows, and for a column-wise shard its columns) into the live shard. The same table therefore
starts with the same values on 1 process, on any number of ranks, under any plan, after a reshard,
and its first rows keep their values when the table grows (a block is always drawn whole).

The distribution is TorchRec's: uniform on the table's ``EmbeddingBagConfig`` bounds
(``weight_init_min``/``max`` when set: ``models/blocks.py`` ``init_bounds``; otherwise TorchRec's
default ``±√(1/num_embeddings)`` of the whole table).

**Dropout** (:func:`step_seed`): the trainer seeds the torch stream before every training step from
``(seed, epoch, rank, step)``, so each rank draws its own masks (not one rank's repeated) and a resumed
run draws those of the uninterrupted one whatever RNG state its checkpoint holds. Data order is not
drawn from that stream (``data/shares.py`` has its own generators).

**Dense layers** (:func:`init_dense`): DistributedModelParallel materialises the model's ``meta``
dense layers *after* sharding the tables, from the torch stream the tables' initialisation has just
drawn from, so rank 0's dense start (which DDP broadcasts) depended on which tables rank 0 holds: the
ranks agreed with each other but not with 1 process. :func:`init_dense` materialises them before the
DMP is built, on CPU from a stream seeded by ``(seed, "dense")`` alone, module by module in the order
DMP would (``module.apply``: children first, each module's ``reset_parameters``), then moves them to
the device: the same start on every rank, at every world size, on CPU and GPU.

Per-rank memory: one block (``BLOCK_ROWS × width × 4`` bytes: 512 KiB at width 16, 2.6 MiB for CSTWA's
``sm__user`` at width 80) beyond the rank's own shards. Time: each rank draws its own rows, plus at
most one partial block at each end of each of its shards (and a column-wise shard's rows at full
width): about 10M rows/s at width 16 on one CPU core. Measured on the demo (2 ranks, configs/demo.yaml):
4–70 ms and 0.5–3.2 MiB of peak RSS per rank.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import torch
from torch import nn

from cstwa_dist.distributed.tables import local_blocks, table_configs, table_keys

logger = logging.getLogger(__name__)

#: rows drawn from one generator; part of the definition of the initial values (changing it changes
#: every table's start)
BLOCK_ROWS = 8192
_TABLE_STREAM = "cstwa-table-init-v1"
_STEP_STREAM = "cstwa-step-v1"
_DENSE_STREAM = "cstwa-dense-init-v1"


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that is a function of ``parts`` (their ``repr``s) alone: the same in every process
    and Python version (BLAKE2b; Python's ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(repr(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def table_block(seed: int, table: str, block: int, width: int, low: float, high: float) -> torch.Tensor:
    """Rows ``[block·BLOCK_ROWS, (block + 1)·BLOCK_ROWS)`` of ``table``'s initial values (float32, CPU),
    uniform on ``[low, high)``; rows past the table's end are drawn too (and dropped by the caller)."""
    g = torch.Generator(device="cpu").manual_seed(stable_seed(_TABLE_STREAM, int(seed), table, int(block)))
    return torch.empty((BLOCK_ROWS, width), dtype=torch.float32).uniform_(low, high, generator=g)


def step_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The torch seed of training step ``step`` (0-based, within the epoch) of ``epoch`` on ``rank``."""
    return stable_seed(_STEP_STREAM, int(seed), int(epoch), int(rank), int(step))


@torch.no_grad()
def fill_block(
    view: torch.Tensor, row0: int, col0: int, seed: int, table: str, width: int, low: float, high: float
) -> None:
    """Writes ``table``'s seeded values of rows ``[row0, row0 + h)`` and columns ``[col0, col0 + w)``
    into ``view`` (``[h, w]``, a shard of a table ``width`` wide), drawing the blocks it overlaps."""
    h, w = int(view.shape[0]), int(view.shape[1])
    if h == 0 or w == 0:
        return
    for b in range(row0 // BLOCK_ROWS, (row0 + h - 1) // BLOCK_ROWS + 1):
        start = b * BLOCK_ROWS
        lo, hi = max(row0, start), min(row0 + h, start + BLOCK_ROWS)
        values = table_block(seed, table, b, width, low, high)[lo - start : hi - start, col0 : col0 + w]
        view[lo - row0 : hi - row0].copy_(values.to(device=view.device, dtype=view.dtype))


@torch.no_grad()
def init_tables(model: nn.Module, seed: int) -> dict[str, Any]:
    """Overwrites this rank's part of every embedding table of ``model`` (a DistributedModelParallel or
    any module holding embedding collections, sharded or not) with the seeded values (module doc).

    Runs no collective: each rank writes its own shards. Returns ``{"tables", "rows", "seconds"}``
    (the tables, this rank's rows written, the time taken).
    """
    t0 = time.perf_counter()
    configs = table_configs(model)
    state = model.state_dict()
    keys = table_keys(state)
    missing = sorted(set(configs) - set(keys))
    if missing:
        raise ValueError(f"tables {missing} have no weight in the model's state_dict")
    written = 0
    for table in sorted(configs):
        cfg = configs[table]
        low, high = float(cfg.get_weight_init_min()), float(cfg.get_weight_init_max())
        for row0, col0, view in local_blocks(state[keys[table]]):
            fill_block(view, row0, col0, seed, table, int(cfg.embedding_dim), low, high)
            written += int(view.shape[0])
    seconds = time.perf_counter() - t0
    logger.debug("seeded table init: %d tables, %d local rows in %.3f s", len(configs), written, seconds)
    return {"tables": len(configs), "rows": written, "seconds": seconds}


@torch.no_grad()
def init_dense(module: nn.Module, device: torch.device, seed: int, skip: set[int]) -> int:
    """Materialises every ``meta`` parameter of ``module`` outside ``skip`` (the ids of the embedding
    tables' parameters, which DMP shards) with the module's ``reset_parameters``, drawn on CPU from a
    stream seeded by ``(seed, "dense")`` and moved to ``device``, and every ``meta`` buffer of those
    modules as zeros, as DMP's own materialisation does; the global torch stream is left as it was.
    Returns the number of parameters materialised. Per-rank memory: the dense layers, once."""
    done = 0

    def materialise(m: nn.Module) -> None:
        nonlocal done
        names = [
            n
            for n, p in m._parameters.items()
            if isinstance(p, torch.Tensor) and p.device.type == "meta" and id(p) not in skip
        ]
        if not names:
            return
        for n in names:
            p = m._parameters[n]
            assert p is not None
            m._parameters[n] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        for n, b in m._buffers.items():
            if isinstance(b, torch.Tensor) and b.device.type == "meta":
                m._buffers[n] = torch.zeros_like(b, device="cpu")
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            logger.warning("%s has no reset_parameters: its parameters start uninitialised", type(m).__name__)
        for n in names:
            p = m._parameters[n]
            assert p is not None
            m._parameters[n] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
        for n, b in m._buffers.items():
            if isinstance(b, torch.Tensor) and b.device.type == "cpu" and device.type != "cpu":
                m._buffers[n] = b.to(device)
        done += len(names)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(_DENSE_STREAM, int(seed)))
        module.apply(materialise)
    return done
