"""Partial oracles and simple lookups: what the data allow, so a model's AUC can be read against it.

Why: an AUC means little on its own. On data written by ``cstwa-dist synth`` the generating
probabilities are known (:meth:`cstwa_dist.data.synth.SynthWorld.truth` plus the calibrated biases in
``synth.json``), so the best any model could do — and what single ingredients of the truth reach — can
be measured on the very impressions the models are evaluated on. Two per-item lookups learnt from the
train split (needing no ground truth, so available for every data set) are the floor a model must clear
to have learnt anything beyond item popularity. The experiment report
(:mod:`cstwa_dist.experiments.grid`) prints them next to its tables.

Scores (each evaluated as a Click *and* a Purchase score; AUC and GAUC by the project's own
:func:`~cstwa_dist.train.metrics.exact_auc` / :func:`~cstwa_dist.train.metrics.group_auc`, so the
numbers are comparable with the models'; GAUC groups by the data set's user id):

* ``oracle_purchase`` (truth): ``sigmoid(click_logit + bias_ctr) · sigmoid(buy_logit + bias_cvr)``, the
  true purchase probability of the impression — the Purchase oracle.
* ``oracle_click`` (truth): ``sigmoid(click_logit + bias_ctr)``, the Click oracle; as a Purchase score it
  shows how far the click signal alone gets on purchases.
* ``affinity`` (truth): the user–item affinity ``l_u · l_i`` alone (the part of the truth the
  structure is about).
* ``item_ctr`` (lookup): the item's train click rate, smoothed toward the global rate.
* ``item_purchase_rate`` (lookup): the item's train purchases per impression, smoothed the same way.

Smoothing: a Beta prior of strength ``PRIOR_IMPRESSIONS = 20`` impressions centred on the global train
rate, i.e. ``(events_i + 20·global) / (impressions_i + 20)``; an item never seen in train scores the
global rate. 20 impressions: at the ``fair`` preset's 400 train impressions per item the prior moves a
typical item by ~5 % of the way to the global rate, while an item seen a handful of times is not ranked
on two lucky purchases. The truth probabilities are computed in float32 exactly as the generator draws
the labels from them (``_chunks``), so ``oracle_*`` are the probabilities the labels were drawn with.

For a data set that ``synth`` did not write (no ``synth.json``) the truth scores are present with
``available: false`` and every metric None; the lookups are still computed.

Memory (one process): the train pass holds one Parquet record batch (``BATCH_ROWS`` rows, three
columns) and three int64 counters per item. The evaluated split is read batch by batch too, but exact
AUC and GAUC rank all its impressions at once, so per row it keeps the user and item id (16 B), the
two labels (2 B) and the three truth scores (12 B, float32), i.e. ``~30 B × rows``, plus the
metric functions' transient sort buffers (~100 B × rows for GAUC) — the same order as the gathered
predictions of a model evaluation. Per batch, the truth needs ``~2 × latent_dim × 4 B`` per row.
:func:`graph_cluster_rate` holds one block of graph rows (``block_rows``) and one cluster id per entity.

Results are JSON-able dicts; given a ``cache`` path, a result is written there with a key over the
inputs (file names, sizes, mtimes, ``synth.json``, the graph manifests, this module's version) and
reused while the key matches. A cache path inside the data set folder is refused: a data set is
never written to after it was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cstwa_dist.data.spec import DatasetSpec, split_files
from cstwa_dist.fs import atomic_write_json
from cstwa_dist.train.metrics import exact_auc, group_auc

logger = logging.getLogger(__name__)

__all__ = ["SCORES", "graph_cluster_rate", "partial_oracles"]

VERSION = 1  # part of every cache key: bump when a number's definition changes
PRIOR_IMPRESSIONS = 20.0  # Beta-prior strength of the per-item lookups, in impressions
BATCH_ROWS = 262_144  # Parquet rows per record batch read
GRAPH_SIDES = ("user", "item")
# name -> (kind, description); kind "truth" needs synth.json, "lookup" does not. Report order.
SCORES: dict[str, tuple[str, str]] = {
    "oracle_click": ("truth", "true click probability"),
    "oracle_purchase": ("truth", "true purchase probability"),
    "affinity": ("truth", "user–item affinity alone"),
    "item_ctr": ("lookup", "per-item train CTR"),
    "item_purchase_rate": ("lookup", "per-item train purchase rate"),
}
_TRUTH = tuple(k for k, (kind, _) in SCORES.items() if kind == "truth")
_TASKS = ("click", "purchase")


# --- caching -------------------------------------------------------------------------------------
def _file_key(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _cache_key(parts: Any) -> str:
    return hashlib.sha1(json.dumps([VERSION, parts], default=str).encode()).hexdigest()


def _check_cache_path(cache: Path, dataset: Path) -> None:
    if cache.resolve().is_relative_to(Path(dataset).resolve()):
        raise ValueError(f"cache {cache} lies inside the data set {dataset}: a data set is never written to")


def _cached(cache: Path | None, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or the result stored in ``cache`` under the same key."""
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if isinstance(stored, dict) and stored.get("cache_key") == key:
                logger.info("reusing %s", cache)
                return stored
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable cache %s: %s", cache, e)
    result = compute()
    result["cache_key"] = key
    if cache is not None:
        atomic_write_json(cache, result, sort_keys=False)
    return result


