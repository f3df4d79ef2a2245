"""Operability as a user meets it: bad data on one rank of a running job.

A bad row on one rank stops the whole 2-rank job with that row's file, row and field, within the
test's timeout (far below the collective timeout the other rank would otherwise wait out).

A rank killed mid-epoch and restarted in place, a replaced node, and a checkpoint continued on another
world size (2 → 1 → 2) are rehearsed on two "nodes" in ``tests/e2e/test_two_node_kill.py``; the
launcher helpers here (:func:`_launch`: its own process group, killed whole on timeout) serve the other
end-to-end tests too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.e2e.test_cli import BIN, ROOT, _config, _env

# One launch of the tiny job takes ~40 s on the 2-core CI machine (most of it starting Ray and
# torchrun); a hung restart would otherwise block CI for the collective timeout, or for good.
LAUNCH_TIMEOUT_S = 300


def _launch(cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in its own process group; on timeout kills the whole group and fails.

    ``subprocess.run``'s timeout kills only the launcher's bash, leaving torchrun, its workers and the
    node's Ray runtime running; a hung job must not outlive the test.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**_env(), **(env_extra or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher forwards it; its EXIT trap stops Ray
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(
            f"{cmd} still running after {LAUNCH_TIMEOUT_S}s (hung?)\n{out[-3000:]}\n{err[-6000:]}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # leftovers (none expected) never outlive it
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train(
    cfg: Path,
    run_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    ranks: int = 2,
) -> subprocess.CompletedProcess:
    """``train --resume auto`` into ``run_dir``: 2 ranks under the launcher, or 1 plain process."""
    args = ["--config", str(cfg), "--model", "cstwa", "--resume", "auto", "--set", f"train.run_dir={run_dir}"]
    cmd = ["bash", "launchers/torchrun.sh", str(ranks), "train", *args, *extra]
    if ranks == 1:
        cmd = [str(BIN / "cstwa-dist"), "train", *args, *extra]
    proc = _launch(cmd, env)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "cstwa" / "metrics.json").read_text())


def test_bad_row_on_one_rank_stops_the_job_with_its_location(tmp_path, tiny_dataset):
    data = tmp_path / "bad"
    shutil.copytree(tiny_dataset, data)
    victim = sorted((data / "train").glob("*.parquet"))[-1]
    table = pq.read_table(victim)
    ids = table.column("item_id").to_pylist()
    ids[3] = 10_000  # the demo preset at this scale has 50 items
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.int64()))
    pq.write_table(table, victim)
    cfg = _config(tmp_path, data, models={"cstwa": {"info_layer": [8], "structure_migrator": False}})
    proc = _launch(["bash", "launchers/torchrun.sh", "2", "train", "--config", str(cfg), "--model", "cstwa"])
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert victim.name in out and "item_id" in out and "10000" in out, out[-3000:]
