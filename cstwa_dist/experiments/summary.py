"""One table and one plot across several experiments: Purchase AUC per model against the conflict level.

The fair instrument's experiments (docs/experiments/README.md) run one ``experiment`` per conflict
level; each writes its own ``report.json``. This module reads those reports (nothing else: no cells,
no data), lines up the Table 2 and Table 3 rows by label, and writes ``summary.md`` and
``purchase_vs_conflict.png``: per level, every row's Purchase AUC (mean ± std over seeds), the paired
difference against that level's best baseline, and the partial oracles and per-item lookups beside
them, so a reader can see at once whether a model beats both lookups at every level.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cstwa_dist.experiments.grid import _f4, _fmt  # the reports' number formats
from cstwa_dist.fs import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# the instrument rows shown next to the models, in this order (keys of report["instrument"]["oracles"])
_REFERENCE = (
    ("oracle_purchase", "true purchase probability (oracle)"),
    ("affinity", "user–item affinity alone"),
    ("oracle_click", "true click probability as purchase score"),
    ("item_ctr", "per-item train CTR lookup"),
    ("item_purchase_rate", "per-item train purchase-rate lookup"),
)


# the reference lines in black, told apart by their dashes (the models take the colour cycle)
_REFERENCE_STYLE = {"oracle_purchase": "--", "item_ctr": ":", "item_purchase_rate": "-."}


def load_reports(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``LABEL=DIR`` (or ``DIR``, labelled by its name) → (label, report.json of DIR)."""
    out = []
    for spec in specs:
        label, _, path = spec.rpartition("=")
        directory = Path(path)
        report = directory / "report.json" if directory.is_dir() else directory
        if not report.is_file():
            raise FileNotFoundError(f"{report}: no report.json (run `cstwa-dist experiment` first)")
        out.append((label or directory.name, json.loads(report.read_text())))
    return out