def _num(x: float) -> float | None:
    """JSON-safe metric: NaN (a class absent) becomes None."""
    return None if x is None or math.isnan(x) else float(x)


# --- partial oracles -----------------------------------------------------------------------------
def _batches(files: list[Path], columns: list[str]) -> Any:
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _item_lookups(dataset: Path, spec: DatasetSpec) -> dict[str, Any]:
    """Smoothed per-item train click and purchase rates (O(items) counters, one batch at a time)."""
    n = spec.num_items
    imps = np.zeros(n, dtype=np.int64)
    clicks = np.zeros(n, dtype=np.int64)
    buys = np.zeros(n, dtype=np.int64)
    for b in _batches(split_files(dataset, "train"), [spec.item_id, "click", "purchase"]):
        item = b.column(spec.item_id).to_numpy()
        if item.size and (int(item.min()) < 0 or int(item.max()) >= n):
            raise ValueError(
                f"{dataset}: train {spec.item_id} outside [0, {n}) (a training run names the row)"
            )
        imps += np.bincount(item, minlength=n)
        clicks += np.bincount(item, weights=b.column("click").to_numpy(), minlength=n).astype(np.int64)
        buys += np.bincount(item, weights=b.column("purchase").to_numpy(), minlength=n).astype(np.int64)
    rows = int(imps.sum())
    if rows == 0:
        raise ValueError(f"{dataset}: the train split has no rows")
    g_ctr, g_buy = clicks.sum() / rows, buys.sum() / rows
    a = PRIOR_IMPRESSIONS
    return {
        "item_ctr": (clicks + a * g_ctr) / (imps + a),
        "item_purchase_rate": (buys + a * g_buy) / (imps + a),
        "train_rows": rows,
        "train_click_rate": float(g_ctr),
        "train_purchase_rate": float(g_buy),
        "train_items_seen": int((imps > 0).sum()),
    }


