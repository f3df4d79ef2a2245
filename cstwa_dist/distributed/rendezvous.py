"""torchrun's c10d rendezvous with its store listening on one address: the ``cstwa-c10d`` backend.

torch 2.13's ``c10d`` rendezvous backend has the node that hosts the rendezvous (``is_host``) start a
``TCPStore`` server at the endpoint's port, and that server listens on every interface (``*``/``::``)
for the job's lifetime, without authentication: ``TCPStore`` takes no bind address. It does take a
listening socket (``master_listen_fd``, as :func:`cstwa_dist.distributed.env._bound_store` uses it for
the ranks' store), so this backend is torch's own (:class:`C10dRendezvousBackend` over a
``TCPStore``, the same keys, the same ``rdzv_conf`` options: ``is_host``, ``read_timeout``,
``store_type``) except that the hosting node binds the socket itself, to

1. ``RDZV_BIND_ADDR`` when set (e.g. a pod's IP, from the downward API),
2. else the endpoint's host when it is an IP address,
3. else the first address the endpoint's host name resolves to that binds on this node (tried
   again for up to ``read_timeout`` while the name does not resolve here yet);

and refuses to start (rather than listen everywhere) when none binds, or when the address is a
wildcard one. The other nodes connect as they do to torch's store; the hosting node's own client
connects to the address it bound. torchrun finds the backend through the ``torchrun.handlers`` entry point
(pyproject.toml; torch loads that group when ``torch.distributed.elastic.rendezvous`` is imported):
``torchrun --rdzv_backend=cstwa-c10d``, as ``launchers/torchrun.sh`` runs the multi-node rendezvous.
The module imports nothing heavy at import time: torch imports it while importing the rendezvous
package.

One departure in the handler: the hosting node's agent keeps the store up at the end until the other
nodes' agents have shut the rendezvous down too (:data:`SHUTDOWN_WAIT_S` at most). With torch's
handler every agent shuts down right after the exit barrier, and the hosting one, often first,
exits with the store while the others are still closing: every other node of a successful job then
logs ``recvVector failed ... Did the remote server shutdown or crash?`` with a C++ stack and "has
failed to shutdown the rendezvous" (seen on the non-hosting node of every two-node run in
``tests/e2e/test_two_node_kill.py`` before this), which reads like a failure that never happened.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from cstwa_dist.distributed.sockets import listen_on

logger = logging.getLogger(__name__)

BACKEND = "cstwa-c10d"
BIND_ADDR_ENV = "RDZV_BIND_ADDR"
DEFAULT_PORT = 29400  # torch's c10d backend's default
# How long the hosting agent keeps the store up for the other agents' shutdown. After a success they
# all leave the exit barrier together and shut down within a second; after a failure a node killed by
# a signal never shuts down, and this bounds what that costs the hosting node's exit.
SHUTDOWN_WAIT_S = 10.0


def handler() -> Callable[[Any], Any]:
    """The ``torchrun.handlers`` entry point: torch calls it for the function that makes a handler."""
    return create_handler


def create_handler(params: Any) -> Any:
    """A dynamic rendezvous handler over :func:`create_backend` (as torch's ``c10d`` makes one)."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler as dynamic

    backend, store, hosted = _create_backend(params)
    handler = dynamic(store, backend, params)  # torch reads every rdzv_conf option as it always does
    if params.get("store_type", "tcp").strip().lower() == "tcp":
        handler.__class__ = _handler_class()  # the same handler, with the shutdown the module describes
        handler.cstwa_store, handler.cstwa_hosted, handler.cstwa_nodes = store, hosted, 0
    return handler


def create_backend(params: Any) -> tuple[Any, Any]:
    """torch's ``c10d_rendezvous_backend.create_backend``, the TCP store bound as the module says."""
    backend, store, _ = _create_backend(params)
    return backend, store


def _create_backend(params: Any) -> tuple[Any, Any, bool]:
    """:func:`create_backend`, and whether this process hosts the store."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d

    if params.get("store_type", "tcp").strip().lower() != "tcp":
        return (*c10d.create_backend(params), False)  # a file store opens no port
    try:
        store, hosted = _tcp_store(params)
        backend = _backend_class()(store, params.run_id)
    except Exception as e:
        c10d.construct_and_record_rdzv_event(
            message=f"{type(e).__name__}: {e}", run_id=params.run_id, node_state=c10d.NodeState.FAILED
        )
        raise
    return backend, store, hosted


@functools.cache
def _handler_class() -> type:
    """torch's :class:`DynamicRendezvousHandler` whose hosting node outlasts the others' shutdown.

    Every agent counts its finished shutdown in the store (one ``add``); the hosting agent, after its
    own, waits until the other nodes of the last round have counted theirs or
    :data:`SHUTDOWN_WAIT_S` has passed, and only then lets its process (and the store) end. Memory:
    one integer key in the store for the whole job; the agents only, no rank takes part.
    """
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    class LingeringHostHandler(DynamicRendezvousHandler):
        cstwa_store: Any
        cstwa_hosted: bool
        cstwa_nodes: int  # nodes of the last completed round

        def next_rendezvous(self) -> Any:
            info = super().next_rendezvous()
            self.cstwa_nodes = info.world_size
            return info

        def shutdown(self) -> bool:
            closed = super().shutdown()
            key = f"cstwa.rendezvous.{self.get_run_id()}.shut_down"
            try:
                if not self.cstwa_hosted:
                    self.cstwa_store.add(key, 1)
                    return closed
                others, deadline = self.cstwa_nodes - 1, time.monotonic() + SHUTDOWN_WAIT_S
                while (done := self.cstwa_store.add(key, 0)) < others and time.monotonic() < deadline:
                    time.sleep(0.05)
            except Exception as e:  # the store is gone (the hosting node already ended): nothing to wait for
                logger.debug("rendezvous shutdown count: %s", e)
                return closed
            if done < others:
                logger.info(
                    "%d of %d other node(s) shut the rendezvous down within %.0fs; closing its store anyway",
                    done,
                    others,
                    SHUTDOWN_WAIT_S,
                )
            return closed

    return LingeringHostHandler


@functools.cache
def _backend_class() -> type:
    """torch's :class:`C10dRendezvousBackend` named as torchrun was asked for (the handler checks)."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    class BoundC10dRendezvousBackend(C10dRendezvousBackend):
        @property
        def name(self) -> str:
            return BACKEND

    return BoundC10dRendezvousBackend


def _tcp_store(params: Any) -> tuple[Any, bool]:
    """The rendezvous store (hosted here, or a client of the hosting node's) and whether it is hosted here."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.utils import (
        _matches_machine_hostname,
        parse_rendezvous_endpoint,
    )

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    cfg_is_host = params.get_as_bool("is_host")
    is_host = cfg_is_host if cfg_is_host is not None else _matches_machine_hostname(host)
    read_timeout = params.get_as_int("read_timeout", 60)
    if read_timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    timeout = timedelta(seconds=read_timeout)
    if is_host:
        try:
            # said (is_host): wait up to the read timeout for the name to resolve here (a pod's DNS
            # record is published shortly after the pod starts); guessed (as torch guesses from the
            # host name): one try, then connect instead, another agent on this node may host it
            sock = _listen_until(_bind_hosts(host), port, read_timeout if cfg_is_host else 0)
        except OSError:
            if cfg_is_host is not None:
                raise
            logger.info("cannot host the rendezvous store at %s:%d; connecting to it instead", host, port)
        else:
            bound, bound_port = sock.getsockname()[:2]
            try:
                store = TCPStore(  # its own client connects where it listens (no name to resolve)
                    bound,
                    bound_port,
                    is_master=True,
                    multi_tenant=True,
                    timeout=timeout,
                    master_listen_fd=sock.detach(),  # the store owns the socket from here on
                )
            except (ValueError, RuntimeError, TimeoutError) as exc:
                raise RendezvousConnectionError(
                    "The connection to the C10d store has failed. See inner exception for details."
                ) from exc
            logger.info("process %d hosts the rendezvous store on %s:%d", os.getpid(), bound, bound_port)
            return store, True
    try:
        return TCPStore(host, port, is_master=False, multi_tenant=True, timeout=timeout), False
    except (ValueError, RuntimeError, TimeoutError) as exc:
        raise RendezvousConnectionError(
            "The connection to the C10d store has failed. See inner exception for details."
        ) from exc


def _bind_hosts(endpoint_host: str) -> str:
    """Where the hosting node's store listens: ``RDZV_BIND_ADDR``, else the endpoint's host."""
    addr = os.environ.get(BIND_ADDR_ENV, "").strip()
    if addr:
        return addr.strip("[]")
    try:
        ipaddress.ip_address(endpoint_host)
    except ValueError:
        logger.info(
            "%s unset: the rendezvous store listens where %s resolves to", BIND_ADDR_ENV, endpoint_host
        )
    return endpoint_host


def _listen_until(host: str, port: int, wait_s: float) -> socket.socket:
    """:func:`~cstwa_dist.distributed.sockets.listen_on`, tried again every second for up to ``wait_s``
    seconds while it fails (pod 0's DNS record may not be published yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return listen_on(host, port, "the rendezvous store")
        except OSError as e:
            if time.monotonic() >= deadline:
                raise
            logger.info("%s; trying again", e)
            time.sleep(1)
