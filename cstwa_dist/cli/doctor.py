"""``cstwa-dist doctor``: one prepared check of a GPU node, written as one JSON file.

Why: the GPU path (FBGEMM's fused kernels on HBM, NCCL collectives, faiss-gpu, the training commands
on CUDA ranks) is the part of this project that CPU tests cannot reach. A node that is lent for a few
minutes must answer in one command whether each piece works and how fast it is, and a failure in one
piece must not hide the answers of the others. So the checks below run one after another, **each in
its own processes with its own time budget** (a hang or a CUDA crash ends that check, not the run),
and each records ``status`` (``ok``; ``failed`` with the reason; ``skipped`` when ``--checks`` left it
out), its seconds and its figures. The JSON is rewritten atomically after every check
(``cstwa_dist/fs.py``), so a job killed half-way still leaves the checks that finished; the exit code
is 1 when any check failed.

Checks (docs/gpu-check.md says what each proves and how to read its figures):

1. ``environment``: package and module versions, CUDA devices (name, memory), NCCL's version.
2. ``fbgemm_fused``: a sharded ``EmbeddingBagCollection`` (one table-wise table, one row-wise FUSED
   table, as the structure tables are sharded) takes a few steps with the fused table optimizer the
   project resolves (``distributed/sharding.py``); every touched row must equal the optimizer's
   update computed here by hand from the analytic gradient, every untouched row must stay as it was.
   On a GPU, fused Adam is checked as well.
3. ``all_to_all``: ``all_to_all_single`` across every visible GPU (spawned ranks, NCCL; 2 gloo ranks in
   the dry run), every received element checked, then the bandwidth timed.
4. ``faiss_ivf``: the project's IVF kNN (``structure/ivf.py``, public functions only) on clustered
   vectors, 1M on the GPU, with recall@k against exact search.
5. ``cstwa_training``: the project's own commands, ``synth`` → ``pretrain`` (CTR MLP and the kNN
   graphs) → ``train --model cstwa`` with the Structure Migrator, a few hundred steps per rank.
6. ``bench_train``: ``bench train`` on the same data and graphs, its JSON folded in.

``--dry-run`` runs every check at a tiny size on CPU (gloo, faiss-cpu), hiding any GPU: the whole
rehearsal needs about two CPU-minutes, so it fits in ``make test``, which runs it
(tests/e2e/test_gpu_check.py). Without ``--dry-run`` a machine without CUDA is refused: a GPU check
that quietly ran on CPU would report figures of the wrong machine.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cstwa_dist.cli.common import command_line, emit_json

logger = logging.getLogger(__name__)

#: the checks, in the order they run
CHECKS: tuple[str, ...] = (
    "environment",
    "fbgemm_fused",
    "all_to_all",
    "faiss_ivf",
    "cstwa_training",
    "bench_train",
)

#: seconds each check may take on a GPU node: 570 s together, so the run ends inside 10 minutes. Each
#: is a ceiling against hangs with room for a cold start (a fresh process imports torch, TorchRec and
#: FBGEMM's CUDA kernels and creates a CUDA context before it measures anything).
GPU_BUDGETS_S: dict[str, float] = {
    "environment": 45.0,
    "fbgemm_fused": 90.0,
    "all_to_all": 45.0,
    "faiss_ivf": 75.0,
    "cstwa_training": 210.0,
    "bench_train": 105.0,
}
#: the dry run's budgets: ceilings for a loaded 2-core machine (the whole run needs ~120 CPU-seconds)
DRY_BUDGETS_S: dict[str, float] = {
    "environment": 60.0,
    "fbgemm_fused": 120.0,
    "all_to_all": 90.0,
    "faiss_ivf": 90.0,
    "cstwa_training": 300.0,
    "bench_train": 240.0,
}

#: recall@k the IVF check must reach (the issue target the defaults meet at 1M, docs/structure-scaling.md)
MIN_RECALL = 0.95
#: a fused update may differ from the hand-computed one by this share of the largest update (float32
#: sums in another order); a wrong learning rate, epsilon, step count or formula is far outside it
UPDATE_RTOL = 1e-4
#: fused Adam's learning rate for its GPU check (``optim.embedding_adam_lr`` has no default)
ADAM_LR = 1e-3
#: steps per rank the GPU training check aims at ("a few hundred")
GPU_TARGET_STEPS = 300
#: lines of a failed command's log kept in the JSON
LOG_TAIL_LINES = 25


class CheckFailed(Exception):
    """A check ran but what it verified was wrong (or a command failed); carries what it measured."""

    def __init__(self, reason: str, figures: dict[str, Any] | None = None, detail: str = "") -> None:
        super().__init__(reason)
        self.figures = figures or {}
        self.detail = detail


@dataclass(frozen=True)
class Plan:
    """What one run checks and at which size: GPU node or dry run (sizes recorded in the JSON)."""

    dry_run: bool
    gpus: int  # CUDA devices visible (0 in the dry run)
    cpus: int
    budgets: dict[str, float]

    @property
    def mode(self) -> str:
        return "dry-run" if self.dry_run else "gpu"

    @property
    def ranks(self) -> int:
        """Ranks of the collective and the training commands: every GPU; 2 gloo ranks / 1 process dry."""
        return max(1, self.gpus)

    def sizes(self) -> dict[str, dict[str, Any]]:
        if self.dry_run:
            return {
                "fbgemm_fused": {
                    "rows": 1000,
                    "dim": 16,
                    "bags": 64,
                    "ids_per_bag": 4,
                    "steps": 3,
                    "timed_steps": 3,
                },
                "all_to_all": {"world": 2, "bytes_per_rank": 1 << 20, "warmup": 1, "iters": 5},
                "faiss_ivf": {"n": 10_000, "dim": 45, "k": 8, "clusters": 64, "recall_queries": 500},
                "cstwa_training": {"preset": "demo", "scale": 0.02, "ranks": 1, "epochs": 1},
                "bench_train": {"ranks": 1, "compute_batches": 2, "compute_steps": 3, "profile_steps": 3},
            }
        return {
            "fbgemm_fused": {
                "rows": 1_000_000,
                "dim": 128,
                "bags": 16384,
                "ids_per_bag": 8,
                "steps": 3,
                "timed_steps": 20,
            },
            "all_to_all": {"world": self.gpus, "bytes_per_rank": 256 << 20, "warmup": 3, "iters": 20},
            "faiss_ivf": {"n": 1_000_000, "dim": 45, "k": 8, "clusters": 256, "recall_queries": 1000},
            "cstwa_training": {
                "preset": "demo",
                "scale": float(min(self.ranks, 4)),
                "ranks": self.ranks,
                "target_steps": GPU_TARGET_STEPS,
            },
            "bench_train": {
                "ranks": self.ranks,
                "compute_batches": 20,
                "compute_steps": 60,
                "profile_steps": 20,
            },
        }


# --- 1. environment -----------------------------------------------------------------------------


def _environment_worker(rank: int, world: int) -> dict[str, Any]:
    """Versions, devices and NCCL, read in a fresh process (one rank; memory: the imports only)."""
    import importlib
    import importlib.metadata as md
    import platform

    import torch

    figures: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    packages = {}
    for dist_name in (
        "torch",
        "torchrec",
        "fbgemm-gpu",
        "fbgemm-gpu-cpu",
        "faiss-gpu",
        "faiss-gpu-cu12",
        "faiss-cpu",
        "ray",
        "numpy",
        "pyarrow",
    ):
        try:
            packages[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            continue
    figures["packages"] = packages
    problems: list[str] = []
    modules: dict[str, str] = {}
    imported: dict[str, Any] = {}
    for mod in ("torchrec", "fbgemm_gpu", "faiss"):  # Ray's import is the training check's
        try:
            imported[mod] = importlib.import_module(mod)
            modules[mod] = str(getattr(imported[mod], "__version__", "imported"))
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            modules[mod] = f"import failed: {type(e).__name__}: {e}"
            problems.append(f"import {mod} failed: {e}")
    figures["modules"] = modules
    faiss = imported.get("faiss")
    figures["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    cuda: dict[str, Any] = {"torch_built_with": torch.version.cuda, "available": torch.cuda.is_available()}
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 2),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
        try:
            v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            cuda["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001 - a torch without NCCL is the finding
            cuda["nccl"] = None
            problems.append(f"NCCL version unreadable: {e}")
    cuda["devices"] = devices
    figures["cuda"] = cuda
    figures["cpu_count"] = os.cpu_count()
    figures["problems"] = problems
    return figures


def _check_environment(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    from cstwa_dist.distributed.spawn import spawn_ranks

    (figures,) = spawn_ranks(_environment_worker, 1, timeout_s=budget_s, backend="gloo")
    if not plan.dry_run:
        if not figures["cuda"]["devices"]:
            figures["problems"].append("torch sees no CUDA device in a fresh process")
        if not figures["cuda"].get("nccl"):
            figures["problems"].append("no NCCL in this torch build")
    return figures


# --- 2. FBGEMM fused kernels ----------------------------------------------------------------------


@dataclass(frozen=True)
class _TableRole:
    """A structure-table role for ``shard_model`` (row-wise, FUSED kernel, trained)."""

    table: str
    trained: bool = True


def _fused_probe_module(rows: int, dim: int) -> Any:
    """Two tables of ``rows × dim`` (``probe_field`` table-wise, ``probe_rows`` row-wise) on ``meta`` and
    one dense parameter (``shard_model`` builds a dense Adam, which needs one)."""
    import torch
    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    class FusedProbe(nn.Module):
        """loss = Σ pooled · c + dense(1): the table gradients are exactly ``c`` summed per id."""

        def __init__(self) -> None:
            super().__init__()
            meta = torch.device("meta")
            tables = [
                EmbeddingBagConfig(
                    name=name,
                    embedding_dim=dim,
                    num_embeddings=rows,
                    feature_names=[feature],
                    pooling=PoolingType.SUM,
                )
                for name, feature in (("probe_field", "f"), ("probe_rows", "g"))
            ]
            self.ebc = EmbeddingBagCollection(tables=tables, device=meta)
            self.dense = nn.Linear(1, 1, device=meta)

        def forward(self, kjt: Any, c: torch.Tensor) -> torch.Tensor:
            pooled = self.ebc(kjt).values()
            one = torch.ones(1, 1, device=c.device)
            return (pooled * c).sum() + self.dense(one).sum()

    return FusedProbe()


def _expected_update(w: Any, grad: Any, name: str, settings: dict[str, Any], steps: int) -> Any:
    """Rows ``w`` after ``steps`` steps of the same gradient ``grad`` (float64), by the optimizer's
    formula; every row given was looked up in every step (FBGEMM updates only the rows a batch looked
    up, so the others are checked apart: unchanged).

    Exact row-wise Adagrad: ``G_r += mean(g_r²)``, ``w_r -= lr·g_r / (√G_r + eps)``. Adam
    (bias-corrected): ``m = β1·m + (1−β1)·g``, ``v = β2·v + (1−β2)·g²``, ``w -= lr·m̂ / (√v̂ + eps)``.
    """
    import torch

    lr, eps = float(settings["lr"]), float(settings["eps"])
    w = w.double().clone()
    g = grad.double()
    if name == "rowwise_adagrad":
        state = torch.zeros(w.shape[0], 1, dtype=torch.float64, device=w.device)
        for _ in range(steps):
            state += (g * g).mean(dim=1, keepdim=True)
            w -= lr * g / (state.sqrt() + eps)
    elif name == "adam":
        b1, b2 = (float(b) for b in settings.get("betas") or (0.9, 0.999))
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        for t in range(1, steps + 1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    else:
        raise ValueError(f"no reference update for embedding optimizer {name!r}")
    return w


def _optim_config(choice: str) -> Any:
    """The run config's optimizer section for ``choice`` (``auto``: what a run resolves by default)."""
    from cstwa_dist.registry import default_config, with_overrides

    if choice == "auto":
        return default_config().optim
    try:
        return with_overrides(
            default_config(), [f"optim.embedding={choice}", f"optim.embedding_adam_lr={ADAM_LR}"]
        ).optim
    except ValueError:  # a config without a learning rate of fused Adam's own
        return with_overrides(default_config(), [f"optim.embedding={choice}"]).optim


