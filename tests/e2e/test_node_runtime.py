"""The node's Ray runtime as `make run` starts it: every port on loopback, token authentication on.

`launchers/run_demo.sh` and `launchers/torchrun.sh` source `launchers/ray_runtime.sh` in bash and call
`start_node_ray_runtime`; so does this test, then runs a driver that attaches the way a rank does
(:class:`cstwa_dist.runtime.RayRuntime`) and runs one Ray Data operation. The driver reads the socket
table (psutil) for every process of the runtime's tree and for itself, and calls the GCS directly over
gRPC (on loopback only) with the job's token, a wrong one and none. The shell then exits, which stops
the runtime, and the test checks that its processes and its temp folder are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Runs inside the sourced shell, with the runtime's environment (RAY_ADDRESS, RAY_AUTH_*) and the pid of
# `ray start --block` as argv[1]. Prints one JSON line for the test.
DRIVER = r"""
import json, os, sys

import ray  # first: psutil comes with Ray (its vendored copy), not as a project dependency
import psutil
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from cstwa_dist.runtime import RayRuntime

def listening(pids):
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids:
            continue
        # TCP listeners, and UDP sockets bound but not connected (a UDP server)
        if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):
            out.add((c.laddr.ip, c.laddr.port, c.pid))
    return sorted(out)

def command(pid):
    try:
        return " ".join(psutil.Process(pid).cmdline())[:100]
    except psutil.Error:
        return "?"

def gcs_call(address, token):
    # the GCS's node table, asked over loopback with the given bearer token (None: no header)
    meta = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=meta, timeout=10)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

# The runtime's processes: below `ray start --block` (argv[1]), or below this driver for a private one.
root = psutil.Process(int(sys.argv[1]) if len(sys.argv) > 1 else os.getpid())
with RayRuntime(num_cpus=1) as rt:
    count = ray.data.range(10).count()
    tree = {p.pid for p in root.children(recursive=True)} | {root.pid}
    token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
    token = open(token_path).read().strip()
    report = {
        "count": count,
        "address": rt.address,
        "runtime": listening(tree - {os.getpid()}),
        "driver": listening({os.getpid()}),
        "names": {str(pid): command(pid) for pid in tree},
        "tree": sorted(tree - {os.getpid()}),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "token_dir": os.path.dirname(token_path),
        "token_file_mode": oct(os.stat(token_path).st_mode & 0o777),
        "token_dir_mode": oct(os.stat(os.path.dirname(token_path)).st_mode & 0o777),
        "gcs_with_token": gcs_call(rt.address, token),
        "gcs_wrong_token": gcs_call(rt.address, "0" * 64),
        "gcs_no_token": gcs_call(rt.address, None),
    }
print(json.dumps(report))
"""

SCRIPT = r"""
set -euo pipefail
source launchers/ray_runtime.sh
start_node_ray_runtime
echo "RAY_DIR=$_node_ray_dir"
ls -ld "$_node_ray_dir" | awk '{print "RAY_DIR_MODE=" $1}'
python "$DRIVER_PY" "$_node_ray_pid"
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_NODE_IP"):
        env.pop(var, None)  # the launcher's own defaults, as `make run` gets them
    env["RAY_NUM_CPUS"] = "1"
    env["RAY_START_TIMEOUT"] = "90"
    return env


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="the launcher's stop needs pgrep")
def test_node_runtime_listens_only_on_loopback_with_token_auth(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**_env(), "DRIVER_PY": str(driver)}
    proc = subprocess.run(
        ["bash", "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = proc.stdout.splitlines()
    ray_dir = Path(next(x for x in lines if x.startswith("RAY_DIR=")).split("=", 1)[1])
    dir_mode = next(x for x in lines if x.startswith("RAY_DIR_MODE=")).split("=", 1)[1]
    report = json.loads(next(x for x in lines if x.startswith("{")))

    _check_loopback_and_token(report)
    assert dir_mode.startswith("drwx------"), dir_mode
    assert Path(report["token_dir"]) == ray_dir
    _check_gone(report, ray_dir)


def test_private_runtime_listens_only_on_loopback_with_token_auth(tmp_path):
    """A command run without RAY_ADDRESS starts its own runtime: the same rules."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))
    _check_loopback_and_token(report)
    _check_gone(report, Path(report["token_dir"]))


def _check_loopback_and_token(report: dict) -> None:
    assert report["count"] == 10
    assert report["address"].startswith("127.0.0.1:")
    # The runtime listens (GCS, raylet's node and object managers, workers, runtime-env agent, the
    # Ray Client server of `ray start` ...) and every listener is on loopback; so is the attached
    # driver's own server.
    assert len(report["runtime"]) >= 3, report
    elsewhere = [
        (ip, port, report["names"].get(str(pid), "driver"))
        for ip, port, pid in report["runtime"] + report["driver"]
        if ip not in ("127.0.0.1", "::ffff:127.0.0.1")
    ]
    assert not elsewhere, f"listening beyond 127.0.0.1: {elsewhere}"

    # Authentication: on, with a token of the job's own (0600, in a 0700 folder, not ~/.ray); the GCS
    # refuses a wrong or a missing one.
    assert report["auth_mode"] == "token"
    assert report["token_file_mode"] == "0o600"
    assert report["token_dir_mode"] == "0o700"
    assert Path(report["token_dir"]).name.startswith("cstwa-ray.")
    assert report["gcs_with_token"] == "OK", report
    assert report["gcs_wrong_token"] == "UNAUTHENTICATED", report
    assert report["gcs_no_token"] == "UNAUTHENTICATED", report


def _check_gone(report: dict, folder: Path) -> None:
    """Stopped: no process of the runtime is left, and neither is its folder."""
    deadline = time.monotonic() + 30
    alive = [pid for pid in report["tree"] if _alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if _alive(pid)]
    assert not alive, f"runtime processes left: {[report['names'].get(str(p)) for p in alive]}"
    assert not folder.exists(), f"{folder} left behind"


def _alive(pid: int) -> bool:
    """A live process, not a zombie waiting for its (re-parented) parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("script", ["launchers/ray_runtime.sh", "launchers/torchrun.sh"])
def test_launcher_help_starts_nothing(script, tmp_path):
    """--help prints the usage and exits 0 at once, starting no process (no ray, no torchrun)."""
    env = _env()
    # a PATH whose ray/torchrun/python record that they were called, before the real ones
    spy = tmp_path / "bin"
    spy.mkdir()
    for tool in ("ray", "torchrun", "python"):
        (spy / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\nexit 1\n")
        (spy / tool).chmod(0o755)
    env["PATH"] = f"{spy}:{env['PATH']}"
    env["VENV"] = "no-such-venv"  # torchrun.sh puts $VENV/bin first: not the real venv
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 5
    assert "usage" in proc.stdout.lower() or "Env:" in proc.stdout, proc.stdout
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()


def test_ray_runtime_sourced_with_help_returns():
    """Sourcing with --help prints the usage and returns 0 to the sourcing shell, defining nothing."""
    proc = subprocess.run(
        ["bash", "-c", "source launchers/ray_runtime.sh --help; echo rc=$?; type -t start_node_ray_runtime"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "rc=0" in proc.stdout
    assert "function" not in proc.stdout
