"""``cstwa-dist bench train``: where a training step's time goes, written as JSON.

Four measurements of one registered model on one data set, so that a throughput figure always comes
with the bounds that explain it:

* **end to end**: the trainer as ``train`` runs it (input stream, pipeline, collectives), whole
  epochs without evaluation; ``samples_per_s`` (global) and ``samples_per_s_steady`` (without each
  epoch's first step, which pays for starting the input stream).
* **compute only**: the same model's forward, backward and optimizers on batches already in memory,
  in one process (``compute_only``; measured by the parent process before it starts the ranks). The
  end-to-end rate divided by it is the share of the step the input and the collectives cost.
* **input only**: each rank's reader alone, all ranks at once (``input_only``; steady rate without
  the first batch, which pays the stream's one-time start-up, reported apart), against the steady
  rate training consumes rows at (``input_over_consumption``: under 1 the input is the bottleneck).
* **stages**: the trainer's pipeline stages (data wait, input distribution, forward, backward,
  optimizer) from ``torch.profiler`` over ``profile_steps`` steps, per step and rank; plus the
  structure step and one evaluation pass timed directly.

Per-rank memory: the model and optimizer states as training, plus ``compute_batches`` batches held
in memory by the compute-only phase (``batch_size`` rows each) and the profiler's event list.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from cstwa_dist.config import RunConfig
from cstwa_dist.data.reader import measure_input_rate
from cstwa_dist.distributed.collectives import broadcast_object, gather_objects
from cstwa_dist.distributed.env import init_distributed

logger = logging.getLogger(__name__)

# TorchRec's TrainPipelineSparseDist labels its stages with record_function("## <stage> <i> ##")
_STAGE = re.compile(r"^## ([a-z_]+)(?: \d+)? ##$")
STAGES = {
    "next_batch": "data_wait",
    "copy_batch_to_gpu": "host_to_device",  # includes next_batch; reported minus it
    "start_sparse_data_dist": "input_distribution",
    "wait_sparse_data_dist": "input_distribution",
    "forward": "forward",
    "backward": "backward",
    "optimizer": "optimizer",
    "zero_grad": "optimizer",
}


def _stage_seconds(prof: torch.profiler.profile, steps: int) -> dict[str, float]:
    """Seconds per step in each named pipeline stage (CPU time of the labelled ranges)."""
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        m = _STAGE.match(evt.key)
        if m and m.group(1) in STAGES:
            totals[m.group(1)] += evt.cpu_time_total / 1e6
    out: dict[str, float] = defaultdict(float)
    for label, seconds in totals.items():
        out[STAGES[label]] += seconds
    out["host_to_device"] = max(out.get("host_to_device", 0.0) - out.get("data_wait", 0.0), 0.0)
    return {k: v / max(steps, 1) for k, v in sorted(out.items())}


def compute_only(cfg: RunConfig, model: str, *, batches: int, steps: int) -> dict[str, Any]:
    """Samples/s of forward + backward + optimizers on ``batches`` in-memory batches, cycled.

    Runs in the calling process's group (the parent's 1-process group in ``bench train``).
    """
    from cstwa_dist.train.trainer import Trainer

    trainer = Trainer(cfg, model, run_dir=None, epochs=1)
    held = list(itertools.islice(trainer.train_reader.epoch(0), batches))
    rows = sum(int(b.mask.sum()) for b in held)
    warm = min(3, steps)
    it = itertools.cycle(held)
    for _ in range(warm):  # first steps build caches and fused kernels' state
        trainer.train_step(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(it)
    seconds = time.perf_counter() - t0
    if trainer.pipeline is not None:
        trainer.pipeline.detach()
    trainer.close()
    per_batch = rows / max(len(held), 1)
    return {
        "world_size": 1,
        "batches_in_memory": len(held),
        "steps": steps,
        "seconds": seconds,
        "samples_per_s": steps * per_batch / max(seconds, 1e-9),
        "threads": torch.get_num_threads(),
    }


def ranks_phase(cfg: RunConfig, model: str, *, epochs: int, profile_steps: int) -> dict[str, Any]:
    """Input-only, end-to-end, stages, structure and evaluation on every rank; rank 0's dict returned."""
    from cstwa_dist.train.trainer import Trainer

    env = init_distributed()
    trainer = Trainer(cfg, model, run_dir=Path(cfg.train.run_dir) / f"bench-{model}", epochs=epochs)

    # input only: every rank's reader at once, one epoch
    inp = measure_input_rate(trainer.train_reader, epochs=1)
    per_rank_input = gather_objects(inp["rows_per_s_steady"])  # without the stream's start-up
    per_rank_input_whole = gather_objects(inp["rows_per_s"])

    # end to end: whole epochs as `train` runs them (no evaluation)
    t0 = time.perf_counter()
    result = trainer.fit(evaluate=False)
    fit_seconds = time.perf_counter() - t0
    m = result.metrics

    # stages: a profiled slice of one more epoch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    n = min(profile_steps, trainer.steps)
    batches = iter(trainer.train_reader.epoch(epochs))
    with profile(activities=activities) as prof:
        done = 0
        for _ in range(n):
            try:
                trainer.train_step(batches)
            except StopIteration:
                break
            done += 1
    stages = _stage_seconds(prof, done)
    for _ in batches:  # the rest of the epoch, so every rank leaves the loop after the same steps
        pass
    if trainer.pipeline is not None:  # the pipeline still holds the profiled slice's last batches
        try:
            while True:
                trainer.pipeline.progress(iter(()))
        except StopIteration:
            pass

    t0 = time.perf_counter()
    trainer.epoch_boundary(1)  # the structure step (β update), when the model has one
    structure_s = time.perf_counter() - t0 if trainer.migrator is not None else None
    t0 = time.perf_counter()
    trainer.evaluate("val")
    eval_s = time.perf_counter() - t0

    trainer.close()
    consumption = m["samples_per_s_steady"] / env.world_size  # rows/s one rank consumes
    report = {
        "world_size": env.world_size,
        "threads_per_rank": torch.get_num_threads(),
        "device": str(env.device),
        "batch_size_per_rank": cfg.data.batch_size,
        "train_rows_per_epoch": m["train_rows_per_epoch"],
        "epochs": epochs,
        "end_to_end": {
            "samples_per_s": m["samples_per_s"],
            "samples_per_s_steady": m["samples_per_s_steady"],
            "train_seconds": m["train_seconds"],
            "wall_seconds": fit_seconds,
            "pipeline": cfg.train.pipeline,
        },
        "input_only": {
            "rows_per_s_per_rank": per_rank_input,
            "rows_per_s_per_rank_with_start_up": per_rank_input_whole,
            "first_batch_s_rank0": inp["per_epoch"][0]["first_batch_s"],
            "slowest_rank_rows_per_s": min(per_rank_input),
        },
        "input_over_consumption": min(per_rank_input) / max(consumption, 1e-9),
        "stages_s_per_step": stages,
        "profiled_steps": done,
        "structure_step_s": structure_s,
        "evaluation_pass_s": eval_s,
    }
    broadcast_object(None)
    return report


