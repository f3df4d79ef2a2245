"""The validation-selected epoch: the rule, the experiment tables, and a real 1-process run.

The run test trains ESMM (no graphs needed) for 3 epochs on the tiny data set through the CLI, as a
user would, and checks that metrics.json reports the test metrics of the epoch with the best
validation Purchase AUC, with GAUC and calibration; that a run continued from its epoch-2
checkpoint reports the same epoch and numbers; and that ``report`` shows GAUC and the epoch
and writes reliability plots.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cstwa_dist.experiments.grid import Cell, build_report, write_reports
from cstwa_dist.train.metrics import is_new_best, select_record
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAN = float("nan")


def _rec(epoch: int, val: float | None, tested: bool = True) -> dict:
    r: dict = {"epoch": epoch, "val": {"purchase_auc": val}}
    if tested:
        r["test"] = {"purchase_auc": epoch / 10, "rows": 1}
    return r


def test_new_best_is_strict_and_ignores_missing_values():
    h = [_rec(1, 0.6), _rec(2, 0.7)]
    assert is_new_best([], _rec(1, 0.5))
    assert is_new_best(h, _rec(3, 0.71))
    assert not is_new_best(h, _rec(3, 0.7))  # a tie keeps the earlier epoch (AITM: auc > best)
    assert not is_new_best(h, _rec(3, None)) and not is_new_best(h, _rec(3, NAN))
    assert not is_new_best(h, {"epoch": 3})  # no validation
    assert is_new_best([_rec(1, NAN)], _rec(2, 0.1))


def test_select_record_rules_and_fallbacks():
    h = [_rec(1, 0.6), _rec(2, 0.7), _rec(3, 0.7), _rec(4, 0.65)]
    assert select_record(h, "best_val_purchase_auc") == (h[1], "best_val_purchase_auc")
    assert select_record(h, "last") == (h[3], "last")
    no_val = [{"epoch": 1}, {"epoch": 2, "test": {"rows": 1}}]
    assert select_record(no_val, "best_val_purchase_auc") == (no_val[1], "last")
    click_only = [_rec(1, None, tested=False), _rec(2, None)]
    assert select_record(click_only, "best_val_purchase_auc") == (click_only[1], "last")
    # a best epoch without a test result (checkpoint of an older version): best among the tested
    old = [_rec(1, 0.8, tested=False), _rec(2, 0.7), _rec(3, 0.6)]
    assert select_record(old, "best_val_purchase_auc") == (old[1], "best_val_purchase_auc")
    assert select_record([_rec(1, 0.5, tested=False)], "last") == (None, "last")
    with pytest.raises(ValueError, match="select rule"):
        select_record(h, "best_val_click_auc")


def test_experiment_tables_show_gauc_epochs_and_calibration(tmp_path):
    cells = [Cell("table2", m, m, s, ()) for m in ("mlp", "esmm") for s in (0, 1)]
    for i, c in enumerate(cells):
        d = tmp_path / "cells" / c.cell_id
        d.mkdir(parents=True)
        m = {
            "click_auc": 0.7,
            "purchase_auc": 0.6 + i / 100,
            "samples_per_s": 1.0,
            "best_epoch": 1 + i % 2,
            "config": {"data": {"dataset": "d"}, "train": {"select_epoch": "best_val_purchase_auc"}},
        }
        for t in ("click", "purchase"):
            m |= {f"{t}_gauc": 0.55 + i / 100, f"{t}_logloss": 0.3, f"{t}_ece": 0.01}
        if i == 0:  # a cell from before GAUC and selection: still aggregates
            m = {k: v for k, v in m.items() if not k.endswith("_gauc") and k != "best_epoch"}
        (d / "metrics.json").write_text(json.dumps(m))
    report = build_report(cells, tmp_path)
    esmm = next(r for r in report["rows"] if r["model"] == "esmm")
    assert esmm["purchase_gauc_mean"] == pytest.approx(0.575) and esmm["best_epoch"] == [1, 2]
    write_reports(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Click GAUC" in md and "Purchase GAUC" in md and "select_epoch=best_val_purchase_auc" in md
    assert "| ?, 2 |" in md and "| 1, 2 |" in md  # selected epoch per seed
    assert "## Calibration" in md and "0.3000 ± 0.0000" in md


# --- a real run ------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(BIN / "cstwa-dist"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _train(cfg: Path, run_dir: Path, *extra: str) -> dict:
    _cli("train", "--config", str(cfg), "--model", "esmm", "--set", f"train.run_dir={run_dir}", *extra)
    return json.loads((run_dir / "esmm" / "metrics.json").read_text())


def test_run_reports_the_best_validation_epoch_also_after_resume(tmp_path, tiny_dataset):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"dataset": str(tiny_dataset), "batch_size": 500, "eval_batch_size": 1000},
                "model": {"ctr_tower": [16, 8], "cvr_tower": [16, 8], "dropout": [0.0, 0.1]},
                "train": {"epochs": 3, "log_every": 100},
            }
        )
    )
    m = _train(cfg, tmp_path / "a")
    hist = m["history"]
    vals = [r["val"]["purchase_auc"] for r in hist]
    best = 1 + vals.index(max(vals))  # the earliest of equal bests
    assert m["best_epoch"] == best and m["select_epoch"] == "best_val_purchase_auc"
    assert m["best_val_purchase_auc"] == max(vals)
    # tested: every epoch that set a new best, and the last; the reported numbers are that record's
    tested = [r["epoch"] for r in hist if "test" in r]
    assert tested == sorted({1 + i for i, v in enumerate(vals) if v > max(vals[:i], default=-1)} | {3})
    chosen = hist[best - 1]["test"]
    assert chosen["rows"] == m["eval_rows"] == 2000
    for k, v in chosen.items():
        if k not in ("rows", "seconds", "split"):
            assert m[k] == v, k
    for t in ("click", "purchase"):
        assert 0.0 <= m[f"{t}_gauc"] <= 1.0 and m[f"{t}_gauc_users_used"] > 0
        assert m[f"{t}_gauc_users_used"] + m[f"{t}_gauc_users_skipped"] <= 100  # the tiny set's users
        assert m[f"{t}_logloss"] > 0 and 0.0 <= m[f"{t}_ece"] <= 1.0
        assert math.isclose(sum(m[f"{t}_deciles"]["rows"]), 2000)
        assert len(m[f"{t}_deciles"]["mean_pred"]) == len(m[f"{t}_deciles"]["observed_rate"]) == 10
        assert "gauc" in " ".join(hist[0]["val"])  # validation records carry every metric too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "a" / "esmm" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/purchase_gauc", "val/click_ece", "test/purchase_logloss", "selected/best_epoch"} <= tags
    assert acc.Scalars("selected/best_epoch")[0].value == best

    # a run continued from the epoch-2 checkpoint (as after a kill in epoch 3) trains epoch 3 again
    # and reports the same epoch with the same numbers: the tested records travel in the checkpoint
    ckpt = sorted((tmp_path / "a" / "esmm" / "checkpoints").glob("step-*"))[-2]
    assert json.loads((ckpt / "meta.json").read_text())["epoch"] == 1  # the end of epoch 2
    r = _train(cfg, tmp_path / "b", "--resume", str(ckpt))
    assert len(r["history"]) == 3 and r["best_epoch"] == best
    assert r["history"][:2] == hist[:2]
    for k in ("click_auc", "purchase_auc", "click_gauc", "purchase_gauc", "purchase_logloss"):
        assert abs(r[k] - m[k]) <= 1e-4, (k, r[k], m[k])

    out = _cli("report", str(tmp_path / "a" / "esmm"), str(tmp_path / "b" / "esmm")).stdout
    assert "Click GAUC" in out and "Purchase GAUC" in out and f"{best}/3" in out and "ECE" in out
    for t in ("click", "purchase"):
        assert (tmp_path / "a" / "esmm" / f"reliability_{t}.png").stat().st_size > 1000
