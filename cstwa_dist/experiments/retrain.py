"""The day-1 → day-2 retrain table: a warm-started short retrain against a cold full one.

``launchers/retrain_days.sh`` trains, per seed, three legs over two days of one synthetic world
(``day1``; ``cold``: day 2 from random weights; ``warm``: day 2 started from day 1's run with
``--init-from``) and leaves ``OUT/seed<S>/<leg>/<model>/metrics.json`` plus the wall seconds of each
job (``<model>.seconds``, ``pretrain.seconds``). This module reads only those files and writes
``OUT/retrain.json`` and ``OUT/retrain.md``: per model and leg the test AUCs (mean ± std over seeds),
the paired warm − cold difference per seed, and the wall time of the leg's jobs. Whichever leg wins
is what the table says; nothing here chooses.

Run as ``python -m cstwa_dist.experiments.retrain OUT --models esmm cstwa --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from cstwa_dist.fs import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

LEGS = ("day1", "cold", "warm")
METRICS = ("purchase_auc", "click_auc", "purchase_gauc")


def _seconds(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out: Path, models: list[str], seeds: list[int]) -> dict[str, Any]:
    """Every leg's per-seed figures and their summaries, from the files the launcher leaves."""
    rows: dict[str, Any] = {}
    for model in models:
        per_leg: dict[str, Any] = {}
        for leg in LEGS:
            runs = []
            for seed in seeds:
                leg_dir = out / f"seed{seed}" / leg
                path = leg_dir / model / "metrics.json"
                if not path.is_file():
                    logger.warning("%s missing: seed %d of %s/%s left out", path, seed, leg, model)
                    continue
                m = json.loads(path.read_text())
                pre = _seconds(leg_dir / "pretrain.seconds")
                job = _seconds(leg_dir / f"{model}.seconds")
                runs.append(
                    {
                        "seed": seed,
                        **{k: m.get(k) for k in METRICS},
                        "epochs": m.get("epochs"),
                        "train_seconds": m.get("train_seconds"),
                        "job_seconds": job,
                        "pretrain_seconds": pre,
                        "init_from": m.get("init_from"),
                    }
                )
            summary = {}
            for k in (*METRICS, "train_seconds", "job_seconds", "pretrain_seconds"):
                vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
                mean, sd = _mean_sd(vals)
                summary[k] = {"mean": mean, "sd": sd, "n": len(vals)}
            per_leg[leg] = {"runs": runs, "summary": summary}
        paired = []
        cold = {r["seed"]: r for r in per_leg["cold"]["runs"]}
        for r in per_leg["warm"]["runs"]:
            c = cold.get(r["seed"])
            if c and r.get("purchase_auc") is not None and c.get("purchase_auc") is not None:
                paired.append(
                    {
                        "seed": r["seed"],
                        "purchase_auc": r["purchase_auc"] - c["purchase_auc"],
                        "click_auc": (r["click_auc"] or 0.0) - (c["click_auc"] or 0.0),
                    }
                )
        d_mean, d_sd = _mean_sd([p["purchase_auc"] for p in paired])
        rows[model] = {
            "legs": per_leg,
            "warm_minus_cold": {"per_seed": paired, "purchase_auc_mean": d_mean, "purchase_auc_sd": d_sd},
        }
    return {"models": rows, "seeds": seeds, "legs": list(LEGS)}


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ms(s: dict[str, Any], digits: int = 4) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    lines = [
        "| model | leg | epochs | test Purchase AUC | test Click AUC | Purchase GAUC | train s "
        "| job s (+ pretrain s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, r in report["models"].items():
        for leg in LEGS:
            s = r["legs"][leg]["summary"]
            runs = r["legs"][leg]["runs"]
            epochs = runs[0]["epochs"] if runs else None
            lines.append(
                f"| {model} | {leg} | {epochs if epochs is not None else '—'} | {_ms(s['purchase_auc'])} | "
                f"{_ms(s['click_auc'])} | {_ms(s['purchase_gauc'])} | {_ms(s['train_seconds'], 1)} | "
                f"{_ms(s['job_seconds'], 1)} (+ {_ms(s['pretrain_seconds'], 1)}) |"
            )
    lines += ["", "Paired warm − cold test Purchase AUC per seed (day 2):", ""]
    for model, r in report["models"].items():
        w = r["warm_minus_cold"]
        per_seed = ", ".join(f"seed {p['seed']}: {p['purchase_auc']:+.4f}" for p in w["per_seed"]) or "—"
        lines.append(
            f"- {model}: {per_seed}; mean {_f(w['purchase_auc_mean'])} ± {_f(w['purchase_auc_sd'])} (sd)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cstwa_dist.experiments.retrain", description=__doc__)
    parser.add_argument("out", type=Path, help="the launcher's OUT folder")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = collect(args.out, args.models, args.seeds)
    atomic_write_json(args.out / "retrain.json", report, sort_keys=False)
    text = render(report)
    atomic_write_text(args.out / "retrain.md", text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