def partial_oracles(
    dataset: str | Path, *, split: str = "test", cache: str | Path | None = None
) -> dict[str, Any]:
    """AUC and GAUC of the partial oracles and per-item lookups on ``split`` (module docstring).

    Returns ``{"dataset", "split", "synthetic", "prior_impressions", "rows", "clicks", "purchases",
    "train_*", "seconds", "scores": {name: {"kind", "description", "available", "click_auc",
    "click_gauc", "purchase_auc", "purchase_gauc"}}, "truth_check"}`` (metrics None where absent or
    undefined; ``truth_check``: :func:`_truth_check`, None without ground truth).
    ``cache``: a JSON file to reuse or write (never inside ``dataset``). Memory: module docstring.
    """
    dataset = Path(dataset)
    cache = None if cache is None else Path(cache)
    if cache is not None:
        _check_cache_path(cache, dataset)
    from cstwa_dist.data.synth import world_of

    synth = dataset / "synth.json"
    key = _cache_key(
        [
            str(dataset.resolve()),
            split,
            PRIOR_IMPRESSIONS,
            [_file_key(f) for f in split_files(dataset, "train")],
            [_file_key(f) for f in split_files(dataset, split)],
            hashlib.sha1(synth.read_bytes()).hexdigest() if synth.is_file() else None,
            _generator_hash(),
        ]
    )

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        spec = DatasetSpec.load(dataset / "spec.yaml")
        try:
            world, meta = world_of(dataset)
        except FileNotFoundError as e:
            world, meta = None, {}
            logger.info("oracles: %s; computing the lookups only", e)
        lookups = _item_lookups(dataset, spec)
        cols = [spec.user_id, spec.item_id, "click", "purchase"]
        if world is not None:
            cols += ["ctx_hour", "ctx_position", "ctx_device"]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "click", "purchase", *_TRUTH)}
        for b in _batches(split_files(dataset, split), cols):
            user = b.column(spec.user_id).to_numpy()
            item = b.column(spec.item_id).to_numpy()
            parts["user"].append(user)
            parts["item"].append(item)
            parts["click"].append(b.column("click").to_numpy().astype(np.int8))
            parts["purchase"].append(b.column("purchase").to_numpy().astype(np.int8))
            if world is not None:
                for k, v in _truth_scores(world, meta, b, spec).items():
                    parts[k].append(v)
        data = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        if data["item"].size and int(data["item"].max()) >= spec.num_items:
            raise ValueError(f"{dataset}: {split} {spec.item_id} outside [0, {spec.num_items})")
        scores: dict[str, dict[str, Any]] = {}
        for name, (kind, desc) in SCORES.items():
            entry: dict[str, Any] = {"kind": kind, "description": desc, "available": True}
            if kind == "truth" and world is None:
                entry["available"] = False
                entry.update({f"{t}_{m}": None for t in _TASKS for m in ("auc", "gauc")})
            else:
                s = data[name] if kind == "truth" else lookups[name][data["item"]]
                for t in _TASKS:
                    entry[f"{t}_auc"] = _num(exact_auc(data[t], s))
                    entry[f"{t}_gauc"] = _num(group_auc(data[t], s, data["user"])["gauc"])
            scores[name] = entry
        check = _truth_check(data) if world is not None else None
        out = {
            "version": VERSION,
            "dataset": str(dataset),
            "split": split,
            "synthetic": world is not None,
            "prior_impressions": PRIOR_IMPRESSIONS,
            "rows": int(data["click"].size),
            "clicks": int(data["click"].sum()),
            "purchases": int(data["purchase"].sum()),
            **{k: v for k, v in lookups.items() if k.startswith("train_")},
            "scores": scores,
            "truth_check": check,
            "seconds": time.perf_counter() - t0,
        }
        logger.info(
            "oracles on %s/%s: %d rows, %d clicks, %d purchases in %.1fs",
            dataset,
            split,
            out["rows"],
            out["clicks"],
            out["purchases"],
            out["seconds"],
        )
        return out

    return _cached(cache, key, compute)


def _generator_hash() -> str:
    """Hash of the generator's source: the truth is recomputed by today's code, so a change there must
    invalidate cached oracles."""
    from cstwa_dist.data import synth

    return hashlib.sha1(Path(synth.__file__).read_bytes()).hexdigest()


def _truth_check(data: dict[str, np.ndarray]) -> dict[str, float]:
    """Do the recomputed probabilities explain the written labels? Mean probability against the observed
    rate, and ``z = (Σy − Σp) / sqrt(Σ p(1 − p))`` (about N(0, 1) when they do).

    Why: the truth is recomputed from ``synth.json`` by the *current* generator code; data written by an
    older generator would silently get wrong oracles. |z| > 5 is logged as a warning.
    """
    out: dict[str, float] = {}
    for task, name in (("click", "oracle_click"), ("purchase", "oracle_purchase")):
        p = data[name].astype(np.float64)
        y = data[task]
        sd = math.sqrt(float((p * (1.0 - p)).sum())) or 1.0
        z = (float(y.sum()) - float(p.sum())) / sd
        out[f"{task}_mean_truth"] = float(p.mean()) if p.size else float("nan")
        out[f"{task}_observed_rate"] = float(y.mean()) if y.size else float("nan")
        out[f"{task}_z"] = z
        if abs(z) > 5.0:
            logger.warning(
                "oracles: the true %s probabilities do not explain the labels (z = %.1f): was the data set "
                "written by another version of the generator (cstwa_dist/data/synth.py)?",
                task,
                z,
            )
    return out


