"""``cstwa-dist bench score``: the batch-scoring rate against the exported program's forward-only bound.

Two measurements of one exported model on the same rows, so that the scoring rate always comes with the
bound that explains it:

* **forward only** (the bound): the program's forward in this process, on the input's rows already
  mapped and held in memory as ``[B, F]`` int64 tensors of ``batch_size`` rows; no Parquet, no id
  mapping, no Ray. Fastest of ``repeats`` passes over all batches, with all cores as torch threads and
  with one thread; the bound is the faster of the two.
* **Parquet only**: reading the input's columns and writing them back with the output columns, with
  pyarrow in this process: the work the pipeline adds around the forward.
* **end to end**: :func:`cstwa_dist.export.score.score` as ``cstwa-dist score`` runs it (Parquet read, id
  mapping, the actor pool, Parquet write), into a scratch folder, ``repeats`` times in one Ray runtime
  (started once, so its start-up is reported apart); the fastest run is reported. Its rates: ``whole``
  (rows / the run's seconds, actor start-up and model load included), ``steady`` (rows after each
  run's first scored batch, over the time from that batch to the last: what a long input approaches).

``steady / bound`` against the 0.8 target is the verdict; ``whole / bound`` is reported next to it so that
the start-up cost of a small input is not hidden. Memory: the bound holds the input's id columns
(``8·F`` bytes a row, at most ``max_rows`` rows) and one model copy; the scoring run adds one model per
actor.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.export.score import IdMapper, ScoreOptions, resolve_input, score

logger = logging.getLogger(__name__)

TARGET = 0.8  # end-to-end scoring rate over the forward-only bound


def forward_bound(
    model_dir: str | Path,
    source: str | Path,
    options: ScoreOptions,
    *,
    repeats: int,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Rows/s of the exported program's forward alone, on the input's rows held as tensors."""
    import torch

    from cstwa_dist.export.artifact import load_model
    from cstwa_dist.export.score import ModelInfo

    model = load_model(model_dir)
    inp = resolve_input(source, options, ModelInfo.load(model_dir))
    mapper = IdMapper(model.manifest["fields"], model.manifest["table_rows"], model.vocab, inp.ids)
    parts: list[np.ndarray] = []
    held = 0
    for path in inp.files:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=mapper.fields):
            cols = {n: rb.column(n).to_numpy(zero_copy_only=False) for n in mapper.fields}
            ids, _ = mapper.map(cols)
            parts.append(ids)
            held += len(ids)
            if max_rows is not None and held >= max_rows:
                break
        if max_rows is not None and held >= max_rows:
            break
    ids = np.concatenate(parts)[:max_rows]
    all_ids = torch.from_numpy(ids)
    batches = list(torch.split(all_ids, options.batch_size))
    threads = torch.get_num_threads()

    def best_rate(n_threads: int) -> tuple[float, list[float]]:
        torch.set_num_threads(n_threads)
        model.predict(batches[0])  # warm-up: first call builds the graph module's caches
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for b in batches:
                model.predict(b)
            times.append(time.perf_counter() - t0)
        return len(ids) / max(min(times), 1e-9), times

    rate, times = best_rate(threads)
    # one thread: what one scoring actor (1 thread each by default) can reach at best
    rate_1, _ = best_rate(1) if threads > 1 else (rate, times)
    torch.set_num_threads(threads)
    return {
        "rows": int(len(ids)),
        "batches": len(batches),
        "batch_size": options.batch_size,
        "threads": threads,
        "seconds_per_pass": times,
        "seconds_best": min(times),
        # the bound: the faster of all cores' threads and one thread (on a busy machine torch's threads
        # contend and one thread can win; these small towers gain little from a second thread anyway)
        "rows_per_s": max(rate, rate_1),
        "rows_per_s_all_threads": rate,
        "rows_per_s_1_thread": rate_1,
    }


