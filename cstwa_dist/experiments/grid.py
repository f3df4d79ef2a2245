"""The paper's experiments as one resumable job: Table 2, Table 3 (ablation) and Figure 2 sweeps.

An experiment is a list of *cells* (model × config overrides × seed). Every rank walks the same list
in the same order inside one torchrun job, so the process group and the Ray runtime are set up once
and each cell is a call to ``train``; structure (pre-training + graphs) is mined once per seed and
``k`` and shared by every cell that needs it. A cell whose ``metrics.json`` exists is not re-run, so
a killed experiment restarts where it stopped. Identical cells (e.g. full CSTWA in Table 2 and in
the ablation) run once. Rank 0 writes ``report.json``, ``report.md`` and the sweep plots.

Every number is a cell's reported test metric, i.e. that of the epoch ``train.select_epoch`` picked
(by default the best validation Purchase AUC, as in the paper's protocol); the tables name the
selected epochs. Besides AUC they carry GAUC (per-user AUC) and a calibration table (log loss, ECE),
see ``cstwa_dist/train/metrics.py``. Cells written before those metrics existed show "n/a".

Next to the tables rank 0 puts the *instrument* (``report.json["instrument"]``,
:mod:`cstwa_dist.experiments.oracles`): the partial oracles and per-item lookups on the evaluated
split (Table 2 and Table 3 list the two lookups as reference rows, the floor a model must clear)
and, per structure directory the experiment mined (one per seed and ``k``), the share of the kNN
graphs' neighbours in the same true cluster.
Both are cached under ``<out>/instrument/`` so a rerun does not recompute them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cstwa_dist.config import RunConfig, flat_settings, flatten, settings_differences
from cstwa_dist.distributed.collectives import broadcast_object
from cstwa_dist.distributed.env import init_distributed
from cstwa_dist.fs import atomic_write_json, atomic_write_text
from cstwa_dist.registry import default_config, get_model_spec, recorded_settings, with_overrides
from cstwa_dist.train.pretrain import (
    mining_settings,
    pretrain_structure,
    structure_complete,
    structure_mismatch,
)
from cstwa_dist.train.trainer import train

logger = logging.getLogger(__name__)
SWEEP_KEYS = {
    "beta": "structure.beta",
    "gamma": "loss.gamma",
    "layers": "structure.layers",
    "k": "structure.k",
}
COMPONENTS = ("SM", "CP", "CE")
_COMPONENT_KEYS = {
    "SM": "models.cstwa.structure_migrator",
    "CP": "models.cstwa.click_perceptron",
    "CE": "models.cstwa.curse_escaper",
}
# Table 3's rows: MLP, each component alone, each pair, all three (the paper's order)
ABLATION_ROWS: list[tuple[str, ...]] = [
    ("SM",),
    ("CP",),
    ("CE",),
    ("SM", "CP"),
    ("SM", "CE"),
    ("CP", "CE"),
    ("SM", "CP", "CE"),
]


@dataclass(frozen=True)
class Cell:
    """One training run of the experiment grid."""

    group: str  # "table2" | "ablation" | "sweep:<param>"
    label: str  # the row (or sweep value) it contributes to
    model: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def cell_id(self) -> str:
        """Same model, overrides and seed ⇒ same id, so shared cells run once."""
        key = json.dumps([self.model, sorted(self.overrides), self.seed])
        return f"{self.model}-s{self.seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def parse_sweep(spec: str) -> tuple[str, str, list[Any]]:
    """``beta=0.1,0.3`` → ("beta", "structure.beta", [0.1, 0.3]); ``section.key=...`` also accepted."""
    if "=" not in spec:
        raise ValueError(f"--sweep {spec!r} must look like beta=0.1,0.3,0.5")
    name, _, values = spec.partition("=")
    name = name.strip()
    key = SWEEP_KEYS.get(name, name)
    if "." not in key:
        raise ValueError(f"--sweep parameter {name!r}: use one of {sorted(SWEEP_KEYS)} or section.key")
    parsed = []
    for v in values.split(","):
        v = v.strip()
        try:
            parsed.append(int(v))
        except ValueError:
            try:
                parsed.append(float(v))
            except ValueError as e:
                raise ValueError(f"--sweep {spec!r}: {v!r} is not a number") from e
    if not parsed:
        raise ValueError(f"--sweep {spec!r} lists no values")
    return name, key, parsed


def _model_overrides(flag: str, spec: str, rest: str) -> tuple[str, tuple[str, ...]]:
    """``MODEL:section.key=value[;section.key=value]`` (``rest`` of ``flag``'s ``spec``) → (model,
    overrides); overrides are separated by ``;`` (values may hold commas, e.g. lists). The model must
    be registered: unknown names fail before anything runs. A model's own settings are
    ``models.MODEL.key=value``; another model's (``cstwa:models.ple.levels=3``) would change nothing
    in this model's cells but their ids, so it is refused as the slip it is."""
    model, sep, overrides = rest.partition(":")
    model = model.strip()
    if not sep or not model:
        raise ValueError(f"{flag} {spec!r}: expected MODEL:section.key=value[;section.key=value]")
    ov = tuple(o.strip() for o in overrides.split(";") if o.strip())
    bad = [o for o in ov if "=" not in o or "." not in o.partition("=")[0]]
    if not ov or bad:
        raise ValueError(f"{flag} {spec!r}: overrides must be section.key=value, got {bad or 'none'}")
    get_model_spec(model)
    for o in ov:
        parts = o.partition("=")[0].strip().split(".")
        if parts[0] == "models" and parts[1] != model:
            raise ValueError(f"{flag} {spec!r}: {o!r} sets {parts[1]}'s own settings, not {model}'s")
    return model, ov


