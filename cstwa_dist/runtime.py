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

**Loopback and a token.** Either way the runtime listens on 127.0.0.1 only and has Ray's token
authentication on: the launcher passes its job token's file in ``RAY_AUTH_TOKEN_PATH``; a private
runtime gets a token of its own, made once per process in a 0700 folder that also holds Ray's temp dir
(Ray makes that one world-writable) and is removed when the process exits. Child processes (bench's
ranks) inherit the token's location with the address, so they can attach.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Set to 0, Ray takes loopback for this node's address instead of the machine's outward one; only then
# do its gRPC servers (GCS, raylet, the workers' and the driver's) bind 127.0.0.1 alone rather than all
# interfaces. Its only other effect is that no other node can join, which is never done here.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_private_dir: Path | None = None  # this process's private-runtime folder (token + Ray temp dir)


def quiet_ray_loggers() -> None:
    """Ray Data logs every dataset execution at INFO (several lines per epoch and rank)."""
    import ray.data  # noqa: F401  (importing ray.data configures its loggers; override after that)

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _node_address_on_loopback() -> None:
    """Makes this process, and the Ray processes it starts, take 127.0.0.1 as the node's address.

    The environment variable reaches child processes; Ray reads it into a module constant when it is
    imported (usually already done here), so that constant is set too.
    """
    os.environ[_CLUSTER_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _private_runtime_dir() -> Path:
    """This process's folder for a private runtime, with its token, made (0700) on first use.

    One per process, not per runtime: Ray's driver caches the token it read first, so a second private
    runtime in the same process must keep the same token.
    """
    global _private_dir
    if _private_dir is None or not _private_dir.is_dir():
        _private_dir = Path(tempfile.mkdtemp(prefix="cstwa-ray."))  # mode 0700
        token = _private_dir / "auth_token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        atexit.register(shutil.rmtree, _private_dir, ignore_errors=True)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        os.environ.pop("RAY_AUTH_TOKEN", None)
        # Ray read RAY_AUTH_MODE into its config when it was imported, and its token loader may have
        # looked for a token already: both read the environment again (as Ray's own tests do).
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return _private_dir


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
        if not address or address.split(":")[0] in (LOOPBACK, "localhost"):
            # so that this driver's own server listens on loopback too
            _node_address_on_loopback()
        if address:
            # Attaching: resources belong to the node runtime, so num_cpus is not passed.
            ray.init(address=address, **common)
            self.address = address
            log.info("attached to Ray runtime at %s", address)
        else:
            # address="local" always starts a new runtime: never reads Ray's current-cluster file.
            folder = _private_runtime_dir()
            ray.init(
                address="local",
                include_dashboard=False,
                num_cpus=self.num_cpus,
                _node_ip_address=LOOPBACK,
                _temp_dir=str(folder / "ray"),
                **common,
            )
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
