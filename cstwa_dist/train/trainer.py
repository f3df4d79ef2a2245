"""The training loop: one code path for 1 process and for torchrun ranks, for every registered model.

``Trainer`` knows nothing model-specific: the registry's spec builds the model and its loss and
declares the structure tables (then the Structure Migrator runs at epoch boundaries). It reads the
way a training loop is usually read: ``fit`` runs epochs; an epoch is an ``epoch_boundary`` (the
structure step), ``train_step`` over the reader's batches, and an optional validation pass;
``evaluate`` scores a split (AUC, GAUC, calibration: ``metrics.py``). The run reports the test metrics
of the epoch with the best validation Purchase AUC (``train.select_epoch``), tested at that epoch's end
and kept in the history (so checkpoints carry it). Every rank runs the reader's ``steps_per_epoch``
fixed-size steps, so collectives never wait on a rank that ran out of data. ``.item()`` syncs happen
only at logging steps.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from cstwa_dist.config import ConfigError, RunConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.data.reader import SplitReader, check_shares
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.data.vocab import VOCAB_FILE, Vocabulary
from cstwa_dist.distributed.collectives import (
    all_gather_cat,
    all_reduce_sum,
    broadcast_object,
    gather_rows_to_main,
    summed,
)
from cstwa_dist.distributed.env import DistEnv, init_distributed
from cstwa_dist.distributed.init import step_seed
from cstwa_dist.distributed.sharding import ShardedModel, shard_model
from cstwa_dist.fs import atomic_write_json
from cstwa_dist.losses.common import Collectives
from cstwa_dist.registry import ModelSpec, get_model_spec
from cstwa_dist.structure.migrator import StructureMigrator
from cstwa_dist.train.checkpoint import Checkpointer, TrainState
from cstwa_dist.train.evaluation import distributed_evaluation_report
from cstwa_dist.train.metrics import (
    is_new_best,
    scalar_view,
    select_record,
)
from cstwa_dist.train.monitor import RunMonitor
from cstwa_dist.train.reserves import job_reserves
from cstwa_dist.train.warmstart import warm_start
from cstwa_dist.train.wrapper import ModelTrain, StepOutput

logger = logging.getLogger(__name__)

INIT_FROM_FILE = "init_from.json"  # a warm-started run's record of its source (train/warmstart.py)


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
    own = mspec.settings_in(cfg)
    seed_everything(cfg.train.seed)
    model = mspec.build(spec, cfg.model, torch.device("meta"), structure=cfg.structure, settings=own)
    comm = Collectives(gather=all_gather_cat, sum=summed, world_size=env.world_size)
    loss = mspec.build_loss(cfg.loss, cfg.model, comm, settings=own)
    # the row-sharded structure step
    structure = mspec.structure_tables(cfg.model, cfg.structure, settings=own)
    # what the job's other steps need on every rank (structure window, mining, evaluation), kept from
    # the tables by the planner, from the same formulas `cstwa-dist plan` prints
    reserves = job_reserves(
        cfg, model_name, spec, model, world_size=env.world_size, compute_device=env.device.type
    )
    return shard_model(
        ModelTrain(model, loss, comm), env, cfg.optim, structure, seed=cfg.train.seed, reserves=reserves
    )


@torch.no_grad()
def predict(
    dmp: DistributedModelParallel,
    reader: SplitReader,
    env: DistEnv,
    write_to: Path | None = None,
    gather: bool = True,
) -> dict[str, np.ndarray]:
    """Predictions for every real row of the split.

    Columns: ``click``/``purchase`` labels and ``p_click``/``p_purchase`` probabilities (float32),
    and ``user``, the row's user id (int64, the ``spec.user_id`` feature), which GAUC groups by.

    ``gather=False`` (what ``Trainer.evaluate`` uses): each rank returns its own rows only, ``24``
    bytes per row of its share (every column present, empty on a rank without rows; ``p_purchase``
    only for a two-task model), for :func:`~cstwa_dist.train.evaluation.
    distributed_evaluation_report`, which computes the exact metrics without gathering them.
    ``gather=True``: every rank's rows gathered on rank 0 (rank order), ``{}`` elsewhere; rank 0
    holds ``24·R`` bytes for ``R`` evaluated rows (for tools and tests that want the rows in one place).

    ``write_to``: each rank also writes its own rows — every spec field's id, the labels and the
    probabilities — to ``write_to/part-rank-NNNNN.parquet`` (:func:`write_prediction_part`; no
    gather: a rank holds ``8·F`` more bytes per row of its share, for ``F`` fields).
    """
    dmp.eval()
    user_key = reader.spec.user_id
    cols: dict[str, list[torch.Tensor]] = {
        "click": [],
        "purchase": [],
        "p_click": [],
        "p_purchase": [],
        "user": [],
    }
    ids: dict[str, list[torch.Tensor]] = {k: [] for k in reader.spec.names} if write_to is not None else {}
    for batch in reader.epoch(0):
        batch = batch.to(env.device)
        _, step = dmp(batch)
        m = batch.mask
        cols["click"].append(batch.click[m])
        cols["purchase"].append(batch.purchase[m])
        cols["user"].append(batch.features[user_key].values()[m])  # one id per row
        cols["p_click"].append(torch.sigmoid(step.click_logit)[m])
        if step.purchase_logit is not None:
            cols["p_purchase"].append(torch.sigmoid(step.purchase_logit)[m])
        for k, parts in ids.items():
            parts.append(batch.features[k].values()[m])  # one id per row and field
    dmp.train()
    if write_to is not None:
        write_prediction_part(write_to, env.rank, cols, ids)
    out: dict[str, np.ndarray] = {}
    for k, parts in cols.items():
        dtype = torch.int64 if k == "user" else torch.float32  # ids stay exact
        if not parts:
            if gather or k == "p_purchase":  # a rank without batches cannot tell the heads apart
                continue
            out[k] = np.zeros(0, dtype=np.int64 if k == "user" else np.float32)
            continue
        local = torch.cat(parts).to(dtype)
        if not gather:
            out[k] = local.cpu().numpy()
            continue
        gathered = gather_rows_to_main(local)
        if gathered is not None:
            out[k] = gathered.cpu().numpy()
    return out


PREDICTIONS_DIR = "predictions"  # <run dir>/predictions/<split>/ (train.write_predictions)


def write_prediction_part(
    folder: Path, rank: int, cols: dict[str, list[torch.Tensor]], ids: dict[str, list[torch.Tensor]]
) -> Path:
    """This rank's rows as ``folder/part-rank-NNNNN.parquet``, written atomically: every spec field
    (int64 rows), ``click``/``purchase`` (int8), ``p_ctr`` and, for a two-task model, ``p_ctcvr``
    (float32). The rank's rows in reading order; a row is identified by its ids, not its position."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cstwa_dist.fs import atomic_path

    def cat(parts: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
        if not parts:
            return np.zeros(0, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return torch.cat(parts).to(dtype).cpu().numpy()

    table: dict[str, np.ndarray] = {k: cat(parts, torch.int64) for k, parts in ids.items()}
    table["click"] = cat(cols["click"], torch.int8)
    table["purchase"] = cat(cols["purchase"], torch.int8)
    table["p_ctr"] = cat(cols["p_click"], torch.float32)
    if cols["p_purchase"]:
        table["p_ctcvr"] = cat(cols["p_purchase"], torch.float32)
    path = Path(folder) / f"part-rank-{rank:05d}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(table), tmp)
    return path


def auc_report(pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every metric of a split over all impressions: AUC, GAUC, calibration per task.

    ``pred``: this rank's own columns (``predict(..., gather=False)``). A collective: every rank calls
    it and gets the same report, ``evaluation_report`` of all ranks' rows, computed without gathering
    them (:mod:`cstwa_dist.distributed.ranking`: ``O(rows / W)`` per rank; one rank computes it
    in memory). ``purchase_auc`` is None for click-only models; see ``cstwa_dist.train.metrics``.
    """
    return distributed_evaluation_report(pred)


class Trainer:
    """Trains one registered model per ``cfg`` on the current process group.

    Must be created inside a Ray runtime and after ``init_distributed`` (``command_runtime`` does
    both), so that several trainers in one process (pretrain, then graphs; an experiment's cells)
    share them.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model_name: str,
        *,
        run_dir: str | Path | None = None,
        epochs: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.model_name = model_name
        self.env = init_distributed()
        try:
            shares = check_shares(cfg.data.shares, self.env.world_size, cfg.data.batch_size)
        except ValueError as e:  # data.shares that do not fit this world size or batch size
            raise ConfigError(str(e)) from None
        self.spec = DatasetSpec.load(cfg.data.dataset)
        self.model_spec = get_model_spec(model_name)
        self.epochs = epochs or cfg.train.epochs
        self.run_dir = Path(run_dir or Path(cfg.train.run_dir) / model_name)
        self.t_start = time.perf_counter()
        # which raw id each row holds (docs/retrain.md): a later warm start from this run checks it
        self.vocab = Vocabulary.load(cfg.data.dataset, self.spec)
        if self.env.is_main:
            atomic_write_json(self.run_dir / VOCAB_FILE, self.vocab.to_json(), sort_keys=False)
        self.sharded = build_sharded(cfg, model_name, self.env, self.spec)
        self.dmp, self.optimizer = self.sharded.dmp, self.sharded.optimizer
        logger.info(
            "%s: %d rank(s), embedding optimizer %s, dense Adam lr %g",
            model_name,
            self.env.world_size,
            self.sharded.embedding_optimizer,
            cfg.optim.lr,
        )
        self.structure_seconds = 0.0
        self.migrator: StructureMigrator | None = None
        tables = self.model_spec.structure_tables(
            cfg.model, cfg.structure, settings=self.model_spec.settings_in(cfg)
        )
        if tables:
            t0 = time.perf_counter()
            self.migrator = StructureMigrator(
                self.dmp, list(tables), self.spec, cfg.data.dataset, cfg.structure, self.env
            )
            self.migrator.initialise()
            self.structure_seconds += time.perf_counter() - t0
        self.train_reader = self.reader(
            "train", cfg.data.shuffle, cfg.data.batch_size, epochs=self.epochs, shares=shares
        )
        # evaluation readers are made once and serve every pass (their streams persist)
        self._eval_readers: dict[str, SplitReader] = {}
        self.steps = self.train_reader.steps_per_epoch
        logger.info(
            "train: %d rows (this rank %d), %d steps/epoch of %d rows per rank",
            self.train_reader.total_rows,
            self.train_reader.rows,
            self.steps,
            cfg.data.batch_size,
        )
        # TorchRec's pipeline rewrites the sharded modules' forward; it is detached for evaluation and
        # the structure step (both call the model directly) and re-attaches itself on the next step.
        self.pipeline: TrainPipelineSparseDist | None = None
        if cfg.train.pipeline == "sparse_dist":
            self.pipeline = TrainPipelineSparseDist(
                self.dmp, self.optimizer, self.env.device, execute_all_batches=True
            )
        self.history: list[dict[str, Any]] = []
        self.real_samples = torch.zeros((), dtype=torch.float64, device=self.env.device)  # global
        self.train_seconds = 0.0
        self.first_step_seconds = 0.0
        self.global_step = 0
        self.structure_epochs_applied = 0  # the β updates of epochs 1..this are in the tables
        self.position = (0, 0)  # (epoch, steps of it done) the run continues at
        self._resumed_epoch: tuple[float, float] = (0.0, 0.0)  # global Σ row losses, rows so far
        self.checkpointer = Checkpointer(
            cfg.train.checkpoint_dir or self.run_dir / "checkpoints", self.env, cfg.train.keep_checkpoints
        )
        self.monitor = RunMonitor(
            self.run_dir,
            enabled=self.env.is_main,
            total_steps=self.epochs * self.steps,
            desc=model_name,
            tensorboard=cfg.train.tensorboard,
        )
        self.init_from: dict[str, Any] | None = None  # the warm start's record (metrics.json)
        path = self.checkpointer.find(cfg.train.resume)
        if path is not None:
            self._restore(self.checkpointer.load(self.dmp, self.optimizer, path))
            if cfg.train.init_from:
                logger.info(
                    "resumed this run's own checkpoint %s: train.init_from=%s is not applied (it seeds a "
                    "fresh run only)",
                    path,
                    cfg.train.init_from,
                )
        else:
            if self.env.is_main:  # a record of an earlier run in this folder does not describe this one
                (self.run_dir / INIT_FROM_FILE).unlink(missing_ok=True)
            if cfg.train.init_from:
                self._warm_start(cfg.train.init_from)
            elif cfg.train.resume == "auto":
                logger.info("no checkpoint under %s: starting from scratch", self.checkpointer.root)

    def _warm_start(self, source: str) -> None:
        """A fresh run seeded with ``source``'s weights (``train/warmstart.py``), after every fresh
        initialisation (the Structure Migrator's included, so carried ``U``/``I`` rows replace it
        and new rows keep it). Reading (b)'s ``P`` is then recomputed from the carried field tables.
        Rank 0 keeps the record in ``<run_dir>/init_from.json``, so a resumed run reports it too."""
        t0 = time.perf_counter()
        self.init_from = warm_start(
            self.dmp, self.model_name, self.spec, self.vocab, source, dataset=self.cfg.data.dataset
        )
        if self.migrator is not None and self.migrator.recomputed:
            self.migrator.initialise()
        self.init_from["seconds"] = time.perf_counter() - t0
        if self.env.is_main:
            atomic_write_json(self.run_dir / INIT_FROM_FILE, self.init_from)

    # --- checkpoint state ------------------------------------------------------------------------
    def _state(
        self, epoch: int, step: int, epoch_end: bool, loss_sum: torch.Tensor, rows: torch.Tensor
    ) -> TrainState:
        return TrainState(
            epoch=epoch,
            step=step,
            global_step=self.global_step,
            world_size=self.env.world_size,
            epoch_end=epoch_end,
            structure_epochs_applied=self.structure_epochs_applied,
            real_samples=float(self.real_samples),
            train_seconds=self.train_seconds,
            first_step_seconds=self.first_step_seconds,
            structure_seconds=self.structure_seconds,
            epoch_loss_sum=float(summed(loss_sum)),
            epoch_rows=float(rows),
            history=list(self.history),
            data_position=self._data_position(),
        )

    def _data_position(self) -> list[int]:
        r = self.train_reader
        return [r.shares, r.batch_size * r.world_size // r.shares]

    def _restore(self, state: TrainState) -> None:
        if not state.epoch_end and state.data_position and state.data_position != self._data_position():
            # (epoch, step) names rows only under the same shares and batch: other rows would be trained
            # twice or never
            raise ConfigError(
                f"the checkpoint was taken mid-epoch with [data.shares, rows per share and step] = "
                f"{state.data_position}; this run reads {self._data_position()}. Resume it with the same "
                "data.shares and global batch size, or resume from an epoch-end checkpoint."
            )
        self.position = state.next_position()
        self.global_step = state.global_step
        self.structure_epochs_applied = state.structure_epochs_applied
        self.real_samples.fill_(state.real_samples)
        self.train_seconds = state.train_seconds
        self.first_step_seconds = state.first_step_seconds
        self.structure_seconds = state.structure_seconds
        self.history = list(state.history)
        record = self.run_dir / INIT_FROM_FILE  # this run was warm-started: metrics.json keeps saying so
        if record.is_file():
            self.init_from = json.loads(record.read_text())
        if not state.epoch_end:
            # the global sum goes to rank 0 alone: the epoch's all-reduce adds it back once
            self._resumed_epoch = (state.epoch_loss_sum if self.env.is_main else 0.0, state.epoch_rows)

    def reader(
        self, split: str, shuffle: bool, batch_size: int, epochs: int | None = None, shares: int = 0
    ) -> SplitReader:
        """This rank's share of ``split`` in fixed-size batches (``epochs``: how far to read ahead;
        ``shares``: ``data.shares`` for the training split, one share per rank otherwise)."""
        return SplitReader(
            self.cfg.data.dataset,
            split,
            self.spec,
            rank=self.env.rank,
            world_size=self.env.world_size,
            batch_size=batch_size,
            seed=self.cfg.train.seed,
            shuffle=shuffle,
            prefetch_batches=self.cfg.data.prefetch_batches,
            epochs=epochs,
            shares=shares,
        )

    def eval_reader(self, split: str) -> SplitReader:
        if split not in self._eval_readers:
            self._eval_readers[split] = self.reader(split, False, self.cfg.data.eval_batch_size)
        return self._eval_readers[split]

    def close(self) -> None:
        """Stops every reader's background stream (before the Ray runtime goes away)."""
        for r in [self.train_reader, *self._eval_readers.values()]:
            r.close()
        self._eval_readers.clear()

    def train_step(self, batches: Iterator[Batch]) -> StepOutput:
        """One step: forward, backward and both optimizers on the next batch of ``batches``.

        Through the pipeline the step also copies the batch after next to the device and starts the
        next batch's input all-to-all; the parameters it leaves are those of the plain step.
        Raises StopIteration when ``batches`` (and the pipeline) are exhausted.
        """
        if self.pipeline is not None:
            out = self.pipeline.progress(batches)
        else:
            batch = next(batches).to(self.env.device, non_blocking=True)  # pinned on GPU nodes
            loss, out = self.dmp(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.real_samples += out.rows
        return out

    def _detach_pipeline(self) -> None:
        """Gives the model back its plain forward (for evaluation and the structure step)."""
        if self.pipeline is not None:
            self.pipeline.detach()

    def epoch_boundary(self, epoch: int) -> None:
        """The Structure Migrator's β update before every epoch but the first (Eq. 9–10), once each
        (``structure.sm_reading=recomputed``: the recomputation of ``P = Â^L R``, likewise).

        A run resumed in the middle of an epoch finds that epoch's update already in the tables.
        """
        if self.migrator is not None and epoch > self.structure_epochs_applied:
            self._detach_pipeline()
            seconds = self.migrator.epoch_boundary(epoch)
            self.structure_seconds += seconds
            self.structure_epochs_applied = epoch
            self.monitor.scalars("structure", {"beta_update_s": seconds}, epoch)

    def evaluate(self, split: str, epoch: int | None = None) -> dict[str, Any]:
        """Every metric of ``split`` (``auc_report``) over its impressions, on every rank.

        Every rank keeps its own predictions and joins the distributed computation of the exact
        metrics (``auc_report``: no rank holds more than its share of the rows, and every rank ends
        with the same report); ``seconds``: the pass's wall time (prediction and metrics).

        ``epoch`` (1-based) marks a test pass: with ``train.write_predictions`` every rank writes its
        rows to ``<run dir>/predictions/<split>/`` (replacing an earlier pass's) and rank 0, once
        every part is in place, ``manifest.json`` (``{epoch, global_step, split, rows, world_size}``).
        The manifest is removed first, so a reader never pairs it with another pass's parts.
        """
        self._detach_pipeline()
        t0 = time.perf_counter()
        folder = None
        if epoch is not None and self.cfg.train.write_predictions:
            folder = self.run_dir / PREDICTIONS_DIR / split
            if self.env.is_main:
                (folder / "manifest.json").unlink(missing_ok=True)
            broadcast_object(None)  # no rank replaces its part before the old manifest is gone
        pred = predict(self.dmp, self.eval_reader(split), self.env, write_to=folder, gather=False)
        report = auc_report(pred)
        del pred
        if folder is not None and self.env.is_main:
            # every rank wrote its part before it joined the report's collectives, whose last
            # all-reduce rank 0 has completed (it needs every rank's contribution)
            for old in folder.glob("part-rank-*.parquet"):  # parts of an earlier, larger world
                if int(old.stem.rsplit("-", 1)[1]) >= self.env.world_size:
                    old.unlink()
            manifest = {
                "epoch": epoch,
                "global_step": self.global_step,
                "split": split,
                "rows": report["rows"],
                "world_size": self.env.world_size,
            }
            atomic_write_json(folder / "manifest.json", manifest)
            logger.info("wrote %d predictions of %s to %s", report["rows"], split, folder)
        report["seconds"] = time.perf_counter() - t0
        return report

    def train_epoch(self, epoch: int, validate: bool, start_step: int = 0) -> dict[str, Any]:
        """One epoch of ``steps`` training steps (then validation); returns the epoch's record.

        ``start_step`` > 0 continues a resumed epoch: its first batches are read and dropped (the
        input position is a function of seed, epoch and rank), so no row is trained twice or lost.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)  # this rank's Σ row losses
        rows = torch.zeros((), dtype=torch.float64, device=self.env.device)  # global real rows
        if start_step:
            loss_sum += self._resumed_epoch[0]
            rows += self._resumed_epoch[1]
        n_steps = start_step
        batches = iter(self.train_reader.epoch(epoch))
        for _ in range(start_step):
            next(batches)
        every = cfg.train.checkpoint_every
        for step in itertools.count(start_step):
            # dropout masks: this rank's own stream, a function of (seed, epoch, rank, step) alone, so a
            # resumed epoch draws what the uninterrupted one drew (data order has its own generators)
            torch.manual_seed(step_seed(cfg.train.seed, epoch, self.env.rank, step))
            try:
                out = self.train_step(batches)
            except StopIteration:
                break
            loss_sum += out.loss * out.rows
            rows += out.rows
            n_steps += 1
            self.global_step += 1
            self.monitor.advance()
            if every and self.global_step % every == 0 and n_steps < self.steps:
                self.checkpointer.save(
                    self.dmp, self.optimizer, self._state(epoch, n_steps, False, loss_sum, rows)
                )
            if step == 0:  # the first step of an epoch also pays for starting the epoch's input stream
                self.first_step_seconds += time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == self.steps - 1:  # every rank: a collective
                names = list(out.parts)
                step_loss, *step_parts = summed(torch.stack([out.loss, *out.parts.values()])).tolist()
                elapsed = max(time.perf_counter() - t0, 1e-9)
                rate = float(rows) / elapsed
                terms = dict(zip(names, step_parts, strict=True))
                self.monitor.scalars("train", {"loss": step_loss, **terms}, self.global_step)
                self.monitor.scalars("throughput", {"samples_per_s": rate}, self.global_step)
                logger.info(
                    "%s epoch %d step %d/%d loss %.4f (%s) ~%.0f samples/s",
                    self.model_name,
                    epoch + 1,
                    step + 1,
                    self.steps,
                    step_loss,
                    " ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                    rate,
                )
        if n_steps != self.steps:
            raise RuntimeError(
                f"rank {self.env.rank} ran {n_steps} steps, expected {self.steps}: reader contract broken"
            )
        epoch_seconds = time.perf_counter() - t0
        self.train_seconds += epoch_seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "seconds": epoch_seconds,
            # mean over the epoch's real rows (all ranks); padding weighs nothing
            "mean_loss": float(all_reduce_sum(loss_sum.clone()) / rows.clamp(min=1.0)),
            "rows": int(rows.item()),
        }
        self.monitor.scalars("epoch", {"mean_loss": record["mean_loss"], "seconds": epoch_seconds}, epoch + 1)
        if validate:
            record["val"] = self.evaluate("val")
            self.monitor.scalars("val", scalar_view(record["val"]), epoch + 1)
            _log_split(self.model_name, f"epoch {epoch + 1} val", record["val"])
        return record

    def _test_epoch(self, record: dict[str, Any], epoch: int) -> None:
        """Evaluates the test split into ``record["test"]`` when the run may report this epoch.

        The reported epoch (``train.select_epoch``) is the best by validation Purchase AUC or the last;
        only an epoch that sets a new best, or the last epoch, can be it, so only those are tested
        (every epoch when validation improves every epoch, at most one extra pass otherwise). The
        result lives in the epoch's history record, which the epoch-end checkpoint saves: a resumed run
        selects among the same records as an uninterrupted one, and no model copy is kept.
        """
        rule = self.cfg.train.select_epoch
        last = epoch == self.epochs - 1
        if not (last or (rule == "best_val_purchase_auc" and is_new_best(self.history, record))):
            return
        split = self.cfg.train.eval_split
        record["test"] = self.evaluate(split, epoch=epoch + 1)
        record["test"]["split"] = split
        self.monitor.scalars("test", scalar_view(record["test"]), epoch + 1)
        _log_split(self.model_name, f"epoch {epoch + 1} {split}", record["test"])

    def fit(self, evaluate: bool = True) -> TrainResult:
        """All epochs; rank 0 writes ``<run_dir>/metrics.json``.

        With ``evaluate``: validation after every epoch (``train.validate_every_epoch``), test passes
        where ``_test_epoch`` needs them, and the reported test metrics are those of the epoch
        ``train.select_epoch`` picks (``best_epoch``; by default the best validation Purchase AUC).
        """
        cfg, env = self.cfg, self.env
        self.dmp.train()
        first_epoch, first_step = self.position
        for epoch in range(first_epoch, self.epochs):
            self.epoch_boundary(epoch)
            start = first_step if epoch == first_epoch else 0
            record = self.train_epoch(epoch, evaluate and cfg.train.validate_every_epoch, start)
            if evaluate:
                self._test_epoch(record, epoch)
            self.history.append(record)
            zero = torch.zeros((), dtype=torch.float64, device=env.device)
            self.checkpointer.save(self.dmp, self.optimizer, self._state(epoch, self.steps, True, zero, zero))
        self._detach_pipeline()  # callers (pretrain's read-out, tests) use the model directly
        metrics = self._metrics()
        if evaluate:
            metrics.update(self._selected_metrics())
        self.monitor.close()
        metrics["wall_seconds"] = time.perf_counter() - self.t_start
        if env.is_main:
            atomic_write_json(self.run_dir / "metrics.json", metrics)
            logger.info("wrote %s", self.run_dir / "metrics.json")
        broadcast_object(None)  # keeps ranks in step before the caller moves on
        return TrainResult(
            metrics=metrics,
            sharded=self.sharded,
            env=env,
            spec=self.spec,
            model_spec=self.model_spec,
            history=self.history,
        )

    def _selected_metrics(self) -> dict[str, Any]:
        """The test metrics of the epoch ``train.select_epoch`` picks, with ``best_epoch``.

        Normally a record of ``history`` (see ``_test_epoch``). A run resumed from a checkpoint of an
        older version that holds no tested epoch, with nothing left to train, tests the current model
        (the last epoch's) now.
        """
        cfg = self.cfg
        chosen, rule = select_record(self.history, cfg.train.select_epoch)
        if chosen is None:
            chosen = self.history[-1] if self.history else {"epoch": self.epochs}
            chosen["test"] = self.evaluate(cfg.train.eval_split)
            chosen["test"]["split"] = cfg.train.eval_split
            rule = "last"
        test = chosen["test"]
        if rule != cfg.train.select_epoch:
            # a click-only model (pre-training's CTR MLP) has nothing to select by; a run with
            # validation off (train.validate_every_epoch=false) departs from the paper's protocol
            click_only = test.get("purchase_auc") is None
            (logger.info if click_only else logger.warning)(
                "%s: train.select_epoch=%s needs a validation Purchase AUC (%s); reporting the last epoch",
                self.model_name,
                cfg.train.select_epoch,
                "no purchase head" if click_only else "validation off, or no purchase in val",
            )
        selected = {k: v for k, v in test.items() if k not in ("rows", "seconds", "split")}
        out: dict[str, Any] = {
            **selected,
            "best_epoch": chosen["epoch"],
            "select_epoch": rule,
            "best_val_purchase_auc": (chosen.get("val") or {}).get("purchase_auc"),
            "eval_split": cfg.train.eval_split,
            "eval_rows": test["rows"],
            "eval_seconds": test.get("seconds"),
        }
        self.monitor.scalars("selected", {"best_epoch": chosen["epoch"], **scalar_view(test)}, self.epochs)
        _log_split(self.model_name, f"{cfg.train.eval_split} (epoch {chosen['epoch']}, {rule})", test)
        return out

    def _metrics(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        total_real = int(self.real_samples.item())  # already global: each step's rows are summed
        batch_rows = cfg.data.batch_size * env.world_size
        return {
            "model": self.model_name,
            "seed": cfg.train.seed,
            "world_size": env.world_size,
            "epochs": self.epochs,
            "train_samples": total_real,
            "train_rows_per_epoch": self.train_reader.total_rows,
            "samples_per_s": total_real / max(self.train_seconds, 1e-9),
            # without each epoch's first step (input stream start-up): the rate a long epoch approaches
            "samples_per_s_steady": max(total_real - self.epochs * batch_rows, 0)
            / max(self.train_seconds - self.first_step_seconds, 1e-9),
            "train_seconds": self.train_seconds,
            "structure_seconds": self.structure_seconds,
            "embedding_optimizer": self.sharded.embedding_optimizer,
            # the resolved fused table optimizer: kernel, lr, eps (distributed/sharding.py)
            "embedding_optimizer_settings": self.sharded.embedding_optimizer_settings,
            "dense_optimizer": "adam",
            "device": str(env.device),
            "history": self.history,
            "init_from": self.init_from,
            "config": cfg.to_dict(),
        }


def train(
    cfg: RunConfig,
    model_name: str,
    *,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    evaluate: bool = True,
) -> TrainResult:
    """Trains and (``evaluate``) tests ``model_name`` per ``cfg``: ``Trainer(...).fit(...)``."""
    trainer = Trainer(cfg, model_name, run_dir=run_dir, epochs=epochs)
    try:
        return trainer.fit(evaluate)
    finally:
        trainer.close()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _log_split(model: str, what: str, r: dict[str, Any]) -> None:
    """One line per evaluation: AUC and GAUC per task, and how calibrated (log loss, ECE)."""
    logger.info(
        "%s %s: click AUC %s GAUC %s logloss %s ECE %s | purchase AUC %s GAUC %s logloss %s ECE %s "
        "| %d impressions",
        model,
        what,
        *(_fmt(r.get(f"{t}_{k}")) for t in ("click", "purchase") for k in ("auc", "gauc", "logloss", "ece")),
        r["rows"],
    )
