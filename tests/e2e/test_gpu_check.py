"""``launchers/gpu_check.sh`` / ``cstwa-dist doctor`` as a user runs them on a machine without a GPU.

The dry run is the real thing at tiny size: spawned gloo ranks, FBGEMM's CPU kernels, faiss-cpu, the
project's own ``synth``/``pretrain``/``train``/``bench train`` commands on a shared Ray runtime. Every
check must come back ``ok`` with its figures; a broken kernel, collective, recall or training run
turns its check ``failed`` and the launcher's exit code 1. The GPU mode itself needs a GPU node
(docs/gpu-check.md); here it must refuse instead of pretending.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_cli import ROOT, _env

LAUNCHER = ROOT / "launchers" / "gpu_check.sh"
CHECKS = ["environment", "fbgemm_fused", "all_to_all", "faiss_ivf", "cstwa_training", "bench_train"]
#: the budgets are hang guards; a shared 2-core CI machine may run several times slower than idle
BUDGET_FACTOR = "4"


def _launch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**_env(), "VENV": str(Path(sys.executable).parent.parent)}
    return subprocess.run(
        ["bash", str(LAUNCHER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_passes_every_check_with_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    proc = _launch("--dry-run", "--out", str(out), "--budget-factor", BUDGET_FACTOR)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["finished"] and report["ok"]
    assert list(report["checks"]) == CHECKS
    for name, check in report["checks"].items():
        assert check["status"] == "ok", (name, check.get("reason"), check.get("detail"))
        assert check["seconds"] > 0 and check["budget_s"] > 0
    assert json.loads(proc.stdout)["checks"] == {name: "ok" for name in CHECKS}
    assert not Path(report["work_dir"]).exists()  # the temp work folder goes when every check passed

    f = {name: check["figures"] for name, check in report["checks"].items()}
    env = f["environment"]
    assert env["packages"]["torch"] and env["modules"]["fbgemm_gpu"] and env["modules"]["faiss"]
    assert env["cuda"]["devices"] == []  # the dry run hides every GPU

    (run,) = f["fbgemm_fused"]["runs"].values()
    assert run["optimizer"] == "rowwise_adagrad" and run["steps_checked"] >= 1 and run["ms_per_step"] > 0
    kinds = {t["sharding_type"] for t in run["tables"].values()}
    assert kinds == {"table_wise", "row_wise"}
    for table in run["tables"].values():
        assert table["max_update"] > 0 and table["max_abs_error"] <= 1e-4 * table["max_update"]
        assert table["rows_touched"] > 0 and table["rows_untouched"] > 0
        assert table["untouched_max_change"] == 0.0

    a2a = f["all_to_all"]
    assert a2a["world"] == 2 and a2a["backend"] == "gloo" and a2a["wrong_elements"] == 0
    assert a2a["algbw_gb_per_s"] > 0 and a2a["busbw_gb_per_s"] == a2a["algbw_gb_per_s"] / 2

    knn = f["faiss_ivf"]
    assert knn["faiss_gpus"] == 0 and knn["n"] > 0 and knn["nlist"] > 1
    assert knn["recall_at_k"] >= knn["min_recall"] and knn["build_s"] > 0 and knn["search_s"] > 0

    train = f["cstwa_training"]
    assert set(train["seconds"]) == {"synth", "pretrain", "train"}
    assert train["metrics"]["train_samples"] == train["train_rows"] * train["epochs"]
    assert train["metrics"]["structure_seconds"] > 0  # the Structure Migrator ran on the mined graphs
    assert {"user", "item"} <= set(train["graphs"]) and train["graphs"]["user"]["recall_at_k"] > 0.8
    assert 0.0 <= train["metrics"]["purchase_auc"] <= 1.0
    assert all(math.isfinite(x) for x in train["metrics"]["epoch_losses"])

    bench = f["bench_train"]
    assert "note" not in bench  # benched on the training check's data and graphs
    assert bench["report"]["model"] == "cstwa" and bench["report"]["ranks"]["end_to_end"]["samples_per_s"] > 0
    assert bench["report"]["verdict"]


def test_a_failed_check_is_recorded_and_the_next_one_still_runs(tmp_path: Path) -> None:
    """Folders in the way: ``synth`` refuses to write into a non-empty one, so the training check fails
    with that reason; ``bench_train`` still runs after it (it falls back to data of its own, which is in
    the way too, so it fails the same way) and the run exits 1 with both failures recorded."""
    work = tmp_path / "work"
    for name in ("data", "bench_data"):
        (work / name).mkdir(parents=True)
        (work / name / "in_the_way").write_text("x")
    out = tmp_path / "doctor.json"
    proc = _launch(
        "--dry-run", "--checks", "cstwa_training,bench_train", "--work-dir", str(work), "--out", str(out),
        "--budget-factor", BUDGET_FACTOR,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and report["ok"] is False
    assert report["failed"] == ["cstwa_training", "bench_train"]
    for name, step in (("cstwa_training", "synth"), ("bench_train", "bench_synth")):
        check = report["checks"][name]
        assert check["status"] == "failed" and f"`{step}` exited with code" in check["reason"]
        assert "already exists" in check["detail"] and (work / "logs" / f"{step}.log").is_file()
    for name in ("environment", "fbgemm_fused", "all_to_all", "faiss_ivf"):
        assert report["checks"][name] == {
            "status": "skipped",
            "reason": "not selected (--checks)",
            "seconds": 0.0,
        }
    assert report["work_dir_kept"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_cuda_the_gpu_check_refuses(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    proc = _launch("--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device is visible" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def test_help_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "launchers").mkdir()
    copy = tmp_path / "launchers" / "gpu_check.sh"
    copy.write_text(LAUNCHER.read_text())
    for flag in ("--help", "-h"):
        proc = subprocess.run(
            ["bash", str(copy), flag], capture_output=True, text=True, timeout=10, env=dict(os.environ)
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: launchers/gpu_check.sh") and "--dry-run" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launchers"]