def _pc(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _reference_value(report: dict[str, Any], key: str, task: str) -> float | None:
    scores = ((report.get("instrument") or {}).get("oracles") or {}).get("scores") or {}
    s = scores.get(key) or {}
    return s.get(f"{task}_auc") if s.get("available", True) else None


def summarise(reports: list[tuple[str, dict[str, Any]]], out: str | Path) -> dict[str, Any]:
    """Writes ``summary.md``, ``summary.json`` and ``purchase_vs_conflict.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [label for label, _ in reports]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for level, rep in reports:
        paired = {(d["group"], d["label"]): d for d in (rep.get("paired") or {}).get("rows", [])}
        for r in rep["rows"]:
            if r["group"] not in ("table2", "ablation", "variants"):
                continue
            row = rows.setdefault((r["group"], r["label"]), {"group": r["group"], "label": r["label"]})
            d = paired.get((r["group"], r["label"]))
            row[level] = {
                "click_mean": r["click_mean"],
                "click_std": r["click_std"],
                "purchase_mean": r["purchase_mean"],
                "purchase_std": r["purchase_std"],
                "purchase_gauc_mean": r.get("purchase_gauc_mean"),
                "purchase_gauc_std": r.get("purchase_gauc_std"),
                "seeds": len(r["seeds"]),
                "paired_mean": d["mean"] if d else None,
                "paired_std": d["std"] if d else None,
                "paired_wins": d["wins"] if d else None,
                "best_baseline": (rep.get("paired") or {}).get("baseline"),
                "beats_lookups": _beats_lookups(rep, r),
            }
    reference = {
        key: {lvl: {t: _reference_value(rep, key, t) for t in ("click", "purchase")} for lvl, rep in reports}
        for key, _ in _REFERENCE
    }
    graphs = {lvl: (rep.get("instrument") or {}).get("graph_mean") or [] for lvl, rep in reports}
    # per model, its ``--model-set`` settings at each level (the same everywhere in a well-run grid)
    settings: dict[str, dict[str, list[str]]] = {}
    for lvl, rep in reports:
        for model, ov in (rep.get("model_settings") or {}).items():
            settings.setdefault(model, {})[lvl] = list(ov)
    summary = {
        "levels": levels,
        "rows": list(rows.values()),
        "reference": reference,
        "graphs": graphs,
        "model_settings": settings,
    }
    atomic_write_json(out / "summary.json", summary, sort_keys=False)
    png = plot_levels(summary, out / "purchase_vs_conflict.png")
    atomic_write_text(out / "summary.md", "\n".join(_markdown(summary, png.name)) + "\n")
    logger.info("wrote %s, %s and %s", out / "summary.md", out / "summary.json", png)
    return summary


def _beats_lookups(rep: dict[str, Any], r: dict[str, Any]) -> bool | None:
    """Mean Click AUC above the per-item CTR lookup and mean Purchase AUC above both item lookups."""
    ctr_c = _reference_value(rep, "item_ctr", "click")
    ctr_p = _reference_value(rep, "item_ctr", "purchase")
    rate_p = _reference_value(rep, "item_purchase_rate", "purchase")
    if None in (ctr_c, ctr_p, rate_p):
        return None
    return bool(r["click_mean"] > ctr_c and r["purchase_mean"] > max(ctr_p, rate_p))


def _markdown(summary: dict[str, Any], png: str) -> list[str]:
    levels = summary["levels"]
    head = "| row | " + " | ".join(levels) + " |"
    sep = "| --- | " + " | ".join("---" for _ in levels) + " |"
    lines = [
        "# Purchase AUC across conflict levels",
        "",
        "Test Purchase AUC, mean ± std over seeds, of the epoch with the best validation Purchase AUC. "
        "A row marked † does not beat both per-item lookups at that level (Click AUC above the CTR "
        "lookup and Purchase AUC above both lookups).",
    ]
    for model, per_level in (summary.get("model_settings") or {}).items():
        kinds = {tuple(v) for v in per_level.values()}
        if len(kinds) == 1 and len(per_level) == len(levels):
            where = "at every level"
            shown = ", ".join(f"`{o}`" for o in next(iter(kinds)))
        else:  # differs between levels (or is missing at some): say so level by level
            where = "per level"
            shown = "; ".join(
                f"{lvl}: " + ", ".join(f"`{o}`" for o in per_level.get(lvl, [])) for lvl in levels
            )
        lines += ["", f"Settings of {model} (`--model-set`, in all its rows) {where}: {shown}."]
    for group, title in (
        ("table2", "Table 2: models"),
        ("ablation", "Table 3: CSTWA ablation"),
        ("variants", "Variants"),
    ):
        group_rows = [r for r in summary["rows"] if r["group"] == group]
        if not group_rows:
            continue
        lines += ["", f"## {title}", "", head, sep]
        for r in group_rows:
            cells = []
            for lvl in levels:
                v = r.get(lvl)
                if not v:
                    cells.append("—")
                    continue
                mark = " †" if v["beats_lookups"] is False else ""
                cells.append(_fmt(v["purchase_mean"], v["purchase_std"]) + mark)
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines += ["", f"Paired Δ Purchase AUC against each level's best baseline ({group}):", "", head, sep]
        for r in group_rows:
            cells = []
            for lvl in levels:
                v = r.get(lvl) or {}
                if v.get("paired_mean") is None:
                    cells.append(f"(best baseline: {v['best_baseline']})" if v.get("best_baseline") else "—")
                else:
                    cells.append(
                        f"{v['paired_mean']:+.4f} ± {v['paired_std']:.4f} ({v['paired_wins']}/{v['seeds']})"
                    )
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Partial oracles and lookups (test split, Click AUC / Purchase AUC)", "", head, sep]
    for key, name in _REFERENCE:
        cells = []
        for lvl in levels:
            v = summary["reference"][key][lvl]
            c, p = v["click"], v["purchase"]
            cells.append("—" if c is None and p is None else f"{_f4(c)} / {_f4(p)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    g_cells = []
    for lvl in levels:
        gm = summary["graphs"][lvl]
        g_cells.append(
            "; ".join(
                f"k={g['k']}: users {_pc(g['user']['rate'])} (chance {_pc(g['user']['chance'])}), "
                f"items {_pc(g['item']['rate'])} (chance {_pc(g['item']['chance'])})"
                for g in gm
            )
            or "—"
        )
    lines.append("| graph same-cluster neighbour rate | " + " | ".join(g_cells) + " |")
    lines += ["", f"![Purchase AUC against the conflict level]({png})"]
    return lines


def plot_levels(summary: dict[str, Any], path: Path) -> Path:
    """Purchase AUC (mean ± std) per Table 2 model against the level; lookups and oracle dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = summary["levels"]
    x = list(range(len(levels)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in (r for r in summary["rows"] if r["group"] == "table2"):
        pts = [(i, r[lvl]) for i, lvl in enumerate(levels) if r.get(lvl)]
        ax.errorbar(
            [i for i, _ in pts],
            [v["purchase_mean"] for _, v in pts],
            yerr=[v["purchase_std"] for _, v in pts],
            marker="o",
            capsize=3,
            label=r["label"],
            linewidth=2.5 if r["label"].lower() == "cstwa" else 1.0,
            color="crimson" if r["label"].lower() == "cstwa" else None,
        )
    for key, name in _REFERENCE:
        if key in ("oracle_click", "affinity"):
            continue
        ys = [summary["reference"][key][lvl]["purchase"] for lvl in levels]
        if all(y is not None for y in ys):
            ax.plot(x, ys, color="black", linestyle=_REFERENCE_STYLE[key], linewidth=1.0, label=name)
    ax.set_xticks(x, levels)
    ax.set_xlabel("conflict level")
    ax.set_ylabel("test Purchase AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
