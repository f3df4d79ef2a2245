"""The process runtime of a training command: the process group and the node's Ray runtime, together.

Every training command (``pretrain``, ``train``, ``experiment``, later benchmarks) needs both, in
this order: the process group first (so a rank that fails to join fails before Ray starts), then the
Ray runtime the readers stream through; and at the end the Ray driver detached and the group torn
down with a barrier. ``command_runtime`` is that block, written once.

**One Ray runtime per node.** The launcher (``launchers/ray_runtime.sh``) runs ``ray start --head``
before torchrun, waits until it answers and exports ``RAY_ADDRESS``; every rank attaches to it
(:class:`RayRuntime`), so the ranks of a node share one object store (a per-rank runtime works too
but doubles memory, ~2.5 GB each). Without ``RAY_ADDRESS`` a single-process run starts a private
runtime with ``address="local"`` — never a bare ``ray.init()``, which would pick up a stale
current-cluster file left by a killed runtime and fail (docs/platform-notes.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from cstwa_dist.distributed.env import DistEnv, init_distributed, shutdown_distributed

log = logging.getLogger(__name__)


def quiet_ray_loggers() -> None:
    """Ray Data logs every dataset execution at INFO (several lines per epoch and rank)."""
    import ray.data  # noqa: F401  (importing ray.data configures its loggers; override after that)

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RayRuntime:
    """Context manager giving this process a Ray runtime (the readers' and the importers' tasks).

    Attaches to the node's runtime when ``RAY_ADDRESS`` is set; otherwise starts a private local
    runtime and stops it on exit. If Ray is already initialised in this process (e.g. the caller or
    an outer ``RayRuntime`` did it) it does nothing, on entry and on exit.
    """

    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus
        self._owned = False
        self.address: str | None = None

    def __enter__(self) -> RayRuntime:
        import ray

        quiet_ray_loggers()
        if ray.is_initialized():
            log.debug("ray already initialised in this process; reusing it")
            return self
        address = os.environ.get("RAY_ADDRESS")
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            # Attaching: resources belong to the node runtime, so num_cpus is not passed.
            ray.init(address=address, **common)
            self.address = address
            log.info("attached to Ray runtime at %s", address)
        else:
            # address="local" always starts a new runtime: never reads Ray's current-cluster file.
            ray.init(address="local", include_dashboard=False, num_cpus=self.num_cpus, **common)
            # the runtime's own address, so that child processes (bench's ranks) can attach to it
            self.address = ray.get_runtime_context().gcs_address
            log.info("started a private local Ray runtime (num_cpus=%s)", self.num_cpus)
        self._owned = True
        return self

    @staticmethod
    def current_address() -> str | None:
        """The address of the runtime this process is attached to (or started), for child processes."""
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().gcs_address

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._owned and ray.is_initialized():
            # For an attached runtime this only disconnects this driver; a local one is stopped.
            ray.shutdown()
        self._owned = False


@contextlib.contextmanager
def command_runtime(
    ray_num_cpus: int | None = None, collective_timeout_s: float | None = None
) -> Iterator[DistEnv]:
    """Process group + Ray runtime for the body of one command; both torn down however it ends.

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