def parse_variant(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """``LABEL=MODEL:section.key=value;section.key=value`` → (label, model, overrides).

    A named configuration of one model, e.g. ``SM reading (b)=cstwa:structure.sm_reading=recomputed``.
    """
    label, sep, rest = spec.partition("=")
    if not sep or not label.strip():
        raise ValueError(
            f"--variant {spec!r} must look like LABEL=MODEL:section.key=value[;section.key=value]"
        )
    model, ov = _model_overrides("--variant", spec, rest)
    return label.strip(), model, ov


def parse_model_set(spec: str) -> tuple[str, tuple[str, ...]]:
    """``MODEL:section.key=value[;section.key=value]`` → (model, overrides): one model's own settings."""
    return _model_overrides("--model-set", spec, spec)


def with_model_sets(cells: list[Cell], model_sets: list[str]) -> list[Cell]:
    """Every cell of a model gets that model's own settings (``--model-set``), ahead of its overrides.

    A model's hyper-parameters chosen for a data set (e.g. CSTWA's ``γ`` on validation) then hold in
    every table it appears in (Table 2, the ablation, sweeps, variants), while the other models' cells
    keep their ids and stay reusable. A key the cell sets itself (a sweep value, a variant) wins: it
    comes later. The settings are part of the cell's overrides, so its id and ``cell.json`` show them.
    """
    sets = model_settings_of(model_sets)
    out = []
    for c in cells:
        own = {o.partition("=")[0].strip() for o in c.overrides}
        extra = tuple(o for o in sets.get(c.model, []) if o.partition("=")[0].strip() not in own)
        out.append(replace(c, overrides=extra + c.overrides) if extra else c)
    return out


def plan_cells(
    models: list[str] | None,
    seeds: list[int],
    ablation: bool,
    sweeps: list[str],
    variants: list[str] | None = None,
    model_sets: list[str] | None = None,
) -> list[Cell]:
    """The grid, in run order; cells shared between groups appear once per group (run once)."""
    cells: list[Cell] = []
    for m in models or []:
        get_model_spec(m)  # unknown names fail before anything runs
        cells += [Cell("table2", m, m, s, ()) for s in seeds]
    if ablation:
        cells += [Cell("ablation", "MLP", "mlp", s, ()) for s in seeds]
        for row in ABLATION_ROWS:
            ov = tuple(f"{_COMPONENT_KEYS[c]}={'true' if c in row else 'false'}" for c in COMPONENTS)
            cells += [Cell("ablation", "+".join(row), "cstwa", s, ov) for s in seeds]
    for spec in sweeps:
        name, key, values = parse_sweep(spec)
        for v in values:
            cells += [Cell(f"sweep:{name}", str(v), "cstwa", s, (f"{key}={v}",)) for s in seeds]
    for spec in variants or []:
        label, model, ov = parse_variant(spec)
        cells += [Cell("variants", label, model, s, ov) for s in seeds]
    return with_model_sets(cells, model_sets or [])


def cell_config(base: RunConfig, cell: Cell, out: Path) -> RunConfig:
    """The typed config of one cell: the base run config, the cell's overrides, its seed and folders.

    Structure is shared per seed and ``k`` (``<out>/structure/k<k>-seed<s>``); a cell whose overrides
    change how the structure is mined (``pretrain.mining_settings``: e.g. ``structure.pretrain_epochs``,
    the kNN search, the CTR MLP's width) gets its own ``k<k>-seed<s>-<hash>`` instead of silently
    reading graphs mined otherwise. Results go to ``<out>/cells/<cell_id>``. Every value is validated
    once, by the config dataclasses.
    """
    cfg = with_overrides(base, cell.overrides)
    name = f"k{cfg.structure.k}-seed{cell.seed}"
    mine = _mining_key(cfg)
    if mine != _mining_key(replace(base, structure=replace(base.structure, k=cfg.structure.k))):
        name += "-" + hashlib.sha1(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:8]
    graph_dir = out / "structure" / name
    return replace(
        cfg,
        train=replace(cfg.train, seed=cell.seed, run_dir=str(out / "cells")),
        structure=replace(cfg.structure, graph_dir=str(graph_dir)),
    )


def _mining_key(cfg: RunConfig) -> dict[str, Any]:
    """The mining settings that name a structure directory (seed and ``k`` are in the name already)."""
    return {k: v for k, v in mining_settings(cfg).items() if k not in ("train.seed", "structure.k")}


# Settings that do not change a cell's results (where things go, how chatty, how fast): a finished
# cell stays valid when only these differ.
_OPERATIONAL = {
    "data.prefetch_batches",
    "data.ray_num_cpus",
    "data.eval_batch_size",
    "train.run_dir",
    "train.log_every",
    "train.tensorboard",
    "train.checkpoint_every",
    "train.checkpoint_dir",
    "train.keep_checkpoints",
    "train.resume",
    "train.collective_timeout_s",
    "structure.graph_dir",
    "structure.recall_queries",
    "structure.save_representations",
}


def stale_settings(run_dir: Path, cfg: RunConfig, model: str | None = None) -> list[str]:
    """How a finished cell's recorded config differs from the one it would run with now.

    Cells are named by model, overrides and seed only, so an experiment re-run with another base
    config (a changed YAML, another ``--set``, new code defaults) would otherwise reuse results that
    were computed differently. Keys the cell did not record (written before the key existed) count
    as the default; keys recorded under a former name are read under today's
    (``registry.recorded_settings``). Operational keys (paths, logging, checkpoint cadence) are
    ignored, and so, given the cell's ``model``, are the other models' own settings
    (``models.<other>.*``): they cannot change its results.
    """
    recorded = recorded_settings(
        flatten(json.loads((run_dir / "metrics.json").read_text()).get("config", {}))
    )
    wanted = {
        k: v
        for k, v in flat_settings(cfg).items()
        if k not in _OPERATIONAL
        and not (model is not None and k.startswith("models.") and not k.startswith(f"models.{model}."))
    }
    return settings_differences(recorded, wanted, fallback=flat_settings(default_config()))


def run_experiment(
    base: RunConfig, cells: list[Cell], out: str | Path, model_sets: list[str] | None = None
) -> dict[str, Any]:
    """Runs every cell not yet finished, then (rank 0) writes the reports. Returns the report.

    Must run inside ``command_runtime`` (process group + Ray runtime), on every rank.
    """
    env = init_distributed()
    out = Path(out)
    t0 = time.perf_counter()
    unique = list({c.cell_id: c for c in cells}.values())
    logger.info("experiment: %d cells (%d unique) → %s", len(cells), len(unique), out)
    # every cell's config first: a bad override fails now, not after the cells before it ran
    configs = {c.cell_id: cell_config(base, c, out) for c in unique}
    stale: list[str] = []
    if env.is_main:
        for c in unique:
            run_dir = out / "cells" / c.cell_id
            if (run_dir / "metrics.json").exists():
                diff = stale_settings(run_dir, configs[c.cell_id], c.model)
                if diff:
                    stale.append(f"{run_dir}: {'; '.join(diff)}")
    stale = broadcast_object(stale)
    if stale:
        raise ValueError(
            f"{len(stale)} finished cell(s) in {out} were run with another config than this "
            f"experiment's and would be reused as if they matched; use a new --out (or delete those "
            f"cells). First: {stale[0]}"
        )
    for i, cell in enumerate(unique, 1):
        run_dir = out / "cells" / cell.cell_id
        done = broadcast_object((run_dir / "metrics.json").exists())
        if done:
            logger.info("[%d/%d] %s: finished before, skipped", i, len(unique), cell.cell_id)
            continue
        cfg = configs[cell.cell_id]
        graph_dir = cfg.structure.graph_dir
        mspec = get_model_spec(cell.model)
        if mspec.needs_graphs(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)):
            if broadcast_object(structure_complete(graph_dir)):
                problem = broadcast_object(structure_mismatch(graph_dir, cfg) if env.is_main else None)
                if problem:
                    raise ValueError(problem)
            else:
                logger.info(
                    "[%d/%d] mining structure for seed %d, k %d → %s",
                    i,
                    len(unique),
                    cell.seed,
                    cfg.structure.k,
                    graph_dir,
                )
                pretrain_structure(cfg)
        logger.info(
            "[%d/%d] %s %s seed %d %s",
            i,
            len(unique),
            cell.group,
            cell.model,
            cell.seed,
            " ".join(cell.overrides),
        )
        train(cfg, cell.model, run_dir=run_dir)
        gc.collect()
        if env.is_main:
            atomic_write_json(run_dir / "cell.json", asdict(cell), sort_keys=False)
    report = build_report(cells, out, model_sets) if env.is_main else {}
    if env.is_main:
        # rank 0 only, while the other ranks wait in the broadcast below (seconds at scale 1; cached)
        report["instrument"] = instrument_report(base, cells, out)
        report["wall_seconds_this_run"] = time.perf_counter() - t0
        write_reports(report, out)
    broadcast_object(None)
    return report