def verdict(report: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Targets of the throughput work, and (against a 1-process report) the stage to blame."""
    e2e = report["ranks"]["end_to_end"]["samples_per_s_steady"]
    bound = report["compute_only"]["samples_per_s"]
    out: dict[str, Any] = {
        "end_to_end_over_compute_bound": e2e / max(bound, 1e-9),
        "meets_0_5_of_bound": e2e >= 0.5 * bound,
        "meets_0_8_of_bound": e2e >= 0.8 * bound,
        "input_at_least_3x_consumption": report["ranks"]["input_over_consumption"] >= 3.0,
    }
    if baseline is not None and report["ranks"]["world_size"] > 1:
        base_rate = baseline["ranks"]["end_to_end"]["samples_per_s_steady"]
        out["ranks_over_one_process"] = e2e / max(base_rate, 1e-9)
        out["at_least_as_fast_as_one_process"] = e2e >= base_rate
        if e2e < base_rate:
            mine, theirs = report["ranks"]["stages_s_per_step"], baseline["ranks"]["stages_s_per_step"]
            # per real row: a W-rank step moves W× the rows of a 1-process step of the same batch size
            w = report["ranks"]["world_size"]
            growth = {k: mine.get(k, 0.0) / w - theirs.get(k, 0.0) for k in set(mine) | set(theirs)}
            worst = max(growth, key=lambda k: growth[k])
            out["stage_to_blame"] = worst
            out["stage_growth_s_per_row_batch"] = dict(sorted(growth.items()))
    return out
