"""Paired differences against the best baseline, and the cross-level summary (table, JSON, plot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cstwa_dist.experiments.grid import _mean_std, paired_differences
from cstwa_dist.experiments.summary import load_reports, summarise


def _row(group: str, label: str, model: str, purchase: list[float], click: float = 0.70) -> dict:
    m, s = _mean_std(purchase)
    return {
        "group": group,
        "label": label,
        "model": model,
        "seeds": list(range(len(purchase))),
        "purchase": purchase,
        "purchase_mean": m,
        "purchase_std": s,
        "click": [click] * len(purchase),
        "click_mean": click,
        "click_std": 0.0,
    }


def _table(shift: float) -> list[dict]:
    return [
        _row("table2", "MLP", "mlp", [0.55, 0.56, 0.57]),
        _row("table2", "ESMM", "esmm", [0.60 + shift, 0.62 + shift, 0.61 + shift]),
        _row("table2", "AITM", "aitm", [0.59, 0.60, 0.60]),
        _row("table2", "CSTWA", "cstwa", [0.61, 0.61, 0.64]),
        _row("ablation", "SM", "cstwa", [0.58, 0.60, 0.59]),
    ]


def test_paired_differences_are_per_seed_against_the_best_non_cstwa_row() -> None:
    paired = paired_differences(_table(0.0))
    assert paired is not None and paired["baseline"] == "ESMM"  # CSTWA has the higher mean but is excluded
    by_label = {d["label"]: d for d in paired["rows"]}
    assert "ESMM" not in by_label
    assert by_label["CSTWA"]["diffs"] == pytest.approx([0.01, -0.01, 0.03])
    assert by_label["CSTWA"]["wins"] == 2
    assert by_label["CSTWA"]["mean"] == pytest.approx(0.01)
    assert by_label["SM"]["diffs"] == pytest.approx([-0.02, -0.02, -0.02])
    assert by_label["SM"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert paired_differences([_row("table2", "CSTWA", "cstwa", [0.6])]) is None


def _report(
    tmp: Path, name: str, shift: float, ctr_lookup_purchase: float, settings: dict | None = None
) -> Path:
    table = _table(shift)
    scores = {
        "oracle_purchase": {"available": True, "click_auc": 0.6, "purchase_auc": 0.75},
        "oracle_click": {"available": True, "click_auc": 0.76, "purchase_auc": 0.64},
        "affinity": {"available": True, "click_auc": 0.66, "purchase_auc": 0.70},
        "item_ctr": {"available": True, "click_auc": 0.69, "purchase_auc": ctr_lookup_purchase},
        "item_purchase_rate": {"available": True, "click_auc": 0.49, "purchase_auc": 0.60},
    }
    rep = {
        "rows": table,
        "paired": paired_differences(table),
        "model_settings": settings or {},
        "instrument": {
            "oracles": {"scores": scores},
            "graph_mean": [
                {"k": 8, "user": {"rate": 0.3, "chance": 0.08}, "item": {"rate": 0.4, "chance": 0.08}}
            ],
        },
    }
    d = tmp / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    return d


def test_summary_lines_up_levels_and_marks_rows_below_the_lookups(tmp_path: Path) -> None:
    a = _report(tmp_path, "a", 0.0, 0.50)
    b = _report(tmp_path, "b", 0.05, 0.605)
    summary = summarise(load_reports([f"none={a}", f"strong={b}"]), tmp_path / "out")
    assert summary["levels"] == ["none", "strong"]
    rows = {(r["group"], r["label"]): r for r in summary["rows"]}
    assert rows[("table2", "ESMM")]["strong"]["purchase_mean"] == pytest.approx(0.66)
    # MLP (0.56) is below the purchase-rate lookup (0.60) at both levels; CSTWA (0.62) above both;
    # AITM (0.5967) is below the CTR lookup's 0.605 at "strong" only
    assert rows[("table2", "MLP")]["none"]["beats_lookups"] is False
    assert rows[("table2", "CSTWA")]["none"]["beats_lookups"] is True
    assert rows[("table2", "AITM")]["strong"]["beats_lookups"] is False  # 0.5967 < 0.605
    assert rows[("table2", "CSTWA")]["strong"]["paired_mean"] == pytest.approx(0.01 - 0.05)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| MLP | 0.5600 ± 0.0100 † | 0.5600 ± 0.0100 † |" in md
    assert "per-item train purchase-rate lookup | 0.4900 / 0.6000 | 0.4900 / 0.6000 |" in md
    assert "users 30.0 % (chance 8.0 %)" in md
    assert (tmp_path / "out" / "purchase_vs_conflict.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["levels"] == ["none", "strong"]


def test_summary_refuses_a_folder_without_report(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report.json"):
        load_reports([f"x={tmp_path}"])


def test_summary_states_each_models_own_settings(tmp_path: Path) -> None:
    same = {"cstwa": ["loss.gamma=2"]}
    a = _report(tmp_path, "a", 0.0, 0.50, same)
    b = _report(tmp_path, "b", 0.05, 0.605, same)
    c = _report(tmp_path, "c", 0.05, 0.605, {"cstwa": ["loss.gamma=3"]})
    summarise(load_reports([f"none={a}", f"strong={b}"]), tmp_path / "same")
    md = (tmp_path / "same" / "summary.md").read_text()
    assert "Settings of cstwa (`--model-set`, in all its rows) at every level: `loss.gamma=2`." in md
    summary = summarise(load_reports([f"none={a}", f"strong={c}"]), tmp_path / "differ")
    assert summary["model_settings"] == {"cstwa": {"none": ["loss.gamma=2"], "strong": ["loss.gamma=3"]}}
    md = (tmp_path / "differ" / "summary.md").read_text()
    assert "per level: none: `loss.gamma=2`; strong: `loss.gamma=3`." in md
