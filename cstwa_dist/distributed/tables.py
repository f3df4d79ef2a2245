"""Whole-table reads and writes of (sharded) embedding tables, for the structure steps.

The local shards in a sharded EBC's ``state_dict()`` are views of the live FBGEMM weights, so an
in-place ``copy_`` into them updates the table that the next forward uses (docs/platform-notes.md). Reading
fills a zero buffer from the local shards by their offsets and sums over ranks: every rank gets the
full table. That is O(rows × width) memory per rank — right for this slice, not for 30M users; the
row-sharded path (neighbour rows fetched by all-to-all) is the scalable issue's job.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from cstwa_dist.distributed.collectives import all_reduce_sum


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
