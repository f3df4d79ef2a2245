"""The process group's ports as the project opens them: every one on the address the launcher names.

torch 2.13's c10d ``TCPStore`` listens on every interface (``::``) unless handed a socket; gloo
listens on the address the host name resolves to unless ``GLOO_SOCKET_IFNAME`` says otherwise. Here
the 2-rank group starts the way the tests and benchmarks start one
(:func:`cstwa_dist.distributed.spawn.spawn_ranks`: ``MASTER_ADDR=127.0.0.1``), and rank 0 reads the
socket table (psutil) of every rank of the job once the group is up: the store rank 0 hosts, both
ranks' gloo listeners, all on 127.0.0.1, none on ``0.0.0.0``/``::``. Both store backends (libuv, the
default, and ``USE_LIBUV=0``) take the socket. A 1-process group (no ``RANK``: a training command run
without torchrun) has no store server, but gloo still listens: on loopback too.

Under ``launchers/torchrun.sh`` on one node (the rendezvous through a file, ``--local_addr=127.0.0.1``)
the launcher runs as a user runs it, Ray runtime included, with ``torchrun`` swapped for a shim that
runs a probe in the ranks instead of the CLI: torchrun's agent listens nowhere, the ranks on loopback.
Multi-node (two launchers on this machine acting as two nodes, the c10d rendezvous at
``RDZV_ENDPOINT=127.0.0.1:PORT``), torchrun's rendezvous store, which NODE_RANK 0's agent hosts, listens
on the endpoint's address only (the ``cstwa-c10d`` backend, :mod:`cstwa_dist.distributed.rendezvous`),
and so does every other socket of both agents and all ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cstwa_dist.distributed.spawn import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]


def _psutil():
    import importlib

    import ray  # noqa: F401  first: psutil comes with Ray (its vendored copy), not as a project dependency

    return importlib.import_module("psutil")


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket that one of ``pids`` listens on."""
    psutil = _psutil()
    return sorted(
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.pid in pids and c.status == psutil.CONN_LISTEN
    )


def _job_sockets(rank: int, world: int) -> dict | None:
    import torch.distributed as dist

    pids: list[int] = [0] * world
    dist.all_gather_object(pids, os.getpid())  # every rank's group (and gloo's pairs) is up
    report = None
    if rank == 0:
        report = {
            "pids": pids,
            "master": (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])),
            "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "listening": _listening(set(pids)),
        }
    dist.barrier()  # the other ranks stay (with their sockets) until rank 0 has read the table
    return report


@pytest.mark.parametrize("use_libuv", ["1", "0"], ids=["libuv", "classic"])
def test_two_rank_group_listens_only_on_master_addr(monkeypatch, use_libuv):
    monkeypatch.setenv("USE_LIBUV", use_libuv)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # the project's own choice, not the caller's
    report = spawn_ranks(_job_sockets, 2, backend="gloo", timeout_s=120)[0]

    master_addr, master_port = report["master"]
    assert master_addr == "127.0.0.1"
    listening = [tuple(x) for x in report["listening"]]
    rank0, rank1 = report["pids"]
    # the store rank 0 hosts, where the ranks were told it is
    assert (master_addr, master_port, rank0) in listening, listening
    # gloo listens in every rank (one listener per device), besides the store
    assert {pid for _, port, pid in listening if port != master_port} == {rank0, rank1}, listening
    elsewhere = [x for x in listening if x[0] != master_addr]
    assert not elsewhere, f"listening beyond {master_addr}: {elsewhere}"
    assert report["gloo_ifname"] == "lo"


ONE_PROCESS = r"""
import json, os, sys
import torch, torch.distributed as dist
from cstwa_dist.distributed.env import init_distributed, shutdown_distributed
from tests.e2e.test_store_binding import _listening

init_distributed(backend="gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(json.dumps({"gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                  "listening": _listening({os.getpid()})}))
shutdown_distributed()
"""