def instrument_report(base: RunConfig, cells: list[Cell], out: Path) -> dict[str, Any]:
    """The partial oracles and the graphs' same-cluster rate of this experiment (``report["instrument"]``).

    ``oracles``: :func:`~cstwa_dist.experiments.oracles.partial_oracles` on ``train.eval_split`` of the base
    config's data set (the split the cells' test metrics are on). ``graphs``: one entry per structure
    directory a cell of this experiment used (``seed``, ``k`` and
    :func:`~cstwa_dist.experiments.oracles.graph_cluster_rate`'s result); ``graph_mean``: per ``k``, the mean
    over the seeds whose graphs are available. Results are cached under ``<out>/instrument/``. A failure
    here is logged and recorded as ``error`` rather than raised: the tables of finished cells matter more.
    Memory: :mod:`cstwa_dist.experiments.oracles` (rank 0 only; O(evaluated rows) for the exact AUCs).
    """
    from cstwa_dist.experiments.oracles import graph_cluster_rate, partial_oracles

    dataset = Path(base.data.dataset)
    cache = out / "instrument"
    result: dict[str, Any] = {}
    try:
        split = base.train.eval_split
        result["oracles"] = partial_oracles(dataset, split=split, cache=cache / f"oracles-{split}.json")
    except Exception as e:  # the report of finished cells must still be written
        logger.exception("partial oracles failed")
        result["oracles"] = {"error": f"{type(e).__name__}: {e}"}
    dirs: dict[str, tuple[int, int]] = {}
    for cell in {c.cell_id: c for c in cells}.values():
        cfg = cell_config(base, cell, out)
        mspec = get_model_spec(cell.model)
        if mspec.needs_graphs(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)):
            dirs.setdefault(cfg.structure.graph_dir, (cell.seed, cfg.structure.k))
    graphs: list[dict[str, Any]] = []
    for gd, (seed, k) in sorted(dirs.items(), key=lambda kv: (kv[1][1], kv[1][0])):
        try:
            rate = graph_cluster_rate(gd, dataset, cache=cache / f"graph-{Path(gd).name}.json")
        except Exception as e:  # as above
            logger.exception("graph cluster rate of %s failed", gd)
            rate = {"graph_dir": gd, "available": False, "reason": f"{type(e).__name__}: {e}"}
        graphs.append({"seed": seed, "k": k, "dir": Path(gd).name, **rate})
    result["graphs"] = graphs
    result["graph_mean"] = []
    for k in sorted({g["k"] for g in graphs}):
        # the base config's graphs only (a cell that changes how they are mined has its own dir)
        ok = [g for g in graphs if g["k"] == k and g.get("available") and g["dir"] == f"k{k}-seed{g['seed']}"]
        if not ok:
            continue
        mean: dict[str, Any] = {"k": k, "seeds": [g["seed"] for g in ok]}
        for side in ("user", "item"):
            mean[side] = {
                key: _mean_std([g[side][key] for g in ok])[0] for key in ("rate", "weighted_rate", "chance")
            }
        result["graph_mean"].append(mean)
    return result


