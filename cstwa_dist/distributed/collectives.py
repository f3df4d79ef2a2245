"""Collective helpers used by the trainer, metrics and structure steps (nothing model-specific)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenates equal-shaped tensors from every rank along the last dim (rank order)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-1)


def gather_rows_to_main(t: torch.Tensor) -> torch.Tensor | None:
    """Concatenates tensors whose first dims differ between ranks (rank order) on rank 0 only.

    Evaluation needs every prediction in one place, but only in one: an all-gather would put
    O(evaluated rows) on every rank. Memory: rank 0 holds ``W·max_rows`` rows
    (the padded parts) while concatenating; the other ranks their own rows only. Returns None on
    ranks other than 0.
    """
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)  # W integers
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    if dist.get_rank() != 0:
        dist.gather(padded, None, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in counts]
    dist.gather(padded, parts, dst=0)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` over ranks in place and returns it."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def summed(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks as a new tensor (``t`` is left as it was)."""
    return all_reduce_sum(t.detach().clone()) if world_size() > 1 else t


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (small metadata only: pickled)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
