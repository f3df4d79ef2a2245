"""The CLI as a user runs it: synth → pretrain → train under torchrun (2 ranks) → report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    env["MASTER_PORT"] = str(free_port())  # torchrun.sh's default port may be taken by another job
    return env


def _run(
    args: list[str], timeout: int = 600, check: bool = True, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**_env(), **(env_extra or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _config(tmp: Path, dataset: Path, **extra: dict) -> Path:
    cfg = {
        "data": {"dataset": str(dataset), "batch_size": 500, "eval_batch_size": 1000, "ray_num_cpus": 1},
        "model": {"ctr_tower": [16, 8], "cvr_tower": [16, 8], "dropout": [0.0, 0.1]},
        "models": {"cstwa": {"info_layer": [8]}},
        "structure": {"graph_dir": str(tmp / "structure"), "k": 4},
        "train": {"epochs": 2, "run_dir": str(tmp / "runs"), "log_every": 5},
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_lists_subcommands():
    out = _run([str(BIN / "cstwa-dist"), "--help"]).stdout
    for cmd in ("synth", "pretrain", "train", "report"):
        assert cmd in out
    assert "--model" in _run([str(BIN / "cstwa-dist"), "train", "--help"]).stdout


def test_pipeline_under_torchrun_trains_what_one_process_trains(tmp_path):
    """synth → ``pretrain`` and ``train`` (CSTWA, ESMM) under torchrun on 2 ranks → ``report``; then the
    same trainings as one process on the same graphs: N ranks equal one process end to end.

    With ``data.shares=2`` both read the same global batches (each share's rows, shuffle and padding
    are a function of (seed, epoch, share), not of the rank) and draw the same dropout masks (keyed by
    share), from the same starting weights (tables drawn from (seed, table, global row)): 2 ranks ×
    250 and 1 process × 500, 3 epochs, dropout on. What is left is the order of float sums (one sum of
    500 rows against two partial sums all-reduced): measured here, per-epoch mean losses agree to
    ~2e-8 relative and test AUCs to ≤ 1.3e-5 (``experiment`` with exact graphs mined on 1 and on 2
    ranks gave the same).
    """
    data = tmp_path / "data"
    _run(
        [
            str(BIN / "cstwa-dist"),
            "synth",
            "--preset",
            "demo",
            "--scale",
            "0.02",
            "--seed",
            "3",
            "--out",
            str(data),
        ]
    )
    assert (data / "spec.yaml").exists() and (data / "stats.json").exists()
    rows = json.loads((data / "stats.json").read_text())["train"]["rows"]
    cfg = _config(
        tmp_path,
        data,
        data={"batch_size": 250, "shares": 2},
        model={"dropout": [0.1, 0.3]},
        train={"epochs": 3},
    )
    _run(["bash", "launchers/torchrun.sh", "2", "pretrain", "--config", str(cfg)])
    structure = json.loads((tmp_path / "structure" / "structure.json").read_text())
    for side in ("user", "item"):  # one graph part per rank, a manifest, recall against exact
        parts = tmp_path / "structure" / f"{side}_graph"
        manifest = json.loads((parts / "manifest.json").read_text())
        assert len(manifest["parts"]) == 2
        assert structure["graphs"][side]["ranks"] == 2 and structure["graphs"][side]["recall_at_k"] > 0.8
    for model in ("cstwa", "esmm"):
        _run(["bash", "launchers/torchrun.sh", "2", "train", "--config", str(cfg), "--model", model])
        m = json.loads((tmp_path / "runs" / model / "metrics.json").read_text())
        for key in (
            "model",
            "seed",
            "world_size",
            "epochs",
            "train_samples",
            "samples_per_s",
            "click_auc",
            "purchase_auc",
        ):
            assert key in m, key
        assert m["world_size"] == 2 and m["epochs"] == 3 and m["model"] == model
        assert m["train_samples"] == 3 * rows
        assert 0.0 <= m["click_auc"] <= 1.0 and 0.0 <= m["purchase_auc"] <= 1.0
        # live curves for TensorBoard (rank 0) and the epoch-end checkpoints
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "runs" / model / "tb"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        for tag in ("train/loss", "throughput/samples_per_s", "val/purchase_auc", "test/click_auc"):
            assert tag in tags, (tag, tags)
        assert len(acc.Scalars("val/click_auc")) == 3
        assert sorted(p.name for p in (tmp_path / "runs" / model / "checkpoints").iterdir())

        # one process, the same graphs, the same global batches
        one = tmp_path / "one"
        args = [
            "--set",
            "data.batch_size=500",
            "--set",
            f"train.run_dir={one}",
            "--set",
            "train.tensorboard=false",
        ]
        _run([str(BIN / "cstwa-dist"), "train", "--config", str(cfg), "--model", model, *args])
        a = json.loads((one / model / "metrics.json").read_text())
        assert a["world_size"] == 1 and a["train_samples"] == m["train_samples"]
        losses = [(x["mean_loss"], y["mean_loss"]) for x, y in zip(a["history"], m["history"], strict=True)]
        assert len(losses) == 3 and all(abs(x - y) <= 1e-6 * abs(x) for x, y in losses), (model, losses)
        for x, y in zip(a["history"], m["history"], strict=True):
            for split in ("val", "test"):
                for key in ("click_auc", "purchase_auc"):
                    if split in x:
                        assert abs(x[split][key] - y[split][key]) <= 1e-4, (
                            model,
                            split,
                            key,
                            x[split],
                            y[split],
                        )
        for key in ("click_auc", "purchase_auc", "click_gauc", "purchase_gauc"):
            assert abs(a[key] - m[key]) <= 1e-4, (model, key, a[key], m[key])
    report = _run(
        [str(BIN / "cstwa-dist"), "report", str(tmp_path / "runs" / "cstwa"), str(tmp_path / "runs" / "esmm")]
    ).stdout
    assert "Purchase AUC" in report and "cstwa" in report and "esmm" in report


def test_train_without_graphs_says_run_pretrain(tmp_path, tiny_dataset):
    cfg = _config(tmp_path, tiny_dataset)
    proc = _run([str(BIN / "cstwa-dist"), "train", "--config", str(cfg), "--model", "cstwa"], check=False)
    assert proc.returncode == 2
    assert "cstwa-dist pretrain" in proc.stderr and "graph is not found" in proc.stderr


@pytest.mark.parametrize(
    "column, value, words", [("item_id", 10**6, "out of range"), ("click", 0, "purchase")]
)
def test_bad_input_names_file_row_and_field(tmp_path, tiny_dataset, column, value, words):
    import shutil

    data = tmp_path / "bad"
    shutil.copytree(tiny_dataset, data)
    victim = sorted((data / "train").glob("*.parquet"))[1]
    table = pq.read_table(victim)
    purchase = table.column("purchase").to_numpy()
    row = int(purchase.argmax()) if column == "click" else 17  # a purchased row, so click=0 is invalid
    vals = table.column(column).to_numpy().copy()
    vals[row] = value
    table = table.set_column(
        table.schema.get_field_index(column), column, pa.array(vals, table.schema.field(column).type)
    )
    pq.write_table(table, victim)
    cfg = _config(tmp_path, data, models={"cstwa": {"info_layer": [8], "structure_migrator": False}})
    proc = _run([str(BIN / "cstwa-dist"), "train", "--config", str(cfg), "--model", "cstwa"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert victim.name in proc.stderr and f"row {row}" in proc.stderr and words in proc.stderr


def test_experiment_runs_and_resumes(tmp_path, tiny_dataset):
    cfg = _config(tmp_path, tiny_dataset, train={"epochs": 1, "validate_every_epoch": False})
    cmd = [
        str(BIN / "cstwa-dist"),
        "experiment",
        "--config",
        str(cfg),
        "--models",
        "mlp,cstwa",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "exp"),
    ]
    _run(cmd)
    md = (tmp_path / "exp" / "report.md").read_text()
    assert "| mlp | 1 |" in md and "| cstwa | 1 |" in md
    # the instrument: oracles on the evaluated split, the cluster rate of the graphs cstwa used
    inst = json.loads((tmp_path / "exp" / "report.json").read_text())["instrument"]
    assert inst["oracles"]["scores"]["oracle_purchase"]["available"]
    assert [g["seed"] for g in inst["graphs"]] == [0] and inst["graphs"][0]["available"]
    assert "Partial oracles" in md and "*reference: per-item train CTR*" in md
    again = _run(cmd)
    assert again.stderr.count("finished before, skipped") == 2
    # the same --out with another setting must not pass the old cells off as this config's results
    stale = _run([*cmd, "--set", "optim.lr=0.002"], check=False)
    assert stale.returncode != 0
    assert "run with another config" in stale.stderr and "optim.lr: 0.001 → 0.002" in stale.stderr