# per-task metrics aggregated besides AUC (mean ± std over seeds), as in metrics.json: <task>_<key>
_EXTRA = ("gauc", "logloss", "ece")


def _mean_std(xs: list[float | None]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def model_settings_of(model_sets: list[str]) -> dict[str, list[str]]:
    """``--model-set`` specs → model → its settings in the order given (what the report states)."""
    settings: dict[str, list[str]] = {}
    for spec in model_sets:
        model, ov = parse_model_set(spec)
        settings.setdefault(model, []).extend(ov)
    return settings


def build_report(cells: list[Cell], out: Path, model_sets: list[str] | None = None) -> dict[str, Any]:
    """Aggregates finished cells: mean ± std over seeds per (group, label), gains over MLP."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for c in cells:
        m = json.loads((out / "cells" / c.cell_id / "metrics.json").read_text())
        r = rows.setdefault(
            (c.group, c.label),
            {
                "group": c.group,
                "label": c.label,
                "model": c.model,
                "overrides": list(c.overrides),
                "click": [],
                "purchase": [],
                **{f"{t}_{k}": [] for k in _EXTRA for t in ("click", "purchase")},
                "best_epoch": [],
                "seeds": [],
                "samples_per_s": [],
            },
        )
        r["click"].append(m["click_auc"])
        r["purchase"].append(m["purchase_auc"])
        for k in _EXTRA:
            for t in ("click", "purchase"):
                r[f"{t}_{k}"].append(m.get(f"{t}_{k}"))  # None in cells from before these metrics
        r["best_epoch"].append(m.get("best_epoch"))
        r["seeds"].append(c.seed)
        r["samples_per_s"].append(m["samples_per_s"])
    table: list[dict[str, Any]] = []
    for r in rows.values():
        r["click_mean"], r["click_std"] = _mean_std(r["click"])
        r["purchase_mean"], r["purchase_std"] = _mean_std(r["purchase"])
        for k in _EXTRA:
            for t in ("click", "purchase"):
                r[f"{t}_{k}_mean"], r[f"{t}_{k}_std"] = _mean_std(r[f"{t}_{k}"])
        table.append(r)
    for group in {r["group"] for r in table}:
        base = next((r for r in table if r["group"] == group and r["model"] == "mlp"), None)
        if base is None:  # sweeps and grids without MLP: gains against the Table 2 / ablation MLP
            base = next((r for r in table if r["model"] == "mlp"), None)
        for r in table:
            if r["group"] != group:
                continue
            for k in ("click", "purchase"):
                r[f"{k}_gain_pct"] = (
                    100.0 * (r[f"{k}_mean"] - base[f"{k}_mean"]) / base[f"{k}_mean"] if base else None
                )
    paired = paired_differences(table)
    sample = json.loads((out / "cells" / cells[0].cell_id / "metrics.json").read_text()) if cells else {}
    return {
        "rows": table,
        "paired": paired,
        "model_settings": model_settings_of(model_sets or []),
        "dataset": sample.get("config", {}).get("data", {}).get("dataset"),
        "world_size": sample.get("world_size"),
        "epochs": sample.get("epochs"),
        "embedding_optimizer": sample.get("embedding_optimizer"),
        "train_rows_per_epoch": sample.get("train_rows_per_epoch"),
        "eval_rows": sample.get("eval_rows"),
        "select_epoch": sample.get("config", {}).get("train", {}).get("select_epoch", "last"),
    }


def paired_differences(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-seed Purchase AUC differences of every Table 2 / Table 3 row against the best baseline.

    The best baseline is the Table 2 row with the highest mean Purchase AUC among the models other than
    CSTWA. Seeds share the data and (per seed) the data order and initialisation seed, so the per-seed
    difference removes what the seeds have in common; its mean ± std and the count of seeds won say
    more than two overlapping mean ± std intervals. Only seeds present in both rows are paired.
    """
    baselines = [r for r in table if r["group"] == "table2" and r["model"] != "cstwa"]
    if not baselines:
        return None
    best = max(baselines, key=lambda r: r["purchase_mean"])
    ref = dict(zip(best["seeds"], best["purchase"], strict=True))
    rows = []
    for r in table:
        if r["group"] not in ("table2", "ablation", "variants") or r is best:
            continue
        diffs = [x - ref[s] for s, x in zip(r["seeds"], r["purchase"], strict=True) if s in ref]
        if not diffs:
            continue
        mean, std = _mean_std(diffs)
        rows.append(
            {
                "group": r["group"],
                "label": r["label"],
                "diffs": diffs,
                "mean": mean,
                "std": std,
                "wins": sum(d > 0 for d in diffs),
            }
        )
    return {"baseline": best["label"], "rows": rows}


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _gain(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f} %"


def _ms(r: dict[str, Any], key: str) -> tuple[float, float]:
    """(mean, std) of ``key`` in a report row; NaN for rows of older reports that lack it."""
    nan = float("nan")
    return r.get(f"{key}_mean", nan), r.get(f"{key}_std", nan)


def _epochs(xs: list[int | None]) -> str:
    """The selected epoch of each seed, in seed order ("?" for cells from before selection)."""
    return ", ".join("?" if x is None else str(x) for x in xs)


def _f4(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f} %"


_LOOKUPS = ("item_ctr", "item_purchase_rate")


def _lookup_rows(oracles: dict[str, Any]) -> list[str]:
    """Table 2 / 3 reference rows: the two per-item train lookups (no seeds, gains or epochs)."""
    scores = oracles.get("scores") or {}
    lines = []
    for name in _LOOKUPS:
        s = scores.get(name)
        if not s:
            continue
        cols = [_f4(s.get(f"{t}_{m}")) for t in ("click", "purchase") for m in ("auc", "gauc")]
        lines.append(f"| *reference: {s['description']}* | — | " + " | ".join(cols) + " | — | — | — |")
    return lines


def _instrument_lines(instrument: dict[str, Any]) -> list[str]:
    """report.md's "Partial oracles" table and the graphs' same-cluster neighbour rate."""
    if not instrument:
        return []
    lines: list[str] = []
    o = instrument.get("oracles") or {}
    if "error" in o:
        lines += ["", f"## Partial oracles: not computed ({o['error']})"]
    elif o:
        lines += [
            "",
            f"## Partial oracles ({o['split']} split)",
            "",
            f"What the data allow, on the impressions the models are evaluated on ({o['rows']} rows, "
            f"{o['clicks']} clicks, {o['purchases']} purchases; `cstwa-dist oracles`). *truth*: the "
            "generator's probabilities (synthetic data only); *lookup*: the item's train rate, smoothed "
            f"toward the global rate with a Beta prior of {o['prior_impressions']:g} impressions. Every "
            "score is evaluated as a Click and as a Purchase score; the oracles are the true click "
            "probability for Click and the true purchase probability for Purchase.",
            "",
            "| score | kind | Click AUC | Click GAUC | Purchase AUC | Purchase GAUC |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s in (o.get("scores") or {}).values():
            if s.get("available"):
                cols = [_f4(s.get(f"{t}_{m}")) for t in ("click", "purchase") for m in ("auc", "gauc")]
            else:
                cols = ["n/a (no ground truth)"] * 4
            lines.append(f"| {s['description']} | {s['kind']} | " + " | ".join(cols) + " |")
        c = o.get("truth_check")
        if c:
            lines += [
                "",
                "Truth check (do the recomputed probabilities explain the labels? |z| > 5 means the data set "
                f"came from another generator version): click {c['click_mean_truth']:.4f} predicted vs "
                f"{c['click_observed_rate']:.4f} observed (z {c['click_z']:+.1f}), purchase "
                f"{c['purchase_mean_truth']:.4f} vs {c['purchase_observed_rate']:.4f} "
                f"(z {c['purchase_z']:+.1f}).",
            ]
    graphs = instrument.get("graphs") or []
    if graphs:
        lines.append("")
        for m in instrument.get("graph_mean") or []:
            per_seed = "; ".join(
                f"seed {g['seed']}: users {_pct(g['user']['rate'])}, items {_pct(g['item']['rate'])}"
                for g in graphs
                if g["k"] == m["k"] and g.get("available")
            )
            lines.append(
                f"Graph same-cluster neighbour rate (k={m['k']}, mean over {len(m['seeds'])} seed(s)): "
                f"users {_pct(m['user']['rate'])} (chance {_pct(m['user']['chance'])}), items "
                f"{_pct(m['item']['rate'])} (chance {_pct(m['item']['chance'])}); {per_seed}."
            )
        for g in graphs:
            if not g.get("available"):
                lines.append(
                    f"Graph same-cluster neighbour rate (k={g['k']}, seed {g['seed']}): not available "
                    f"({g.get('reason', '?')})."
                )
        lines += [
            "",
            "(Share of the kNN graphs' non-self neighbours in the entity's true cluster; chance: "
            "Σ_c share_c², the rate of uniformly random neighbours.)",
        ]
    return lines


def write_reports(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    instrument = report.get("instrument") or {}
    lines = [
        "# Experiment report",
        "",
        f"Dataset `{report['dataset']}`; {report['epochs']} epochs; {report['world_size']} rank(s); "
        f"embedding optimizer {report['embedding_optimizer']}; {report['train_rows_per_epoch']} train rows "
        f"per epoch, {report['eval_rows']} evaluated impressions. Test metrics of the epoch selected by "
        f"`train.select_epoch={report.get('select_epoch', 'last')}` (column *epoch*: per seed). AUC and "
        "GAUC (per-user AUC, impression-weighted, single-class users skipped) are mean ± sample std "
        "over seeds; gains are relative to MLP's mean AUC.",
    ]
    settings = report.get("model_settings") or {}
    if settings:
        own = "; ".join(f"{m}: " + ", ".join(f"`{o}`" for o in ov) for m, ov in settings.items())
        lines += ["", f"Model settings (`--model-set`, in every cell of that model, every table): {own}."]
    titles = {
        "table2": "Table 2: models",
        "ablation": "Table 3: ablation of CSTWA's components",
        "variants": "Variants (named configurations, `--variant`)",
    }
    groups = sorted({r["group"] for r in report["rows"]}, key=lambda g: (g != "table2", g != "ablation", g))
    for group in groups:
        rows = [r for r in report["rows"] if r["group"] == group]
        lines += ["", f"## {titles.get(group, 'Sweep of ' + group.removeprefix('sweep:'))}", ""]
        head = "value" if group.startswith("sweep:") else "model"
        lines += [
            f"| {head} | seeds | Click AUC | Click GAUC | Purchase AUC | Purchase GAUC | Click gain | "
            "Purchase gain | epoch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['label']} | {len(r['seeds'])} | {_fmt(r['click_mean'], r['click_std'])} | "
                f"{_fmt(*_ms(r, 'click_gauc'))} | {_fmt(r['purchase_mean'], r['purchase_std'])} | "
                f"{_fmt(*_ms(r, 'purchase_gauc'))} | {_gain(r['click_gain_pct'])} | "
                f"{_gain(r['purchase_gain_pct'])} | {_epochs(r.get('best_epoch', []))} |"
            )
        if group in ("table2", "ablation", "variants"):
            lines += _lookup_rows(instrument.get("oracles") or {})
        if group.startswith("sweep:"):
            png = plot_sweep(group.removeprefix("sweep:"), rows, out)
            lines += ["", f"![{group}]({png.name})"]
    paired = report.get("paired")
    if paired:
        lines += [
            "",
            f"## Paired differences against the best baseline ({paired['baseline']})",
            "",
            "Purchase AUC of the row minus that of the best baseline, seed by seed (same data, same seed); "
            "mean ± std of the differences, and on how many seeds the row was ahead.",
            "",
            "| group | row | Δ Purchase AUC | ahead on | per seed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for d in paired["rows"]:
            per_seed = ", ".join(f"{x:+.4f}" for x in d["diffs"])
            lines.append(
                f"| {d['group']} | {d['label']} | {d['mean']:+.4f} ± {d['std']:.4f} | "
                f"{d['wins']}/{len(d['diffs'])} | {per_seed} |"
            )
    lines += _instrument_lines(instrument)
    lines += [
        "",
        "## Calibration (test, selected epoch)",
        "",
        "Log loss and expected calibration error over 10 equal-count bins of predicted probability "
        "(mean ± std over seeds); per-run deciles are in each cell's metrics.json.",
        "",
        "| group | row | Click log loss | Click ECE | Purchase log loss | Purchase ECE |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group in groups:
        for r in (r for r in report["rows"] if r["group"] == group):
            cols = [_fmt(*_ms(r, f"{t}_{k}")) for t in ("click", "purchase") for k in ("logloss", "ece")]
            lines.append(f"| {group} | {r['label']} | " + " | ".join(cols) + " |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "report.json", report, sort_keys=False)
    logger.info("wrote %s and %s", out / "report.md", out / "report.json")


def plot_sweep(name: str, rows: list[dict[str, Any]], out: Path) -> Path:
    """Figure 2-style plot: Click and Purchase AUC (mean ± std over seeds) against the parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: float(r["label"]))
    x = [float(r["label"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, k, title in ((axes[0], "click", "Click AUC"), (axes[1], "purchase", "Purchase AUC")):
        ax.errorbar(
            x, [r[f"{k}_mean"] for r in rows], yerr=[r[f"{k}_std"] for r in rows], marker="o", capsize=3
        )
        ax.set_xlabel(name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"CSTWA: sweep of {name}")
    fig.tight_layout()
    path = out / f"sweep_{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