def io_only(
    source: str | Path, options: ScoreOptions, model_dir: str | Path, *, repeats: int
) -> dict[str, Any]:
    """Rows/s of the Parquet work alone in this process: read the scored columns of every input file and
    write them back with one float32 column per model output (what the pipeline does around the forward).
    """
    from cstwa_dist.export.score import ModelInfo

    info = ModelInfo.load(model_dir)
    inp = resolve_input(source, options, info)
    columns = list(info.fields) + inp.labels
    times = []
    with tempfile.TemporaryDirectory(prefix="cstwa-bench-io-") as tmp:
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for i, path in enumerate(inp.files):
                table = pq.read_table(path, columns=columns)
                zeros = np.zeros(table.num_rows, dtype=np.float32)
                for name in info.outputs:
                    table = table.append_column(name, pa.array(zeros))
                pq.write_table(table, Path(tmp) / f"part-{i:05d}.parquet")
            times.append(time.perf_counter() - t0)
    return {"rows": inp.rows, "seconds_per_pass": times, "rows_per_s": inp.rows / max(min(times), 1e-9)}


def end_to_end(
    model_dir: str | Path, source: str | Path, options: ScoreOptions, *, repeats: int
) -> dict[str, Any]:
    """``score`` itself, ``repeats`` times into scratch folders in one Ray runtime; the fastest run."""
    from cstwa_dist.runtime import RayRuntime

    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with RayRuntime():
        runtime_start_s = time.perf_counter() - t0
        for _ in range(max(1, repeats)):
            tmp = Path(tempfile.mkdtemp(prefix="cstwa-bench-score-"))
            try:
                runs.append(score(model_dir, source, tmp / "out", options))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    best = min(runs, key=lambda r: r["seconds"])
    return {
        "rows": best["rows_in"],
        "runtime_start_s": runtime_start_s,
        "seconds": best["seconds"],
        "rows_per_s_whole": best["rows_per_s"],
        "rows_per_s_steady": best["rows_per_s_steady"],
        "seconds_per_run": [r["seconds"] for r in runs],
        "rows_per_s_steady_per_run": [r["rows_per_s_steady"] for r in runs],
        "actors": best["actors"],
        "actor_cpus": best["actor_cpus"],
        "actor_start_s": best["actor_start_s"],
        "threads_per_actor": best["threads_per_actor"],
        "batch_size": best["batch_size"],
        "ids": best["ids"],
        "files_in": best["files_in"],
        "unseen_total": best["unseen_total"],
        "model": best["model"],
    }


def run_bench(
    model_dir: str | Path,
    source: str | Path,
    options: ScoreOptions,
    *,
    repeats: int = 3,
    e2e_repeats: int = 2,
) -> dict[str, Any]:
    """The bound, then the scoring runs, then the verdict (module docstring)."""
    load_before = os.getloadavg()  # the machine may be shared: every figure comes with its load
    bound = forward_bound(model_dir, source, options, repeats=repeats)
    logger.info(
        "forward only: %.0f rows/s (%d threads, batches of %d)",
        bound["rows_per_s"],
        bound["threads"],
        options.batch_size,
    )
    io = io_only(source, options, model_dir, repeats=repeats)
    logger.info("Parquet read + write only: %.0f rows/s (1 thread)", io["rows_per_s"])
    e2e = end_to_end(model_dir, source, options, repeats=e2e_repeats)
    steady = e2e["rows_per_s_steady"] or e2e["rows_per_s_whole"]
    pool = min(e2e["actors"], os.cpu_count() or 1) * bound["rows_per_s_1_thread"]
    report = {
        "model_dir": str(model_dir),
        "model": e2e["model"],
        "input": str(source),
        "rows": e2e["rows"],
        "forward_only": bound,
        "parquet_io_only": io,
        "end_to_end": e2e,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    report["verdict"] = {
        "target": TARGET,
        "steady_over_bound": steady / max(bound["rows_per_s"], 1e-9),
        "whole_over_bound": e2e["rows_per_s_whole"] / max(bound["rows_per_s"], 1e-9),
        "meets_target": steady >= TARGET * bound["rows_per_s"],
        # the pool's own bound: its actors, one thread each, each at the 1-thread forward rate
        "steady_over_pool_bound": steady / max(pool, 1e-9),
        # forward and Parquet work of one row, done one after the other on one core
        "steady_over_serial_forward_plus_io": steady
        * (1 / bound["rows_per_s_1_thread"] + 1 / io["rows_per_s"]),
    }
    return report
