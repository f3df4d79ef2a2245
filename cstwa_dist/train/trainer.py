"""The training loop: one code path for 1 process and for torchrun ranks, for every registered model.

The loop knows nothing model-specific: the registry's spec builds the model and its loss, and the
model declares structure tables (then the Structure Migrator runs at epoch boundaries). Every rank
runs the reader's ``steps_per_epoch`` fixed-size steps, so collectives never wait on a rank that ran
out of data. ``.item()`` syncs happen only at logging steps.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from cstwa_dist.config import RunConfig
from cstwa_dist.data.reader import RayRuntime, SplitReader
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.distributed.collectives import (
    all_gather_cat,
    all_gather_rows,
    all_reduce_sum,
    broadcast_object,
)
from cstwa_dist.distributed.env import DistEnv, init_distributed
from cstwa_dist.distributed.sharding import ShardedModel, shard_model
from cstwa_dist.models.registry import ModelSpec, get_model_spec
from cstwa_dist.structure.migrator import StructureMigrator
from cstwa_dist.train.metrics import exact_auc
from cstwa_dist.train.wrapper import ModelTrain

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    sharded: ShardedModel
    env: DistEnv
    spec: DatasetSpec
    model_spec: ModelSpec
    history: list[dict[str, Any]] = field(default_factory=list)


def build_sharded(cfg: RunConfig, model_name: str, env: DistEnv, spec: DatasetSpec) -> ShardedModel:
    """Registry → model on ``meta`` + loss → ``ModelTrain`` → DistributedModelParallel."""
    mspec = get_model_spec(model_name)
    seed_everything(cfg.train.seed)
    model = mspec.build(spec, cfg.model, torch.device("meta"))
    loss = mspec.build_loss(cfg.loss, cfg.model, all_gather_cat)
    return shard_model(ModelTrain(model, loss), env, cfg.optim)


@torch.no_grad()
def predict(dmp: DistributedModelParallel, reader: SplitReader, env: DistEnv) -> dict[str, np.ndarray]:
    """Predictions for every real row of the split, gathered from all ranks (rank order)."""
    dmp.eval()
    cols: dict[str, list[torch.Tensor]] = {"click": [], "purchase": [], "p_click": [], "p_purchase": []}
    for batch in reader.epoch(0):
        batch = batch.to(env.device)
        _, (_, click_logit, purchase_logit) = dmp(batch)
        m = batch.mask
        cols["click"].append(batch.click[m])
        cols["purchase"].append(batch.purchase[m])
        cols["p_click"].append(torch.sigmoid(click_logit)[m])
        if purchase_logit is not None:
            cols["p_purchase"].append(torch.sigmoid(purchase_logit)[m])
    dmp.train()
    out: dict[str, np.ndarray] = {}
    for k, parts in cols.items():
        if not parts:
            continue
        local = torch.cat(parts).float()
        out[k] = all_gather_rows(local).cpu().numpy()
    return out


def auc_report(pred: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Click AUC and Purchase AUC over all impressions (purchase None for click-only models)."""
    click_auc = exact_auc(pred["click"], pred["p_click"])
    purchase_auc = exact_auc(pred["purchase"], pred["p_purchase"]) if "p_purchase" in pred else None
    return {"click_auc": click_auc, "purchase_auc": purchase_auc, "rows": int(pred["click"].size)}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def train(
    cfg: RunConfig,
    model_name: str,
    *,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    evaluate: bool = True,
) -> TrainResult:
    """Trains ``model_name`` per ``cfg``; rank 0 writes ``<run_dir>/metrics.json``.

    Must be called inside a Ray runtime (``RayRuntime``) and after ``init_distributed`` — the CLI
    does both — so that several calls in one process (pretrain, then graphs) share them.
    """
    env = init_distributed()
    spec = DatasetSpec.load(cfg.data.dataset)
    mspec = get_model_spec(model_name)
    epochs = epochs or cfg.train.epochs
    run_dir = Path(run_dir or Path(cfg.train.run_dir) / model_name)
    t_start = time.perf_counter()
    sharded = build_sharded(cfg, model_name, env, spec)
    dmp, opt = sharded.dmp, sharded.optimizer
    logger.info(
        "%s: %d rank(s), embedding optimizer %s, dense Adam lr %g",
        model_name,
        env.world_size,
        sharded.embedding_optimizer,
        cfg.optim.lr,
    )

    tables = dmp.module.model.structure_tables()
    migrator = None
    structure_seconds = 0.0
    if tables:
        t0 = time.perf_counter()
        migrator = StructureMigrator(dmp, tables, spec, cfg.data.dataset, cfg.structure, env)
        migrator.initialise()
        structure_seconds += time.perf_counter() - t0

    def reader(split: str, shuffle: bool, batch_size: int) -> SplitReader:
        return SplitReader(
            cfg.data.dataset,
            split,
            spec,
            rank=env.rank,
            world_size=env.world_size,
            batch_size=batch_size,
            seed=cfg.train.seed,
            shuffle=shuffle,
            prefetch_batches=cfg.data.prefetch_batches,
        )

    train_reader = reader("train", cfg.data.shuffle, cfg.data.batch_size)
    steps = train_reader.steps_per_epoch
    logger.info(
        "train: %d rows (this rank %d), %d steps/epoch of %d rows per rank",
        train_reader.total_rows,
        train_reader.rows,
        steps,
        cfg.data.batch_size,
    )

    history: list[dict[str, Any]] = []
    real_samples = torch.zeros((), dtype=torch.float64, device=env.device)
    train_seconds = 0.0
    first_step_seconds = 0.0
    dmp.train()
    for epoch in range(epochs):
        if migrator is not None and epoch > 0:
            structure_seconds += migrator.epoch_boundary(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        n_steps = 0
        for step, batch in enumerate(train_reader.epoch(epoch)):
            batch = batch.to(env.device)
            loss, (parts, _, _) = dmp(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            real_samples += batch.mask.sum()
            loss_sum += loss.detach()
            n_steps += 1
            if step == 0:  # the first step of an epoch also pays for starting the epoch's input stream
                first_step_seconds += time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == steps - 1:
                rate = (step + 1) * cfg.data.batch_size * env.world_size / max(time.perf_counter() - t0, 1e-9)
                logger.info(
                    "%s epoch %d step %d/%d loss %.4f (%s) ~%.0f samples/s",
                    model_name,
                    epoch + 1,
                    step + 1,
                    steps,
                    loss.item(),
                    " ".join(f"{k} {v.item():.4f}" for k, v in parts.items()),
                    rate,
                )
        if n_steps != steps:
            raise RuntimeError(
                f"rank {env.rank} ran {n_steps} steps, expected {steps}: reader contract broken"
            )
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "seconds": epoch_seconds,
            "mean_loss": float(all_reduce_sum(loss_sum.clone()) / (steps * env.world_size)),
        }
        if evaluate and cfg.train.validate_every_epoch:
            record["val"] = auc_report(predict(dmp, reader("val", False, cfg.data.eval_batch_size), env))
            logger.info(
                "%s epoch %d val: click AUC %.4f purchase AUC %s",
                model_name,
                epoch + 1,
                record["val"]["click_auc"],
                _fmt(record["val"]["purchase_auc"]),
            )
        history.append(record)

    total_real = int(all_reduce_sum(real_samples).item())
    metrics: dict[str, Any] = {
        "model": model_name,
        "seed": cfg.train.seed,
        "world_size": env.world_size,
        "epochs": epochs,
        "train_samples": total_real,
        "train_rows_per_epoch": train_reader.total_rows,
        "samples_per_s": total_real / max(train_seconds, 1e-9),
        # without each epoch's first step (input stream start-up): the rate a long epoch approaches
        "samples_per_s_steady": max(total_real - epochs * cfg.data.batch_size * env.world_size, 0)
        / max(train_seconds - first_step_seconds, 1e-9),
        "train_seconds": train_seconds,
        "structure_seconds": structure_seconds,
        "embedding_optimizer": sharded.embedding_optimizer,
        "dense_optimizer": "adam",
        "device": str(env.device),
        "history": history,
        "config": cfg.to_dict(),
    }
    if evaluate:
        t0 = time.perf_counter()
        test = auc_report(predict(dmp, reader(cfg.train.eval_split, False, cfg.data.eval_batch_size), env))
        metrics.update(
            click_auc=test["click_auc"],
            purchase_auc=test["purchase_auc"],
            eval_split=cfg.train.eval_split,
            eval_rows=test["rows"],
            eval_seconds=time.perf_counter() - t0,
        )
        logger.info(
            "%s %s: click AUC %.4f, purchase AUC %s over %d impressions",
            model_name,
            cfg.train.eval_split,
            test["click_auc"],
            _fmt(test["purchase_auc"]),
            test["rows"],
        )
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if env.is_main:
        _write_json_atomic(run_dir / "metrics.json", metrics)
        logger.info("wrote %s", run_dir / "metrics.json")
    broadcast_object(None)  # keeps ranks in step before the caller moves on
    return TrainResult(
        metrics=metrics, sharded=sharded, env=env, spec=spec, model_spec=mspec, history=history
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


__all__ = ["RayRuntime", "TrainResult", "auc_report", "build_sharded", "predict", "seed_everything", "train"]