def _fused_worker(rank: int, world: int, sizes: dict[str, Any], choice: str) -> dict[str, Any]:
    """One sharded EBC under the fused ``choice`` optimizer: ``steps`` steps checked row by row against
    the formula, then ``timed_steps`` more timed.

    Per-rank memory (one rank): two tables of ``rows × dim`` float32 with their optimizer state (Adam:
    2 × weights; row-wise Adagrad: one float per row) and, per table, a copy from before the steps and
    one from after (2 × ``rows × dim`` float32 on the device: 1 GiB at 1M × 128); the formula runs on
    the looked-up rows only (at most ``bags × ids_per_bag`` rows, float64, on the host).
    """
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.distributed.sharding import shard_model
    from cstwa_dist.distributed.tables import read_full_table

    env = init_distributed()
    optim = _optim_config(choice)
    rows, dim, bags, per_bag = sizes["rows"], sizes["dim"], sizes["bags"], sizes["ids_per_bag"]
    sharded = shard_model(_fused_probe_module(rows, dim), env, optim, [_TableRole("probe_rows")], seed=0)
    name = sharded.embedding_optimizer
    settings = dict(getattr(sharded, "embedding_optimizer_settings", {}) or {})
    if name == "adam":
        settings.setdefault("lr", getattr(optim, "embedding_adam_lr", None) or optim.lr)
    settings.setdefault("lr", optim.embedding_lr)
    settings.setdefault("eps", getattr(optim, "embedding_eps", 1e-8))
    ebc = sharded.dmp.module.ebc
    plan = {
        table: {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": ps.ranks}
        for per_module in sharded.dmp.plan.plan.values()
        for table, ps in per_module.items()  # type: ignore[union-attr]
    }

    gen = torch.Generator().manual_seed(7)
    # ids from the first half of the rows only: the second half must not move
    ids = {key: torch.randint(0, rows // 2, (bags * per_bag,), generator=gen) for key in ("f", "g")}
    c = torch.randn(bags, 2 * dim, generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f", "g"],
        values=torch.cat([ids["f"], ids["g"]]),
        lengths=torch.full((2 * bags,), per_bag, dtype=torch.int64),
    ).to(env.device)
    c_dev = c.to(env.device)
    tables = {"probe_field": ("f", slice(0, dim)), "probe_rows": ("g", slice(dim, 2 * dim))}
    before = {t: read_full_table(ebc, t, env.device) for t in tables}

    sharded.dmp.train()
    steps = int(sizes["steps"])
    for _ in range(steps):
        sharded.optimizer.zero_grad()
        loss = sharded.dmp(kjt, c_dev)
        loss.backward()  # the fused table optimizer runs inside backward
        sharded.optimizer.step()
    if env.device.type == "cuda":
        torch.cuda.synchronize()

    per_table: dict[str, Any] = {}
    problems: list[str] = []
    bag_of = torch.arange(bags).repeat_interleave(per_bag)
    for table, (key, cols) in tables.items():
        # d loss / d w_r = Σ of c over the bags' slots holding id r (sum pooling)
        looked_up, slot_row = torch.unique(ids[key], return_inverse=True)
        grad = torch.zeros(looked_up.numel(), dim, dtype=torch.float64)
        grad.index_add_(0, slot_row, c[bag_of, cols].double())
        after = read_full_table(ebc, table, env.device)
        idx = looked_up.to(env.device)
        expected = _expected_update(before[table][idx].cpu(), grad, name, settings, steps)
        moved = (after - before[table]).abs()
        moved[idx] = 0.0
        untouched_change = float(moved.max())
        max_update = float((expected - before[table][idx].cpu().double()).abs().max())
        err = float((after[idx].cpu().double() - expected).abs().max())
        del after, moved
        per_table[table] = {
            "rows_touched": int(looked_up.numel()),
            "rows_untouched": rows - int(looked_up.numel()),
            "max_update": max_update,
            "max_abs_error": err,
            "untouched_max_change": untouched_change,
            **plan.get(table, {}),
        }
        if not max_update > 0:
            problems.append(f"{table}: the reference update is zero; nothing was checked")
        elif err > UPDATE_RTOL * max_update:
            problems.append(
                f"{table}: fused update differs from the {name} formula by {err:.3g} "
                f"(largest update {max_update:.3g}, allowed {UPDATE_RTOL:g} of it)"
            )
        if untouched_change != 0.0:
            problems.append(f"{table}: rows no batch looked up changed by up to {untouched_change:.3g}")
    del before

    timed = int(sizes["timed_steps"])
    t0 = time.perf_counter()
    for _ in range(timed):
        sharded.optimizer.zero_grad()
        sharded.dmp(kjt, c_dev).backward()
        sharded.optimizer.step()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "optimizer": name,
        "settings": settings,
        "device": str(env.device),
        "steps_checked": steps,
        "tables": per_table,
        "timed_steps": timed,
        "ms_per_step": 1000.0 * seconds / max(timed, 1),
        "lookups_per_s": 2 * bags * per_bag * timed / max(seconds, 1e-9),
        "problems": problems,
    }


def _check_fbgemm(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    from cstwa_dist.distributed.spawn import RankFailure, spawn_ranks

    sizes = plan.sizes()["fbgemm_fused"]
    deadline = time.monotonic() + budget_s
    choices = ["auto"] if plan.dry_run else ["auto", "adam"]  # FBGEMM has fused Adam on GPUs only
    runs: dict[str, Any] = {}
    problems: list[str] = []
    for choice in choices:  # each in its own process: one failing keeps the other's figures
        left = deadline - time.monotonic()
        if left <= 0:
            problems.append(f"optim.embedding={choice}: no budget left to run it")
            continue
        try:
            # one process, on GPU 0 (NCCL) or CPU (gloo): what a 1-process training run gets
            (figures,) = spawn_ranks(
                _fused_worker, 1, sizes, choice, threads=min(plan.cpus, 4), timeout_s=left
            )
        except RankFailure as e:
            runs[choice] = {"error": _last_line(str(e)), "detail": str(e)[-4000:]}
            problems.append(f"optim.embedding={choice}: {_last_line(str(e))}")
            continue
        problems += [f"{figures['optimizer']}: {p}" for p in figures.pop("problems")]
        runs[figures["optimizer"]] = figures
    return {"sizes": sizes, "runs": runs, "problems": problems}


# --- 3. all-to-all --------------------------------------------------------------------------------


def _all_to_all_worker(rank: int, world: int, sizes: dict[str, Any]) -> dict[str, Any]:
    """``all_to_all_single`` of ``bytes_per_rank`` (int32, one equal chunk per peer): every received
    element checked against what its sender must have put there, then ``iters`` timed exchanges.

    Per-rank memory: the send and the receive buffer, ``bytes_per_rank`` each, plus the expected
    chunk for the comparison (``bytes_per_rank / world``), on the rank's device.
    """
    import torch
    import torch.distributed as dist

    from cstwa_dist.distributed.env import init_distributed

    env = init_distributed()
    dev = env.device
    n = max(1, int(sizes["bytes_per_rank"]) // 4 // world)  # int32 elements per chunk
    ramp = torch.arange(n, dtype=torch.int32, device=dev)
    # chunk j of rank r carries (r·W + j)·n + i: a wrong sender, chunk or order shows as a mismatch
    send = torch.cat([(rank * world + j) * n + ramp for j in range(world)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    wrong = 0
    for j in range(world):
        expected = (j * world + rank) * n + ramp
        wrong += int((recv[j * n : (j + 1) * n] != expected).sum())
    for _ in range(int(sizes["warmup"])):
        dist.all_to_all_single(recv, send)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    iters = int(sizes["iters"])
    for _ in range(iters):
        dist.all_to_all_single(recv, send)
    sync()
    seconds = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=dev)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank decides a collective's time
    per_iter = float(seconds.item())
    nbytes = send.numel() * 4
    algbw = nbytes / per_iter / 1e9
    return {
        "world": world,
        "backend": env.backend,
        "device": str(dev),
        "bytes_per_rank": nbytes,
        "iters": iters,
        "seconds_per_iter": per_iter,
        "algbw_gb_per_s": algbw,
        # the share of each rank's bytes that crosses a link (nccl-tests' bus bandwidth for all-to-all)
        "busbw_gb_per_s": algbw * (world - 1) / world,
        "wrong_elements": wrong,
    }


def _check_all_to_all(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    from cstwa_dist.distributed.spawn import spawn_ranks

    sizes = plan.sizes()["all_to_all"]
    backend = "gloo" if plan.dry_run else "nccl"
    results = spawn_ranks(
        _all_to_all_worker, sizes["world"], sizes, threads=1, timeout_s=budget_s, backend=backend
    )
    figures = dict(results[0])
    figures["wrong_elements"] = sum(r["wrong_elements"] for r in results)
    problems = []
    if figures["wrong_elements"]:
        problems.append(f"{figures['wrong_elements']} received elements differ from what was sent")
    if figures["world"] == 1:
        figures["note"] = "one GPU: the exchange is a device-local copy; no link between GPUs was measured"
    figures["problems"] = problems
    return figures


# --- 4. Faiss IVF -----------------------------------------------------------------------------------


def _faiss_worker(rank: int, world: int, sizes: dict[str, Any], need_gpu: bool) -> dict[str, Any]:
    """The project's IVF kNN of every row against all rows (``distributed_knn`` in one process), with
    recall@k against exact search on sampled queries.

    Per-rank memory (one rank): the ``n × dim`` float32 rows, their normalised copy, the IVF index
    (``n·dim`` floats plus ids) and the ``n × k`` result lists (~0.6 GiB at 1M × 45, k = 8); on a GPU
    the index and the flat recall search live in its memory.
    """
    import faiss

    from cstwa_dist.bench.common import clustered_rows
    from cstwa_dist.structure.ivf import IVFParams, distributed_knn

    gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    base = {"faiss_version": getattr(faiss, "__version__", "?"), "faiss_gpus": gpus, **sizes}
    if need_gpu and gpus == 0:
        return {
            **base,
            "problems": [
                "faiss sees no GPU: faiss-cpu is installed where the gpu profile installs faiss-gpu"
            ],
        }
    n, dim, k = int(sizes["n"]), int(sizes["dim"]), int(sizes["k"])
    t0 = time.perf_counter()
    x = clustered_rows(0, n, dim, clusters=int(sizes["clusters"]), spread=1.0, seed=0)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = distributed_knn(x, [(0, n)], k, IVFParams(seed=0), recall_queries=int(sizes["recall_queries"]))
    wall = time.perf_counter() - t0
    timings = dict(res.timings)
    build = sum(timings.get(key, 0.0) for key in ("train_s", "broadcast_s", "add_s"))
    problems = []
    if res.recall is None or res.recall < MIN_RECALL:
        problems.append(f"recall@{res.k} {res.recall} is below {MIN_RECALL}")
    if res.indices.shape != (n, res.k):
        problems.append(f"kNN lists have shape {res.indices.shape}, expected {(n, res.k)}")
    return {
        **base,
        "nlist": res.nlist,
        "nprobe": res.nprobe,
        "generate_s": generate_s,
        "build_s": build,
        "search_s": timings.get("search_s"),
        "recall_s": timings.get("recall_s"),
        "knn_wall_s": wall,
        "recall_at_k": res.recall,
        "recall_queries": res.recall_queries,
        "min_recall": MIN_RECALL,
        "timings": timings,
        "problems": problems,
    }


def _check_faiss(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    from cstwa_dist.distributed.spawn import spawn_ranks

    sizes = plan.sizes()["faiss_ivf"]
    (figures,) = spawn_ranks(
        _faiss_worker, 1, sizes, not plan.dry_run, threads=plan.cpus, timeout_s=budget_s, backend="gloo"
    )
    return figures


# --- 5. and 6. the project's own commands ---------------------------------------------------------


@dataclass
class _Context:
    """What the command checks share: the work folder, the environment of the commands, the data set,
    and one Ray runtime for all of them, started when the first command that reads data needs it
    (each command would otherwise start a private one, seconds each)."""

    work: Path
    env: dict[str, str]
    config: Path
    cpus: int = 1
    dataset: Path | None = None  # a complete data set made by the training check
    graphs: Path | None = None  # its complete graphs
    ray: Any = None  # the shared RayRuntime, once started

    def ensure_ray(self) -> None:
        if self.ray is not None:
            return
        from cstwa_dist.runtime import RayRuntime

        runtime = RayRuntime(num_cpus=self.cpus)
        try:
            runtime.__enter__()
        except Exception as e:  # noqa: BLE001 - without it every command starts a private runtime
            logger.warning("doctor: no shared Ray runtime (%s); each command starts its own", e)
            self.ray = False
            return
        self.ray = runtime
        address = RayRuntime.current_address()
        if address:  # the commands attach with its address and its token (RayRuntime's variables)
            self.env["RAY_ADDRESS"] = address
            self.env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")})

    def close(self) -> None:
        if self.ray:
            self.ray.__exit__(None, None, None)
        self.ray = None


def _run_logged(
    name: str,
    args: list[str],
    ranks: int,
    ctx: _Context,
    deadline: float,
    figures: dict[str, Any],
    *,
    ray: bool = True,
) -> float:
    """Runs ``python -m cstwa_dist.cli ARGS`` (under ``torch.distributed.run`` for ``ranks > 1``; attached
    to the shared Ray runtime when ``ray``) with its output in ``<work>/logs/<name>.log``; returns its
    seconds. A non-zero exit or the deadline raises :class:`CheckFailed` with the log's tail; on the
    deadline the command's whole process group is stopped (its ranks included)."""
    if ray:
        ctx.ensure_ray()

    cmd = [sys.executable]
    if ranks > 1:
        from cstwa_dist.distributed.env import free_port  # imports torch: only for torchrun's port

        cmd += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    cmd += ["-m", "cstwa_dist.cli", *args]
    log = ctx.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    if left <= 0:
        raise CheckFailed(f"no budget left to start `{name}`", figures)
    logger.info("doctor: %s (%d rank(s), %.0f s left): %s", name, ranks, left, " ".join(cmd))
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=ctx.env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise CheckFailed(
                f"`{name}` ran past the check's budget and was stopped", figures, _tail(log)
            ) from None
        except BaseException:  # Ctrl-C: its own session would not get the signal; stop it too
            _stop_group(proc)
            raise
    seconds = time.monotonic() - t0
    if rc != 0:
        raise CheckFailed(f"`{name}` exited with code {rc}: {_error_line(log)}", figures, _tail(log))
    return seconds


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group (its ranks), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _error_line(log: Path) -> str:
    """The last line of a log that names an error (else its last line): the reason in one line."""
    text = _tail(log, 200).splitlines()
    for line in reversed(text):
        if "Error" in line or "ERROR" in line:
            return line.strip()[-400:]
    return text[-1].strip()[-400:] if text else "(no output)"


def _run_overrides(plan: Plan, ctx: _Context, dataset: Path) -> list[str]:
    """``--set`` values of the training commands: this run's folders, plus a tiny model in the dry run."""
    sets = [
        f"data.dataset={dataset}",
        f"structure.graph_dir={ctx.work / 'structure'}",
        f"train.run_dir={ctx.work / 'runs'}",
        "train.tensorboard=false",
    ]
    if plan.dry_run:
        sets += [
            "data.batch_size=500",
            "data.eval_batch_size=1000",
            "model.ctr_tower=[16, 8]",
            "model.cvr_tower=[16, 8]",
            "model.dropout=[0.0, 0.1]",
            "models.cstwa.info_layer=[8]",
            "structure.k=4",
            "train.log_every=5",
        ]
    return sets


def _with_sets(args: list[str], sets: list[str]) -> list[str]:
    out = list(args)
    for s in sets:
        out += ["--set", s]
    return out


def _synth(name: str, plan: Plan, ctx: _Context, out: Path, deadline: float, figures: dict) -> float:
    """``synth`` of the training check's preset and scale into ``out`` (seed 0)."""
    sizes = plan.sizes()["cstwa_training"]
    args = ["synth", "--preset", sizes["preset"], "--scale", f"{sizes['scale']:g}", "--seed", "0"]
    # synth writes Parquet directly: no Ray runtime needed yet
    return _run_logged(name, [*args, "--out", str(out)], 1, ctx, deadline, figures, ray=False)


def _check_training(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    import json

    from cstwa_dist.registry import load_config

    deadline = time.monotonic() + budget_s
    sizes = dict(plan.sizes()["cstwa_training"])
    figures: dict[str, Any] = {"sizes": sizes, "seconds": {}}
    data = ctx.work / "data"
    figures["seconds"]["synth"] = _synth("synth", plan, ctx, data, deadline, figures)
    ctx.dataset = data  # bench_train runs on it even if a later step here fails
    stats = json.loads((data / "stats.json").read_text())
    train_rows = int(stats["train"]["rows"])
    ranks = int(sizes["ranks"])
    sets = _run_overrides(plan, ctx, data)
    batch = load_config(str(ctx.config), sets).data.batch_size
    steps_per_epoch = math.ceil(train_rows / (batch * ranks))
    epochs = int(sizes.get("epochs") or min(6, max(1, math.ceil(sizes["target_steps"] / steps_per_epoch))))
    sets.append(f"train.epochs={epochs}")
    figures.update(train_rows=train_rows, batch_size_per_rank=batch, epochs=epochs)
    figures["steps_per_rank"] = epochs * steps_per_epoch
    base = ["--config", str(ctx.config)]
    figures["seconds"]["pretrain"] = _run_logged(
        "pretrain", _with_sets(["pretrain", *base], sets), ranks, ctx, deadline, figures
    )
    structure = json.loads((ctx.work / "structure" / "structure.json").read_text())
    ctx.graphs = ctx.work / "structure"
    figures["graphs"] = {
        side: {
            key: g[key]
            for key in ("entities", "k", "knn", "recall_at_k", "nnz", "ranks", "seconds")
            if key in g
        }
        for side, g in (structure.get("graphs") or {}).items()
    }
    figures["seconds"]["train"] = _run_logged(
        "train", _with_sets(["train", *base, "--model", "cstwa"], sets), ranks, ctx, deadline, figures
    )
    metrics = json.loads((ctx.work / "runs" / "cstwa" / "metrics.json").read_text())
    keep = (
        "world_size",
        "epochs",
        "train_samples",
        "samples_per_s",
        "samples_per_s_steady",
        "train_seconds",
        "structure_seconds",
        "embedding_optimizer",
        "device",
        "click_auc",
        "purchase_auc",
        "best_epoch",
    )
    figures["metrics"] = {key: metrics.get(key) for key in keep}
    losses = [h.get("mean_loss") for h in metrics.get("history", []) if isinstance(h, dict)]
    figures["metrics"]["epoch_losses"] = losses
    problems = []
    for task in ("click_auc", "purchase_auc"):
        v = metrics.get(task)
        if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            problems.append(f"{task} is {v!r}, not an AUC")
    if not losses or not all(isinstance(x, int | float) and math.isfinite(x) for x in losses):
        problems.append(f"an epoch's mean loss is not finite: {losses}")
    if not (metrics.get("structure_seconds") or 0) > 0:
        problems.append("the Structure Migrator took no time: the graphs were not used")
    for side in ("user", "item"):
        if figures["graphs"].get(side, {}).get("recall_at_k") is None:
            problems.append(f"structure.json has no {side} graph recall")
    if not plan.dry_run and not str(metrics.get("device", "")).startswith("cuda"):
        problems.append(f"training ran on {metrics.get('device')!r}, not on a GPU")
    figures["problems"] = problems
    return figures


def _check_bench(plan: Plan, budget_s: float, ctx: _Context) -> dict[str, Any]:
    import json

    deadline = time.monotonic() + budget_s
    sizes = plan.sizes()["bench_train"]
    figures: dict[str, Any] = {"sizes": sizes}
    data = ctx.dataset
    sets: list[str] = []
    if data is None:  # the training check failed or did not run: bench its own data, without graphs
        data = ctx.work / "bench_data"
        figures["synth_s"] = _synth("bench_synth", plan, ctx, data, deadline, figures)
    sets = _run_overrides(plan, ctx, data)
    if ctx.graphs is None:
        sets.append("models.cstwa.structure_migrator=false")
        figures["note"] = "no graphs from cstwa_training: benched CSTWA without its Structure Migrator"
    out = ctx.work / "bench_train.json"
    args = [
        "bench", "train", "--config", str(ctx.config), "--model", "cstwa",
        "--ranks", str(sizes["ranks"]), "--threads", str(plan.cpus), "--epochs", "1",
        "--compute-batches", str(sizes["compute_batches"]), "--compute-steps", str(sizes["compute_steps"]),
        "--profile-steps", str(sizes["profile_steps"]), "--out", str(out),
    ]  # fmt: skip
    figures["seconds"] = _run_logged("bench_train", _with_sets(args, sets), 1, ctx, deadline, figures)
    report = json.loads(out.read_text())
    figures["report"] = report
    problems = []
    rate = (report.get("ranks") or {}).get("end_to_end", {}).get("samples_per_s")
    if not isinstance(rate, int | float) or not rate > 0:
        problems.append(f"bench train reports no end-to-end rate ({rate!r})")
    if not plan.dry_run and not str((report.get("ranks") or {}).get("device", "")).startswith("cuda"):
        problems.append("bench train's ranks did not run on a GPU")
    figures["problems"] = problems
    return figures


# --- the run ---------------------------------------------------------------------------------------

CheckFn = Callable[[Plan, float, _Context], dict[str, Any]]
CHECK_FNS: dict[str, CheckFn] = {
    "environment": _check_environment,
    "fbgemm_fused": _check_fbgemm,
    "all_to_all": _check_all_to_all,
    "faiss_ivf": _check_faiss,
    "cstwa_training": _check_training,
    "bench_train": _check_bench,
}


def _run_check(name: str, plan: Plan, ctx: _Context) -> dict[str, Any]:
    """One check, whatever happens in it: ``ok`` with its figures, or ``failed`` with the reason (and
    whatever it measured). Never raises (but for KeyboardInterrupt)."""
    from cstwa_dist.distributed.spawn import RankFailure

    budget = plan.budgets[name]
    rec: dict[str, Any] = {"status": "failed", "budget_s": budget}
    t0 = time.monotonic()
    logger.info("doctor: %s (budget %.0f s)", name, budget)
    try:
        figures = CHECK_FNS[name](plan, budget, ctx)
        problems = figures.pop("problems", [])
        rec["figures"] = figures
        if problems:
            rec.update(reason="; ".join(problems), problems=problems)
        else:
            rec["status"] = "ok"
    except CheckFailed as e:
        rec.update(reason=str(e), figures=e.figures)
        if e.detail:
            rec["detail"] = e.detail
    except RankFailure as e:
        text = str(e)
        timed_out = "still running after timeout_s" in text
        reason = f"ran past its budget of {budget:.0f} s and was stopped" if timed_out else _last_line(text)
        rec.update(reason=reason, detail=text[-4000:])
    except Exception as e:  # noqa: BLE001 - a failing check is recorded and the next one runs
        rec.update(reason=f"{type(e).__name__}: {e}")
        logger.debug("check %s failed", name, exc_info=True)
    rec["seconds"] = round(time.monotonic() - t0, 3)
    log = logger.info if rec["status"] == "ok" else logger.warning
    log("doctor: %s %s in %.1f s %s", name, rec["status"], rec["seconds"], rec.get("reason", ""))
    return rec


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][-400:] if lines else text[:400]


def _selected(spec: str | None) -> list[str]:
    if not spec:
        return list(CHECKS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise ValueError(f"--checks: unknown check(s) {unknown}; the checks are {', '.join(CHECKS)}")
    return names


def _refuse_without_cuda() -> int:
    """The number of visible CUDA devices, or ``ValueError`` when there is none."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            f"no CUDA device is visible (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "`cstwa-dist doctor` checks a GPU node and does not run its GPU checks on CPU. "
            "Use --dry-run for the CPU rehearsal"
        )
    return count


def cmd_doctor(args: argparse.Namespace) -> int:
    from cstwa_dist.fs import atomic_write_json

    selected = _selected(args.checks)
    if args.budget_factor <= 0:
        raise ValueError(f"--budget-factor must be > 0, got {args.budget_factor}")
    config = Path(args.config)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config} does not exist (run from the repository root)")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every check, and every process it starts, on CPU
        gpus = 0
    else:
        gpus = _refuse_without_cuda()
    cpus = os.cpu_count() or 1
    base = DRY_BUDGETS_S if args.dry_run else GPU_BUDGETS_S
    plan = Plan(
        dry_run=args.dry_run,
        gpus=gpus,
        cpus=cpus,
        budgets={k: v * args.budget_factor for k, v in base.items()},
    )
    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="cstwa-doctor-")) if own_work else Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    ctx = _Context(work=work, env=env, config=config.resolve(), cpus=cpus)
    report: dict[str, Any] = {
        "mode": plan.mode,
        "finished": False,
        "ok": None,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "host": {"name": os.uname().nodename, "cpu_count": cpus, "gpus": gpus},
        "load_average_1_5_15": {"before": list(os.getloadavg())},
        "budgets_s": plan.budgets,
        "sizes": plan.sizes(),
        "work_dir": str(work),
        "checks": {},
    }
    t_start = time.monotonic()
    # at once: an older file at --out is never mistaken for this run's
    atomic_write_json(args.out, report, sort_keys=False)
    try:
        for name in CHECKS:
            if name not in selected:
                report["checks"][name] = {
                    "status": "skipped",
                    "reason": "not selected (--checks)",
                    "seconds": 0.0,
                }
                continue
            report["checks"][name] = _run_check(name, plan, ctx)
            atomic_write_json(args.out, report, sort_keys=False)
    finally:
        ctx.close()
    failed = [n for n, c in report["checks"].items() if c["status"] == "failed"]
    keep = bool(failed) or not own_work or args.keep_work_dir
    report.update(
        finished=True,
        ok=not failed,
        failed=failed,
        seconds=round(time.monotonic() - t_start, 3),
        work_dir_kept=keep,
    )
    report["load_average_1_5_15"]["after"] = list(os.getloadavg())
    report["summary"] = {n: c["status"] for n, c in report["checks"].items()}
    atomic_write_json(args.out, report, sort_keys=False)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    emit_json(
        {"mode": plan.mode, "ok": not failed, "seconds": report["seconds"], "checks": report["summary"]}
    )
    logger.info("wrote %s%s", args.out, f" (work folder kept: {work})" if keep else "")
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers ``doctor`` on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "doctor",
        help="one prepared check of a GPU node (FBGEMM, NCCL, faiss-gpu, training, bench) as JSON",
        description="Checks a GPU node in under 10 minutes, each check in its own processes with its own "
        "time budget: the environment (versions, devices, NCCL), FBGEMM's fused table optimizer on a "
        "sharded EmbeddingBagCollection (updates checked against the formula), all-to-all across every "
        "visible GPU (checked, then timed), Faiss IVF on 1M vectors with recall@k against exact search, "
        "CSTWA training with its graphs (synth, pretrain, train) and `bench train`; writes --out JSON "
        "and exits 1 when a check failed. --dry-run runs everything at tiny size on CPU "
        "(docs/gpu-check.md).",
    )
    p.add_argument(
        "--dry-run",
        "--cpu",
        dest="dry_run",
        action="store_true",
        help="every check at tiny size on CPU (gloo ranks, faiss-cpu), any GPU hidden: the rehearsal",
    )
    p.add_argument("--out", required=True, help="JSON file to write (rewritten after every check)")
    p.add_argument(
        "--checks",
        default=None,
        metavar="LIST",
        help=f"comma-separated checks to run (default: all): {','.join(CHECKS)}",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="a new or empty folder for the data, graphs, runs and logs, kept (default: a temp folder, "
        "removed unless a check failed)",
    )
    p.add_argument(
        "--keep-work-dir", action="store_true", help="keep the default temp work folder after success"
    )
    p.add_argument(
        "--config",
        default="configs/demo.yaml",
        help="run config the training checks start from (default: configs/demo.yaml)",
    )
    p.add_argument(
        "--budget-factor",
        type=float,
        default=1.0,
        help="multiply every check's time budget (default 1; e.g. 2 on a slow or shared machine)",
    )
    p.set_defaults(func=cmd_doctor)
