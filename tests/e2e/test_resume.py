"""Operability as a user meets it: a rank killed mid-epoch, a resume on another world size, bad data.

* A 2-rank job with ``MAX_RESTARTS=1`` whose rank 1 is SIGKILLed mid-epoch
  (``CSTWA_FAULT_KILL_AT_STEP``) is restarted by torchrun in place, continues from the newest
  checkpoint and ends (exit 0) with exactly the samples and AUCs of an uninterrupted run. Before the
  launcher gave every attempt fresh store keys, about half of such restarts failed or hung in gloo's
  process-group creation (README, "Checkpoints, restarts and resuming"), hence the timeout that kills
  the whole launcher process group instead of blocking CI.
* Its final (epoch-end) checkpoint continues on 1 process for another epoch (2 → 1), and that
  1-process checkpoint on 2 ranks for one more (1 → 2); both say the world size changed and the
  samples add up. (Running a failed job again with ``--resume auto``, a Kubernetes Job's retry, takes
  the same path as the restarted group: a fresh group resuming from the newest checkpoint. Its own
  kill-and-rerun here cost ~30 s of CI time for no other code, so it is not repeated.)
* A bad row on one rank stops the whole 2-rank job with that row's file, row and field, within the
  test's timeout (far below the collective timeout the other rank would otherwise wait out).
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


def test_killed_rank_restarts_in_job_exactly_then_changes_world_size(tmp_path, tiny_dataset):
    # batch 250: 12 steps per epoch on 2 ranks, 24 on 1; a checkpoint every 4 global steps
    cfg = _config(
        tmp_path,
        tiny_dataset,
        data={"batch_size": 250},
        model={"dropout": [0.1, 0.1]},
        models={"cstwa": {"info_layer": [8], "structure_migrator": False}},
        train={"epochs": 2, "checkpoint_every": 4, "collective_timeout_s": 120},
    )
    _train(cfg, tmp_path / "plain")

    # torchrun's in-job restart: rank 1 dies after global step 6, the group restarts from step 4
    killed = tmp_path / "killed"
    restarted = _train(cfg, killed, env={"MAX_RESTARTS": "1", "CSTWA_FAULT_KILL_AT_STEP": "6:1"})
    log = restarted.stdout + restarted.stderr
    assert "fault injection: rank 1 kills itself after step 6" in log
    assert "resumed from" in log and "step-000000004" in log, log[-3000:]
    a, b = _metrics(tmp_path / "plain"), _metrics(killed)
    assert b["train_samples"] == a["train_samples"] == 2 * 6000
    assert abs(a["click_auc"] - b["click_auc"]) <= 1e-4
    assert abs(a["purchase_auc"] - b["purchase_auc"]) <= 1e-4

    # 2 → 1: the epoch-end checkpoint (global step 24), one more epoch on one process (steps 25-48)
    one = _train(cfg, killed, "--set", "train.epochs=3", ranks=1)
    assert "resumed a 2-rank checkpoint on 1 rank(s)" in one.stdout + one.stderr
    m = _metrics(killed)
    assert m["world_size"] == 1 and m["train_samples"] == 3 * 6000 and len(m["history"]) == 3

    # 1 → 2: that checkpoint (global step 48), one more epoch on 2 ranks
    two = _train(cfg, killed, "--set", "train.epochs=4")
    assert "resumed a 1-rank checkpoint on 2 rank(s)" in two.stdout + two.stderr
    m = _metrics(killed)
    assert m["world_size"] == 2 and m["train_samples"] == 4 * 6000 and len(m["history"]) == 4
    assert [h["rows"] for h in m["history"]] == [6000] * 4


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
