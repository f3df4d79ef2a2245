"""Process-group setup and teardown: torchrun's environment, or a 1-process group otherwise.

A 1-process run still gets a (gloo) process group so that the same DistributedModelParallel code
path trains at every world size; there is no separate "local" model path to drift apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cstwa_dist.distributed.sockets import listen_on
from cstwa_dist.runtime import RayRuntime

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


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Joins torchrun's group (``RANK``/``WORLD_SIZE`` set) or creates a private 1-process group.

    NCCL on CUDA nodes, gloo on CPU. Idempotent: an existing default group is reused (and keeps its
    timeout). ``timeout_s`` bounds how long any collective waits for a peer (``train.
    collective_timeout_s``; the backend's own default when ``None``).

    Every port the group opens is bound to the address the launcher names, none to all interfaces:
    the rendezvous store that rank 0 hosts listens on ``MASTER_ADDR`` only (:func:`_bound_store`),
    and gloo's sockets are on loopback when every peer is on this node (:func:`_gloo_on_loopback`).

    Under torchrun's agent store the group's keys live under one prefix per restart attempt
    (:func:`_attempt_store`): without it a worker group restarted by ``--max-restarts`` reads the
    killed group's gloo addresses and hangs or fails while connecting (README, "Checkpoints, restarts
    and resuming").
    """
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            _gloo_on_loopback(_is_loopback(os.environ.get("MASTER_ADDR", "")))
            store = _attempt_store(timeout_s)
            if store is None:
                store = _bound_store(rank, world, timeout_s)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, **kw)
        else:
            _gloo_on_loopback(True)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    logger.debug("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def _attempt_store(timeout_s: float | None) -> dist.Store | None:
    """torchrun's agent store seen through a ``/worker/attempt_<restart count>`` prefix, or ``None``.

    With ``TORCHELASTIC_USE_AGENT_STORE=True`` the workers share a TCP store that the torchrun agent
    keeps for its whole life (the static rendezvous always; the c10d one unless
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), and torch (2.4+) no longer prefixes the workers' keys
    per attempt. A restarted group then finds the killed group's keys — among them each rank's gloo
    address — and a rank that reads its peer's before the peer rewrote it gets a dead address:
    "Connection refused", or (both ranks waiting for the other to connect) a hang in
    ``ProcessGroupGloo``'s ``connectFullMesh`` that the group's timeout does not end. One prefix per
    attempt, as torch had before, gives every attempt fresh keys. The prefix assumes every agent of
    the job counts the same restarts: always true on one node; with the static rendezvous on several
    nodes only while every node's group fails and restarts together (a node whose ranks survive does
    not restart). ``launchers/torchrun.sh`` runs the c10d rendezvous (where a node that only saw a
    membership change does not count a restart) with a fresh store per rendezvous round instead,
    which turns this off (``TORCHELASTIC_USE_AGENT_STORE=False``).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else dist.constants.default_pg_timeout
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/worker/attempt_{attempt}", agent)


def _bound_store(rank: int, world: int, timeout_s: float | None) -> dist.Store:
    """The group's TCP store at ``MASTER_ADDR:MASTER_PORT``; rank 0 hosts it, listening there only.

    What ``init_process_group``'s ``env://`` rendezvous does, except for where the server listens:
    torch 2.13's ``TCPStore`` takes no bind address and listens on every interface (``::``), open,
    without authentication, to anyone who can reach the node. It does take a listening socket
    (``master_listen_fd``, honoured by both the libuv and the classic backend, which take the socket
    over and close it with the store), so rank 0 binds one to ``MASTER_ADDR`` itself: loopback for
    the ranks :func:`~cstwa_dist.distributed.spawn.spawn_ranks` starts, the address torchrun's
    rendezvous publishes for a worker group (``--local-addr``, else the host's FQDN). The keys are
    prefixed as ``env://`` prefixes them; ``USE_LIBUV=0`` picks the classic backend, as there.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else dist.constants.default_pg_timeout
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1"
    if rank == 0:
        fd = listen_on(addr, port, "rank 0's store").detach()  # the store owns the socket from here on
        store = dist.TCPStore(
            addr,
            port,
            world,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=fd,
            use_libuv=use_libuv,
        )
    else:
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout, use_libuv=use_libuv)
    return dist.PrefixStore("default_pg", store)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to loopback addresses only (then every rank runs on this node)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _gloo_on_loopback(local_only: bool) -> None:
    """``GLOO_SOCKET_IFNAME=lo`` unless already set, when every peer of the group is on this node.

    Without it gloo listens on the address the host name resolves to, often an outward interface
    (a pod's IP), even for a 1-process group or ranks that only talk over loopback. A group whose
    store is on a loopback ``MASTER_ADDR`` can only have ranks on this node. Set for the process (gloo
    reads it whenever it creates a group, subgroups included); a value already set is left alone.
    """
    interfaces = {name for _, name in socket.if_nameindex()}
    if local_only and "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in interfaces:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def command_runtime(
    ray_num_cpus: int | None = None, collective_timeout_s: float | None = None
) -> Iterator[DistEnv]:
    """Process group + Ray runtime for the body of one command; both torn down however it ends.

    Every training command (``pretrain``, ``train``, ``experiment``, the benchmarks) needs both, in
    this order: the process group first (so a rank that fails to join fails before Ray starts), then
    the node's Ray runtime the readers stream through (:class:`cstwa_dist.runtime.RayRuntime`); at
    the end the Ray driver detaches and the group is torn down with a barrier.

    ``ray_num_cpus`` sizes a private runtime only (``data.ray_num_cpus``); an attached node runtime
    was sized by its launcher. ``collective_timeout_s`` is the process group's timeout
    (``train.collective_timeout_s``).
    """
    env = init_distributed(timeout_s=collective_timeout_s)
    failed = True
    try:
        with RayRuntime(num_cpus=ray_num_cpus):
            yield env
        failed = False
    finally:
        # After an error, no barrier: the other ranks may be blocked in a collective this rank will
        # never join. This rank exits at once with its error; torchrun then stops the rest within
        # seconds instead of letting them wait out the collective timeout.
        shutdown_distributed(barrier=not failed)
