"""The tables ``cstwa-dist report`` prints: finished runs' ``metrics.json`` laid out for a terminal.

Presentation only, so it lives with the CLI rather than in ``train/``, which writes the numbers. Two
tables, one row per run: ranking (AUC, GAUC, the selected ``best_epoch`` of the run's epochs, ranks,
throughput) and calibration (log loss, mean predicted vs observed rate, ECE). ``metrics.json`` files
from before a metric existed show ``n/a`` instead of failing, so old runs stay comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cstwa_dist.train.metrics import CALIBRATION_BINS, TASKS

Run = tuple[Path, dict[str, Any]]


def _num(x: float | None, width: int) -> str:
    return f"{'n/a' if x is None else f'{x:.4f}':>{width}}"


def _ranking(rows: Sequence[Run]) -> list[str]:
    header = (
        f"{'model':<10} {'Click AUC':>10} {'Click GAUC':>10} {'Purchase AUC':>13} {'Purchase GAUC':>13} "
        f"{'epoch':>7} {'ranks':>6} {'samples/s':>10}  run dir"
    )
    lines = [header, "-" * len(header)]
    for run, m in rows:
        best = m.get("best_epoch")
        epoch = "?" if best is None else f"{best}/{m.get('epochs', '?')}"
        lines.append(
            f"{m['model']:<10} {_num(m['click_auc'], 10)} {_num(m.get('click_gauc'), 10)} "
            f"{_num(m.get('purchase_auc'), 13)} {_num(m.get('purchase_gauc'), 13)} {epoch:>7} "
            f"{m['world_size']:>6} {m['samples_per_s']:>10.0f}  {run}"
        )
    rules = sorted({m.get("select_epoch", "last (before selection)") for _, m in rows})
    return [
        *lines,
        f"epoch: the epoch whose test metrics are reported, of all epochs (selected by {', '.join(rules)}); "
        "GAUC: per-user AUC weighted by impressions",
    ]


def _calibration(rows: Sequence[Run]) -> list[str]:
    header = f"{'model':<10} " + " ".join(
        f"{t.capitalize() + ' ' + k:>{w}}"
        for t in TASKS
        for k, w in (("logloss", 16), ("pred/obs", 17), ("ECE", 12))
    )
    lines = [header, "-" * len(header)]
    for _, m in rows:
        cells = []
        for t in TASKS:
            pred, obs = m.get(f"{t}_mean_pred"), m.get(f"{t}_observed_rate")
            ratio = "n/a" if pred is None or obs is None else f"{pred:.4f}/{obs:.4f}"
            cells += [_num(m.get(f"{t}_logloss"), 16), f"{ratio:>17}", _num(m.get(f"{t}_ece"), 12)]
        lines.append(f"{m['model']:<10} " + " ".join(cells))
    lines.append(
        f"ECE and the reliability plots: {CALIBRATION_BINS} equal-count bins of predicted probability"
    )
    return lines


def report_tables(rows: Sequence[Run]) -> str:
    """Both tables for ``(run dir, metrics)`` pairs, separated by a blank line, ending in a newline."""
    return "\n".join([*_ranking(rows), "", *_calibration(rows)]) + "\n"