def _truth_scores(world: Any, meta: dict[str, Any], batch: Any, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """The truth scores of one record batch, in float32 as the generator computes them."""
    from cstwa_dist.data.synth import _sigmoid

    t = world.truth(
        batch.column(spec.user_id).to_numpy(),
        batch.column(spec.item_id).to_numpy(),
        batch.column("ctx_hour").to_numpy(),
        batch.column("ctx_position").to_numpy(),
        batch.column("ctx_device").to_numpy(),
    )
    p_click = _sigmoid(t["click_logit"] + np.float32(meta["bias_ctr"]))
    p_buy = _sigmoid(t["buy_logit"] + np.float32(meta["bias_cvr"]))
    return {
        "oracle_click": p_click.astype(np.float32),
        "oracle_purchase": (p_click * p_buy).astype(np.float32),
        "affinity": t["affinity"].astype(np.float32),
    }


# --- graph ---------------------------------------------------------------------------------------
def graph_cluster_rate(
    graph_dir: str | Path,
    dataset: str | Path,
    *,
    block_rows: int = 65_536,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Share of the mined kNN graphs' non-self neighbours that lie in the entity's true cluster.

    Why: the Structure Migrator can only help if the graphs pretrain mined link entities of the same
    taste; on synthetic data the taste clusters are known (``world.user_cluster`` /
    ``world.item_cluster``), so this is the graph's precision against the truth, next to the chance
    rate ``Σ_c share_c²`` (``share_c``: the share of the side's entities in cluster ``c``; the rate a
    graph of uniformly random neighbours would have). Counts every stored entry ``(u, v)`` with
    ``v ≠ u`` (zero weights are not stored), unweighted (``rate``) and weighted by ``Â``'s values
    (``weighted_rate``).

    Returns ``{"graph_dir", "available", "reason"?, "user": {...}, "item": {...}}``, each side
    ``{"rate", "weighted_rate", "chance", "edges", "rows", "rows_without_neighbours"}``, or
    ``available: false`` with the reason (no ``synth.json``, a missing graph, a graph of another size):
    never an exception for those. Memory: one block of ``block_rows`` graph rows plus one cluster id
    per entity.
    """
    graph_dir, dataset = Path(graph_dir), Path(dataset)
    from cstwa_dist.data.synth import world_of
    from cstwa_dist.structure.sharded_graph import graph_rows, load_graph_rows

    base: dict[str, Any] = {"graph_dir": str(graph_dir), "available": False}
    try:
        world, _ = world_of(dataset)
    except FileNotFoundError as e:
        return {**base, "reason": str(e)}
    manifests = [graph_dir / f"{s}_graph" / "manifest.json" for s in GRAPH_SIDES]
    missing = [str(m) for m in manifests if not m.is_file()]
    if missing:
        return {**base, "reason": f"no graph: {', '.join(missing)} not found"}
    cache = None if cache is None else Path(cache)
    if cache is not None:
        _check_cache_path(cache, dataset)
    key = _cache_key(
        [
            str(graph_dir.resolve()),
            str(dataset.resolve()),
            [hashlib.sha1(m.read_bytes()).hexdigest() for m in manifests],
            hashlib.sha1((dataset / "synth.json").read_bytes()).hexdigest(),
        ]
    )

    def compute() -> dict[str, Any]:
        out: dict[str, Any] = {"graph_dir": str(graph_dir), "available": True}
        for side in GRAPH_SIDES:
            cl = np.asarray(world.user_cluster if side == "user" else world.item_cluster, dtype=np.int64)
            n = graph_rows(graph_dir, side)
            if n != cl.size:
                return {**base, "reason": f"the {side} graph has {n} rows but the data set {cl.size} {side}s"}
            share = np.bincount(cl) / cl.size
            same = total = rows_empty = 0
            w_same = w_total = 0.0
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                shard = load_graph_rows(graph_dir, side, lo, hi)
                crow = shard.crow.numpy()
                row = np.repeat(np.arange(lo, hi, dtype=np.int64), np.diff(crow))
                col = shard.col.numpy()
                val = shard.val.numpy().astype(np.float64)
                other = col != row
                hit = (cl[row] == cl[col]) & other
                same += int(hit.sum())
                total += int(other.sum())
                w_same += float(val[hit].sum())
                w_total += float(val[other].sum())
                rows_empty += int((np.bincount(row[other] - lo, minlength=hi - lo) == 0).sum())
            out[side] = {
                "rate": same / total if total else None,
                "weighted_rate": w_same / w_total if w_total > 0 else None,
                "chance": float((share**2).sum()),
                "edges": total,
                "rows": n,
                "rows_without_neighbours": rows_empty,
            }
            logger.info(
                "%s graph %s: %.1f %% of %d non-self neighbours in the same cluster (chance %.1f %%)",
                side,
                graph_dir,
                100.0 * (out[side]["rate"] or 0.0),
                total,
                100.0 * out[side]["chance"],
            )
        return out

    return _cached(cache, key, compute)
