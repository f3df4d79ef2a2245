"""Representation read-out (Eq. 2): ``r_u`` / ``r_i`` of this rank's entities from (sharded) field tables.

Lookups go through the collection's own forward with a KeyedJaggedTensor of entity profiles, so the
sharding plan (which rank owns which table or rows) is TorchRec's business, not ours. Each rank reads
out the entities of its own row block only; the blocks are looked up in equal-count chunks (the last
one padded) and every rank runs the same number of chunks, because a sharded forward is a collective
that every rank must enter the same number of times.

Per-rank memory (:func:`readout_memory`): the block's entity profiles and its representations, plus
one chunk's KJT (``chunk · fields`` ids) and its pooled output ``chunk · width``; nothing of size ``N``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cstwa_dist.data.batch import make_kjt
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.structure.memory import MemoryItem

logger = logging.getLogger(__name__)


def readout_memory(rows: int, fields: int, width: int) -> list[MemoryItem]:
    """Per-rank memory of reading out a block of ``n_r = rows`` entities with ``M = fields`` side
    fields into ``w = width`` floats: what :func:`side_representations` is given and returns, on the
    host.

    * ``profiles``: the block's profiles from ``data.entities.read_entity_rows``, ``M`` int64 ids a
      row, and its ``seen`` flags, counted at 8 B a row though they are one byte:
      ``n_r·(M+1)·8`` (``7·n_r`` B over);
    * ``representations``: the block's read-out, float32, ``n_r·w·4``.

    One chunk's KJT and pooled output (``chunk`` rows, freed chunk by chunk) are left out: they do
    not grow with the block.
    """
    return [
        MemoryItem("profiles", "profiles", rows * (fields + 1) * 8, "n_r·(M+1)·8", detail="int64 + seen"),
        MemoryItem("representations", "representations", rows * width * 4, "n_r·w·4"),
    ]


@torch.no_grad()
def side_representations(
    embeddings: nn.Module,
    spec: DatasetSpec,
    side: str,
    profiles: np.ndarray,
    ranges: Sequence[tuple[int, int]],
    env: DistEnv,
    chunk: int = 65536,
) -> torch.Tensor:
    """``[hi − lo, width]`` representations of this rank's entities ``ranges[rank]`` (CPU float32).

    ``embeddings`` is a ``FieldEmbeddings`` (its EBC possibly sharded; its user/item view is what is
    returned, so a collection holding only some of the side's fields returns only those); ``profiles``
    are this rank's entities' rows from ``data.entities.read_entity_rows`` (columns in
    ``spec.side_fields(side)`` order). Every rank must call it with the same ``ranges``.
    """
    if side not in ("user", "item"):
        raise ValueError(f"side must be user or item, got {side!r}")
    lo, hi = ranges[env.rank]
    if profiles.shape[0] != hi - lo:
        raise ValueError(f"rank {env.rank}: {profiles.shape[0]} profile rows for the block [{lo}, {hi})")
    side_names = [f.name for f in spec.side_fields(side)]
    if profiles.ndim != 2 or profiles.shape[1] != len(side_names):
        raise ValueError(f"profiles have shape {profiles.shape}; the {side} side has fields {side_names}")
    longest = max(b - a for a, b in ranges)
    steps = max(1, math.ceil(longest / chunk))
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for s in range(steps):
        a, b = min(s * chunk, hi - lo), min((s + 1) * chunk, hi - lo)
        real = b - a
        rows = np.zeros((chunk, len(side_names)), dtype=np.int64)
        rows[:real] = profiles[a:b]
        cols = {name: torch.zeros(chunk, dtype=torch.int64) for name in spec.names}
        for j, name in enumerate(side_names):
            cols[name] = torch.from_numpy(rows[:, j].copy())
        kjt = make_kjt(cols, spec.names).to(env.device)
        r_u, r_i, _ = embeddings(kjt)
        out.append((r_u if side == "user" else r_i)[:real].float().cpu())
    local = torch.cat(out)
    logger.info(
        "read out %d of %d %s representations of width %d in %.1fs",
        hi - lo,
        ranges[-1][1],
        side,
        local.shape[1],
        time.perf_counter() - t0,
    )
    return local
