"""The node's Ray runtime as a process sees it: attach to it, or start a private one.

It sits below ``data/`` (the readers and the importers stream through it) and ``distributed/`` (a
training command's :func:`~cstwa_dist.distributed.env.command_runtime` opens it after the process
group), so both depend on it downward and neither on the other.

**One Ray runtime per node.** The launcher (``launchers/ray_runtime.sh``) runs ``ray start --head``
before torchrun, waits until it answers and exports ``RAY_ADDRESS``; every rank attaches to it
(:class:`RayRuntime`), so the ranks of a node share one object store (a per-rank runtime works too
but doubles memory, ~2.5 GB each). Without ``RAY_ADDRESS`` a single-process run starts a private
runtime with ``address="local"`` — never a bare ``ray.init()``, which would pick up a stale
current-cluster file left by a killed runtime and fail (docs/platform-notes.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

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