def test_one_process_group_listens_only_on_loopback():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "GLOO_SOCKET_IFNAME")}
    proc = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["gloo_ifname"] == "lo"
    listening = report["listening"]
    assert listening, "gloo's listener not found"  # the check below must see something
    assert all(ip == "127.0.0.1" for ip, _, _ in listening), listening


# Run by torchrun in each rank in place of `python -m cstwa_dist.cli ...`: the group as a command makes
# it, then rank 0 writes the listening sockets of torchrun's agent (its parent) and of every rank.
PROBE = r"""
import json, os, sys
import torch.distributed as dist
from cstwa_dist.distributed.env import init_distributed, shutdown_distributed
from tests.e2e.test_store_binding import _listening

env = init_distributed(backend="gloo")
pids = [0] * env.world_size
dist.all_gather_object(pids, os.getpid())
if env.rank == 0:
    agent = os.getppid()
    report = {"agent": agent, "ranks": pids, "master": os.environ["MASTER_ADDR"],
              "listening": _listening({agent, *pids})}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
dist.barrier()
shutdown_distributed()
"""

# `torchrun` as the launcher finds it first on PATH: the real one with the launcher's own options, the
# probe instead of `-m cstwa_dist.cli COMMAND ...`.
SHIM = """#!/usr/bin/env bash
args=()
while [ $# -gt 0 ] && [ "$1" != -m ]; do args+=("$1"); shift; done
exec "$REAL_TORCHRUN" "${args[@]}" "$PROBE_PY" "$PROBE_OUT"
"""


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="the launcher's Ray stop needs pgrep")
def test_torchrun_launcher_on_one_node_listens_only_on_loopback(tmp_path):
    bin_dir = Path(sys.executable).parent
    shim = tmp_path / "venv" / "bin" / "torchrun"
    shim.parent.mkdir(parents=True)
    shim.write_text(SHIM)
    shim.chmod(0o755)
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        VENV=os.path.relpath(tmp_path / "venv", ROOT),  # the launcher puts $PWD/$VENV/bin first on PATH
        REAL_TORCHRUN=str(bin_dir / "torchrun"),
        PROBE_PY=str(tmp_path / "probe.py"),
        PROBE_OUT=str(out),
        PYTHONPATH=str(ROOT),
        RAY_NUM_CPUS="1",
        RAY_START_TIMEOUT="90",
    )
    proc = subprocess.run(
        ["bash", "launchers/torchrun.sh", "2", "unused"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    listening = [tuple(x) for x in report["listening"]]
    assert not [x for x in listening if x[2] == report["agent"]], f"torchrun's agent listens: {listening}"
    elsewhere = [x for x in listening if x[0] != "127.0.0.1"]
    assert not elsewhere, f"listening beyond loopback: {elsewhere}"
    assert {pid for _, _, pid in listening} == set(report["ranks"]), listening  # store and gloo seen
    assert report["master"] == "127.0.0.1"


# Multi-node: every rank reports its pid and its agent's (its parent); rank 0 writes the listening
# sockets of all of them (one machine, so one socket table).
PROBE_NODES = r"""
import json, os, sys
import torch.distributed as dist
from cstwa_dist.distributed.env import init_distributed, shutdown_distributed
from tests.e2e.test_store_binding import _listening

env = init_distributed(backend="gloo")
pids = [None] * env.world_size
dist.all_gather_object(pids, (os.getpid(), os.getppid()))
if env.rank == 0:
    ranks, agents = sorted({p for p, _ in pids}), sorted({a for _, a in pids})
    report = {"agents": agents, "ranks": ranks, "master": os.environ["MASTER_ADDR"],
              "listening": _listening({*agents, *ranks})}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
dist.barrier()
shutdown_distributed()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_c10d_backend_is_registered_for_torchrun():
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    assert rendezvous_handler_registry._registry.get("cstwa-c10d") is not None  # pyproject's entry point


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="the launcher's Ray stop needs pgrep")
def test_torchrun_launcher_on_two_nodes_listens_only_on_the_named_address(tmp_path):
    bin_dir = Path(sys.executable).parent
    shim = tmp_path / "venv" / "bin" / "torchrun"
    shim.parent.mkdir(parents=True)
    shim.write_text(SHIM)
    shim.chmod(0o755)
    (tmp_path / "probe.py").write_text(PROBE_NODES)
    out = tmp_path / "report.json"
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    base.update(
        PATH=f"{bin_dir}:{base['PATH']}",
        VENV=os.path.relpath(tmp_path / "venv", ROOT),
        REAL_TORCHRUN=str(bin_dir / "torchrun"),
        PROBE_PY=str(tmp_path / "probe.py"),
        PROBE_OUT=str(out),
        PYTHONPATH=str(ROOT),
        NNODES="2",
        RDZV_ENDPOINT=f"127.0.0.1:{port}",
        JOB_ID=f"bind-{port}",
        LOCAL_ADDR="127.0.0.1",  # where each node's ranks' store listens (a pod IP on k8s)
        RAY_ADDRESS="127.0.0.1:1",  # "an outer launcher's runtime": no Ray runtime (the probe needs none)
    )
    procs = [
        subprocess.Popen(
            ["bash", "launchers/torchrun.sh", "1", "unused"],
            cwd=ROOT,
            env={**base, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-4000:] for log in logs)
    report = json.loads(out.read_text())
    listening = [tuple(x) for x in report["listening"]]
    assert len(report["agents"]) == 2 and len(report["ranks"]) == 2, report
    # the rendezvous store, hosted by an agent, and rank 0's store: both seen (the check means something)
    assert [x for x in listening if x[1] == port and x[2] in report["agents"]], listening
    assert report["master"] == "127.0.0.1"
    assert [x for x in listening if x[2] in report["ranks"]], listening
    elsewhere = [x for x in listening if x[0] != "127.0.0.1"]
    assert not elsewhere, f"listening beyond 127.0.0.1: {elsewhere}"


# what the launcher reads: its own defaults, as a user gets them on one node
_LAUNCHER_ENV = (
    "RAY_ADDRESS",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_ENDPOINT",
    "JOB_ID",
    "LOCAL_ADDR",
    "GLOO_SOCKET_IFNAME",
    "RANK",
    "WORLD_SIZE",
)


def _rdzv_params(endpoint: str, **conf):
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters("cstwa-c10d", endpoint, "bind-test", 1, 1, **conf)


@pytest.mark.parametrize(
    ("endpoint", "bind_addr"),
    [("127.0.0.1:0", None), ("localhost:0", None), ("localhost:0", "127.0.0.1")],
    ids=["ip-endpoint", "name-endpoint", "bind-addr"],
)
def test_rendezvous_store_listens_on_the_named_address(monkeypatch, endpoint, bind_addr):
    from cstwa_dist.distributed import rendezvous

    if bind_addr is None:
        monkeypatch.delenv("RDZV_BIND_ADDR", raising=False)
    else:
        monkeypatch.setenv("RDZV_BIND_ADDR", bind_addr)
    backend, store = rendezvous.create_backend(_rdzv_params(endpoint, is_host=True, read_timeout=10))
    assert backend.name == "cstwa-c10d"
    mine = [x for x in _listening({os.getpid()}) if x[1] == store.port]
    assert mine and all(ip in ("127.0.0.1", "::1") for ip, _, _ in mine), mine
    assert backend.set_state(b"state") is not None  # the store answers where it listens
    del backend, store


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_rendezvous_store_refuses_a_wildcard_address(monkeypatch, wildcard):
    from cstwa_dist.distributed import rendezvous

    monkeypatch.setenv("RDZV_BIND_ADDR", wildcard)
    with pytest.raises(OSError, match="wildcard"):
        rendezvous.create_backend(_rdzv_params("127.0.0.1:0", is_host=True, read_timeout=1))
