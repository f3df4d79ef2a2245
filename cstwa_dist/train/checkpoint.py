"""Checkpoints of a training run that a killed job resumes from without losing or repeating a sample.

A checkpoint is a folder ``<checkpoint_dir>/step-<global step>`` holding:

* the ``torch.distributed.checkpoint`` (DCP) files of ``{"model", "optim"}``: every rank writes its
  shards of the embedding tables and of the fused embedding optimizer's state, the dense parameters
  and the dense Adam state; the losses' extra state (the Curse Escaper's window) rides along in the
  model's state dict (``get_extra_state``);
* ``rng-rank<r>.pt``: each rank's torch / numpy / python RNG states (dropout draws);
* ``meta.json`` (rank 0, written last): the position — epoch, steps of it done, global step, world
  size, whether it closes an epoch —, which epoch's Structure Migrator update the tables hold, the
  sample and time counters and the history so far.

**Atomic.** Everything is written into ``.tmp-step-<n>``; after a barrier rank 0 writes ``meta.json``
and renames the folder. A folder without ``meta.json`` or with the temp prefix is never picked up,
so a job killed while saving resumes from the previous checkpoint.

**Data position.** Shares and shuffles are functions of (seed, epoch, rank), so "``step`` steps of
``epoch`` done" is the whole input position: on resume every rank re-reads its share of that epoch
and drops the first ``step`` batches (reading is ~30× faster than training them). That position is
per rank, so on another world size only a checkpoint taken at an epoch end (a position every world
size shares) can be continued exactly: ``find`` then skips newer mid-epoch checkpoints and says so.

Per-rank memory: what ``state_dict`` views already hold (no copies of the tables), plus the RNG
states; DCP streams each rank's shards to its own files.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from cstwa_dist.distributed.collectives import broadcast_object
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.fs import atomic_write_json

logger = logging.getLogger(__name__)

META = "meta.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Where a run is and what it has counted, besides tensors."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # steps of ``epoch`` already done
    global_step: int = 0
    world_size: int = 1
    epoch_end: bool = False  # True: ``epoch`` is finished (validation included)
    structure_epochs_applied: int = 0  # the tables hold the β updates of epochs 1..this
    real_samples: float = 0.0
    train_seconds: float = 0.0
    first_step_seconds: float = 0.0
    structure_seconds: float = 0.0
    epoch_loss_sum: float = 0.0  # global Σ row losses of the epoch in progress
    epoch_rows: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def next_position(self) -> tuple[int, int]:
        """(epoch, step) the run continues at."""
        return (self.epoch + 1, 0) if self.epoch_end else (self.epoch, self.step)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / META).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _is_complete(p)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def read_meta(path: str | Path) -> TrainState:
    raw = json.loads((Path(path) / META).read_text())
    return TrainState(**raw)


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run (every rank calls every method)."""

    def __init__(self, root: str | Path, env: DistEnv, keep: int) -> None:
        self.root = Path(root)
        self.env = env
        self.keep = keep

    # --- saving --------------------------------------------------------------------------------
    def save(self, dmp: torch.nn.Module, optimizer: Any, state: TrainState) -> Path:
        """Writes a checkpoint of ``state`` atomically; returns its folder (every rank)."""
        name = f"{PREFIX}{state.global_step:09d}"
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.env.rank}.pt")
        self._barrier()  # every rank's files are in place before the checkpoint becomes visible
        if self.env.is_main:
            atomic_write_json(tmp / META, asdict(state), sort_keys=False)
            if final.exists():  # the same step saved before (an epoch end after a step checkpoint)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
            logger.info("checkpoint %s (epoch %d, step %d)", final, state.epoch + 1, state.step)
        self._barrier()
        return final

    def _prune(self) -> None:
        """Keeps the newest ``keep`` checkpoints and the newest epoch-end one (any world size resumes it)."""
        done = list_checkpoints(self.root)
        keep = set(done[-self.keep :])
        epoch_ends = [p for p in done if read_meta(p).epoch_end]
        if epoch_ends:
            keep.add(epoch_ends[-1])
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # --- finding and loading ---------------------------------------------------------------------
    def find(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` names ("auto": the newest this world size can continue exactly)."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not _is_complete(path):
                raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {META})")
            state = read_meta(path)
            if state.world_size != self.env.world_size and not state.epoch_end:
                raise ValueError(
                    f"{path} was taken mid-epoch on {state.world_size} rank(s); its data position is per "
                    f"rank, so it continues only on {state.world_size} rank(s). Resume from an epoch-end "
                    f"checkpoint (or --resume auto) to change the world size."
                )
            return path
        chosen: Path | None = None
        for path in reversed(list_checkpoints(self.root)):
            state = read_meta(path)
            if state.world_size == self.env.world_size or state.epoch_end:
                chosen = path
                break
            logger.warning(
                "skipping %s: taken mid-epoch on %d rank(s), this job has %d; looking for an epoch-end one",
                path,
                state.world_size,
                self.env.world_size,
            )
        return chosen

    def load(self, dmp: torch.nn.Module, optimizer: Any, path: Path) -> TrainState:
        """Restores tensors (and, on the same world size, RNG states) from ``path``; returns its state."""
        state = read_meta(path)
        # Adam's state exists only after a step; without it the loaded state would be dropped silently
        # (docs/platform-notes.md). The dummy step's changes are overwritten by the load below.
        optimizer.init_state()
        target = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
        dcp.load(target, checkpoint_id=str(path))
        dmp.load_state_dict(target["model"])
        optimizer.load_state_dict(target["optim"])
        rng = path / f"rng-rank{self.env.rank}.pt"
        if state.world_size == self.env.world_size and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        if state.world_size != self.env.world_size:
            logger.warning(
                "resumed a %d-rank checkpoint on %d rank(s) from %s (end of epoch %d): shares and "
                "random streams are re-drawn for the new world size",
                state.world_size,
                self.env.world_size,
                path,
                state.epoch + 1,
            )
        else:
            logger.info("resumed from %s: epoch %d, %d steps done", path, state.epoch + 1, state.step)
        broadcast_object(None)
        return state

    def _barrier(self) -> None:
        if dist.is_initialized() and self.env.world_size > 1:
            dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
