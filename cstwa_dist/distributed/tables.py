"""Reads and writes of (sharded) embedding tables for the structure steps.

The local shards in a sharded EBC's ``state_dict()`` are views of the live FBGEMM weights, so an
in-place ``copy_`` into them updates the table that the next forward uses (docs/platform-notes.md).

* :func:`local_rows` is what the structure step uses: a row-wise sharded table's row blocks in rank
  order and a live view of this rank's block. Per-rank memory: nothing beyond the shard itself.
* :func:`read_full_table` / :func:`write_full_table` move a whole table (every rank gets all of it,
  ``rows × width`` floats): for tests and small tables only, never on the training path.
* :func:`table_keys`, :func:`table_configs` and :func:`local_blocks` are the walk over every table of
  a whole model that the warm start (``train/warmstart.py``) and the seeded initialisation
  (``distributed/init.py``) share: each table's ``state_dict`` key, its config, and the blocks of it
  this rank holds with their global offsets. Per-rank memory: none (views).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cstwa_dist.distributed.collectives import all_reduce_sum
from cstwa_dist.distributed.exchange import world as _world

#: what marks a table's weight in a model's ``state_dict`` key: ``<collection>.embedding_bags.<table>.weight``
_TABLE_MARK = ".embedding_bags."


def table_name(key: str) -> str | None:
    """The table a ``state_dict`` key is the weight of (``shared__user_id``), or None for any other key."""
    if _TABLE_MARK not in key or not key.endswith(".weight"):
        return None
    return key.split(_TABLE_MARK, 1)[1].rsplit(".weight", 1)[0]


def table_keys(state: Mapping[str, object]) -> dict[str, str]:
    """Table name → its weight's key in ``state`` (a whole model's ``state_dict``, sharded or not)."""
    return {name: k for k in state if (name := table_name(k)) is not None}


def table_configs(model: nn.Module) -> dict[str, EmbeddingBagConfig]:
    """Table name → its ``EmbeddingBagConfig`` (global rows, width, init bounds), for every embedding
    collection of ``model``, sharded (the sharded collection keeps the configs it was built from) or
    not."""
    out: dict[str, EmbeddingBagConfig] = {}
    for _, m in model.named_modules():
        configs = getattr(m, "_embedding_bag_configs", None)
        if configs is None and hasattr(m, "embedding_bag_configs"):
            configs = m.embedding_bag_configs()
        for c in configs or ():
            out[c.name] = c
    return out


def local_blocks(t: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """``(row offset, column offset, live view)`` of every block of a table this rank holds: each local
    shard of a ``ShardedTensor`` (writes into the view change the table), or the whole tensor of an
    unsharded or replicated table."""
    if isinstance(t, ShardedTensor):
        return [
            (int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor)
            for s in t.local_shards()
        ]
    return [(0, 0, t)]


def _table_state(ebc: nn.Module, table: str) -> torch.Tensor:
    key = f"embedding_bags.{table}.weight"
    sd = ebc.state_dict()
    if key not in sd:
        raise KeyError(f"no table {table!r} in this collection; has {sorted(sd)}")
    return sd[key]


@torch.no_grad()
def read_full_table(ebc: nn.Module, table: str, device: torch.device) -> torch.Tensor:
    """The whole ``[rows, width]`` table on every rank (float32, on ``device``)."""
    t = _table_state(ebc, table)
    if not isinstance(t, ShardedTensor):  # unsharded or replicated: every rank already has it all
        return t.detach().to(device=device, dtype=torch.float32).clone()
    full = torch.zeros(tuple(t.size()), dtype=torch.float32, device=device)
    for shard in t.local_shards():
        (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        full[r : r + h, c : c + w] = shard.tensor.to(device=device, dtype=torch.float32)
    return all_reduce_sum(full)


@torch.no_grad()
def write_full_table(ebc: nn.Module, table: str, full: torch.Tensor) -> None:
    """Writes ``full`` (the same on every rank) into this rank's shards of the live table."""
    t = _table_state(ebc, table)
    if tuple(full.shape) != tuple(t.size()):
        raise ValueError(f"table {table!r} is {tuple(t.size())}, got {tuple(full.shape)}")
    if not isinstance(t, ShardedTensor):
        t.copy_(full.to(device=t.device, dtype=t.dtype))
        return
    for shard in t.local_shards():
        (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shard.tensor.copy_(
            full[r : r + h, c : c + w].to(device=shard.tensor.device, dtype=shard.tensor.dtype)
        )


@torch.no_grad()
def local_rows(ebc: nn.Module, table: str) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """``(ranges, rows)``: every rank's row block ``[lo, hi)`` of ``table`` in rank order, and a live
    view ``[hi − lo, width]`` of this rank's block (writes into it change the table).

    The table must be row-wise sharded (each shard spans all columns; blocks contiguous in rank
    order, as TorchRec places them) or, on one process, unsharded. A rank without a shard gets an
    empty block. Anything else is an error naming the table: the structure step would otherwise
    read or write rows it does not own.
    """
    rank, world = _world()
    t = _table_state(ebc, table)
    if not isinstance(t, ShardedTensor):
        if world > 1:
            raise ValueError(f"table {table!r} is not sharded; the structure step needs it row-wise")
        return [(0, int(t.shape[0]))], t
    rows, width = (int(s) for s in t.size())
    blocks: dict[int, tuple[int, int]] = {}
    for md in t.metadata().shards_metadata:
        (r, c), (h, w) = md.shard_offsets, md.shard_sizes
        if c != 0 or w != width:
            raise ValueError(f"table {table!r} is not row-wise sharded (a shard spans columns {c}..{c + w})")
        owner = md.placement.rank() if md.placement is not None else -1
        if owner in blocks:
            raise ValueError(f"table {table!r} has more than one row block on rank {owner}")
        blocks[owner] = (int(r), int(r) + int(h))
    ranges: list[tuple[int, int]] = []
    pos = 0
    for rk in range(world):
        lo, hi = blocks.get(rk, (pos, pos))
        if lo != pos:
            raise ValueError(
                f"table {table!r}: rank {rk}'s rows start at {lo}, expected {pos} (blocks {blocks})"
            )
        ranges.append((lo, hi))
        pos = hi
    if pos != rows:
        raise ValueError(f"table {table!r}: row blocks cover {pos} of {rows} rows")
    shards = t.local_shards()
    view = shards[0].tensor if shards else torch.empty((0, width), dtype=t.dtype)
    return ranges, view
