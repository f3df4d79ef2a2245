"""Process-group setup and teardown: torchrun's environment, or a 1-process group otherwise.

A 1-process run still gets a (gloo) process group so that the same DistributedModelParallel code
path trains at every world size; there is no separate "local" model path to drift apart.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistEnv:
    """Joins torchrun's group (``RANK``/``WORLD_SIZE`` set) or creates a private 1-process group.

    NCCL on CUDA nodes, gloo on CPU. Idempotent: an existing default group is reused.
    """
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    logger.debug("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown_distributed(barrier: bool = True) -> None:
    """Barrier before destroy: without it gloo occasionally aborts at exit (docs/platform-notes.md).

    ``barrier=False`` (a rank leaving with an error) leaves the group alone: a barrier or a destroy
    could wait for peers that are blocked in a collective this rank will never join.
    """
    if dist.is_initialized() and barrier:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on the loopback interface (for a rendezvous this process starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
