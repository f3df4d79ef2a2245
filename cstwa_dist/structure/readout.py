"""Representation read-out (Eq. 2): ``r_u`` / ``r_i`` for every entity from (sharded) field tables.

Lookups go through the collection's own forward with a KeyedJaggedTensor of entity profiles, so the
sharding plan (which rank owns which table or rows) is TorchRec's business, not ours. Entities are
split evenly over ranks and looked up in equal-count chunks (the last chunk padded), because a
sharded forward is a collective that every rank must enter the same number of times.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from cstwa_dist.data.batch import make_kjt
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.collectives import all_gather_rows
from cstwa_dist.distributed.env import DistEnv

logger = logging.getLogger(__name__)


@torch.no_grad()
def side_representations(
    embeddings: nn.Module,
    spec: DatasetSpec,
    side: str,
    profiles: np.ndarray,
    env: DistEnv,
    chunk: int = 65536,
) -> torch.Tensor:
    """``[N, M_side·D]`` representations of every entity of ``side``, on every rank (CPU float32).

    ``embeddings`` is a ``FieldEmbeddings`` (its EBC possibly sharded); ``profiles`` comes from
    ``entity_profiles``: row = entity id, columns = the side's fields in ``spec.side_fields`` order.
    """
    if side not in ("user", "item"):
        raise ValueError(f"side must be user or item, got {side!r}")
    side_names = [f.name for f in spec.side_fields(side)]
    n = profiles.shape[0]
    per_rank = math.ceil(n / env.world_size)
    lo, hi = min(env.rank * per_rank, n), min((env.rank + 1) * per_rank, n)
    steps = max(1, math.ceil(per_rank / chunk))
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for s in range(steps):
        a, b = min(lo + s * chunk, hi), min(lo + (s + 1) * chunk, hi)
        real = b - a
        rows = np.zeros((chunk, len(side_names)), dtype=np.int64)
        rows[:real] = profiles[a:b]
        cols = {name: torch.zeros(chunk, dtype=torch.int64) for name in spec.names}
        for j, name in enumerate(side_names):
            cols[name] = torch.from_numpy(rows[:, j].copy())
        kjt = make_kjt(cols, spec.names).to(env.device)
        r_u, r_i, _ = embeddings(kjt)
        out.append((r_u if side == "user" else r_i)[:real].float().cpu())
    local = torch.cat(out) if out else torch.zeros(0)
    full = all_gather_rows(local.to(env.device)).cpu()
    logger.info(
        "read out %d %s representations of width %d in %.1fs",
        n,
        side,
        full.shape[1],
        time.perf_counter() - t0,
    )
    return full
