"""A listening socket on a named address, for the stores this project hands a socket to.

torch 2.13's ``TCPStore`` server listens on every interface whatever host it is given; it does take
an already listening socket (``master_listen_fd``). Rank 0's store (``distributed/env.py``) and the
multi-node rendezvous store (``distributed/rendezvous.py``) both get theirs from here, so that each
listens only where the launcher says. No torch import: torch imports the rendezvous module while it
loads its own rendezvous package.
"""

from __future__ import annotations

import ipaddress
import socket


def listen_on(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket listening on ``host:port``: the first of ``host``'s addresses that binds, never a
    wildcard one (``0.0.0.0``/``::`` would be listening everywhere again). ``what`` names the listener
    in the error (``OSError``), which lists every address tried and why it failed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(f"cannot listen on {host} port {port} for {what}: {e}") from e
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        if ipaddress.ip_address(sockaddr[0].split("%")[0]).is_unspecified:
            errors.append(f"{sockaddr[0]}: a wildcard address")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            # as torch's own server: a port a previous group left in TIME_WAIT can be bound again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
        except OSError as e:
            sock.close()
            errors.append(f"{sockaddr[0]}: {e}")
            continue
        return sock
    raise OSError(f"cannot listen on {host} port {port} for {what}: {'; '.join(errors) or 'no address'}")
