"""Checkpoints of a training run that a killed job resumes from without losing or repeating a sample.

A checkpoint is a folder ``<checkpoint_dir>/step-<global step>`` holding:

* the ``torch.distributed.checkpoint`` (DCP) files of ``{"model", "optim"}``: every rank writes its
  shards of the embedding tables and of the fused embedding optimizer's state, the dense parameters
  and the dense Adam state; the losses' extra state (the Curse Escaper's window) rides along in the
  model's state dict (``get_extra_state``);
* ``rng-rank<r>.json``: each rank's torch (and CUDA) / numpy / python RNG states (dropout draws), as
  JSON: integers and base64 bytes, nothing that is unpickled;
* ``meta.json`` (rank 0, written last): the position — epoch, steps of it done, global step, world
  size, whether it closes an epoch —, which epoch's Structure Migrator update the tables hold, the
  sample and time counters and the history so far; with a key configured, the signature.

**Atomic.** Everything is written into ``.tmp-step-<n>``; after a barrier rank 0 writes ``meta.json``
and renames the folder. A folder without ``meta.json`` or with the temp prefix is never picked up,
so a job killed while saving resumes from the previous checkpoint.

**Data position.** Shares and shuffles are functions of (seed, epoch, rank), so "``step`` steps of
``epoch`` done" is the whole input position: on resume every rank re-reads its share of that epoch
and drops the first ``step`` batches (reading is ~30× faster than training them). That position is
per rank, so on another world size only a checkpoint taken at an epoch end (a position every world
size shares) can be continued exactly: ``find`` then skips newer mid-epoch checkpoints and says so.

**Untrusted files.** Whoever can write to the checkpoint volume must not get code execution in the
job that resumes (``--resume auto`` in every pod of a Kubernetes job). So nothing here is read with
pickle's full power: the RNG files and ``meta.json`` are JSON; DCP's ``.metadata`` (a pickle) is read
through :class:`SafeMetadataReader`, which admits only DCP's own metadata classes, torch sizes and
dtypes and paths; DCP's non-tensor items go through :class:`SafeLoadPlanner` (``weights_only=True``);
its tensors are read by DCP with ``weights_only=True`` already. That stops code execution, not forged
weights: with a key configured (:data:`KEY_ENV` or :data:`KEY_FILE_ENV`) rank 0 signs each checkpoint
(HMAC-SHA256 over its folder name, a random nonce, ``meta.json``'s state and the SHA-256 of every
other file) and a resume refuses, before torch opens any file, a checkpoint whose signature does not
verify, an unsigned one included. Rank 0 verifies and broadcasts the verdict (hashing on every rank
would read the whole checkpoint ``world`` times); files changed between that check and DCP's reads,
seconds later, are not caught.

Per-rank memory: what ``state_dict`` views already hold (no copies of the tables), plus the RNG
states; DCP streams each rank's shards to its own files. Signing and verifying run on rank 0 only and
hold one read buffer (:data:`cstwa_dist.fs.HASH_CHUNK`) at a time, whatever the checkpoint's size;
they read every file of the checkpoint once.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import enum
import hashlib
import hmac
import io
import json
import logging
import os
import pathlib
import pickle
import random
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem

from cstwa_dist.distributed.collectives import broadcast_object
from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.fs import atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

META = "meta.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
RNG_FORMAT = "cstwa-rng"
RNG_VERSION = 1
#: the signing key itself (a Kubernetes Secret exposed as an environment variable)
KEY_ENV = "CSTWA_CHECKPOINT_KEY"
#: a file holding the signing key (a Kubernetes Secret mounted as a volume); trailing whitespace dropped
KEY_FILE_ENV = "CSTWA_CHECKPOINT_KEY_FILE"
SIGNATURE = "signature"
_SIGNATURE_FORMAT = "cstwa-checkpoint-hmac-sha256"
_SIGNATURE_VERSION = 1
_warned_unsigned = False


class CheckpointRefused(RuntimeError):
    """A checkpoint that is not read: its signature does not verify, or a file of it is not what this
    project writes (a planted pickle). The message names the checkpoint, the reason and what to do."""


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
    # [shares, rows per share and step] of the training reader: what a step of an epoch reads;
    # [] in checkpoints written before it was recorded
    data_position: list[int] = field(default_factory=list)

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


def _read_meta_raw(path: Path) -> dict[str, Any]:
    """``meta.json`` as a dict (JSON only); a file that is not a JSON object is refused by name."""
    file = Path(path) / META
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointRefused(
            f"{file}: not the JSON this project writes ({e}); refused: the checkpoint is damaged or was "
            "planted. Remove it and resume from another one"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointRefused(
            f"{file}: not a JSON object; refused: the checkpoint is damaged or was planted"
        )
    return raw


def read_meta(path: str | Path) -> TrainState:
    """The :class:`TrainState` of the checkpoint at ``path`` (its signature, if any, left aside)."""
    raw = _read_meta_raw(Path(path))
    raw.pop(SIGNATURE, None)
    names = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CheckpointRefused(f"{Path(path) / META}: unknown fields {unknown}; not written by this version")
    return TrainState(**raw)


# --- signing ------------------------------------------------------------------------------------


def signing_key() -> bytes | None:
    """The checkpoint signing key from :data:`KEY_ENV` or the file :data:`KEY_FILE_ENV` names; None
    when neither is set (checkpoints are then unsigned). Both set, an empty key or an unreadable key
    file are errors: a job meant to sign must not silently run unsigned."""
    value, file = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if value is not None and file is not None:
        raise ValueError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set one of them")
    if file is not None:
        try:
            key = Path(file).read_bytes().rstrip()
        except OSError as e:
            raise ValueError(f"{KEY_FILE_ENV}={file}: cannot read the checkpoint signing key ({e})") from None
        source = f"{KEY_FILE_ENV}={file}"
    elif value is not None:
        key, source = value.encode(), KEY_ENV
    else:
        return None
    if not key:
        raise ValueError(f"{source}: the checkpoint signing key is empty")
    return key


def _file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but ``meta.json``, by relative POSIX path, sorted.
    Reads one :data:`~cstwa_dist.fs.HASH_CHUNK` at a time; a symlink or other non-regular entry is an error (a
    signed checkpoint holds regular files only)."""
    digests: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise CheckpointRefused(f"{p}: not a regular file (a symlink or device)")
        if p.is_dir() or rel == META:
            continue
        digests[rel] = sha256_file(p)
    return digests


def _mac(key: bytes, name: str, nonce: str, state: dict[str, Any], files: dict[str, str]) -> str:
    """HMAC-SHA256 over a canonical JSON of the checkpoint's identity (folder name, nonce), its state
    and its files' digests: a ``meta.json`` copied into another folder, or next to other files, fails."""
    body = {
        "format": _SIGNATURE_FORMAT,
        "version": _SIGNATURE_VERSION,
        "name": name,
        "nonce": nonce,
        "state": state,
        "files": files,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign(folder: Path, name: str, state: dict[str, Any], key: bytes) -> dict[str, Any]:
    """The ``signature`` entry of ``meta.json`` for the files now in ``folder``, which will be named
    ``name``."""
    nonce = secrets.token_hex(16)
    files = _file_digests(folder)
    return {
        "format": _SIGNATURE_FORMAT,
        "version": _SIGNATURE_VERSION,
        "nonce": nonce,
        "files": files,
        "mac": _mac(key, name, nonce, state, files),
    }


def verify(path: Path, key: bytes) -> None:
    """Raises :class:`CheckpointRefused` unless ``path``'s signature verifies under ``key``: reads
    ``meta.json`` (JSON) and hashes the files; opens nothing with torch."""
    raw = _read_meta_raw(path)
    sig = raw.pop(SIGNATURE, None)
    what = "do not resume from it (remove it, or --resume another checkpoint)"
    if sig is None:
        raise CheckpointRefused(
            f"{path}: unsigned checkpoint, and a signing key is configured ({KEY_ENV} or {KEY_FILE_ENV}): "
            "refused. If this job wrote it before signing was switched on and you trust it, resume once "
            "with both variables unset; the checkpoints written after that are signed"
        )
    if not (
        isinstance(sig, dict)
        and sig.get("format") == _SIGNATURE_FORMAT
        and sig.get("version") == _SIGNATURE_VERSION
        and isinstance(sig.get("nonce"), str)
        and isinstance(sig.get("mac"), str)
        and isinstance(sig.get("files"), dict)
    ):
        raise CheckpointRefused(f"{path}: malformed signature in {META}; {what}")
    expected = _mac(key, path.name, sig["nonce"], raw, sig["files"])
    if not hmac.compare_digest(expected, sig["mac"]):
        raise CheckpointRefused(
            f"{path}: the signature in {META} does not verify (another key, an edited {META}, a renamed "
            f"folder or a {META} copied from another checkpoint); {what}"
        )
    actual = _file_digests(path)
    listed = sig["files"]
    for rel in sorted(set(listed) | set(actual)):
        if rel not in actual:
            raise CheckpointRefused(f"{path}: signed file {rel} is missing; {what}")
        if rel not in listed:
            raise CheckpointRefused(f"{path}: file {rel} is not in the signature (planted); {what}")
        if not hmac.compare_digest(actual[rel], listed[rel]):
            raise CheckpointRefused(f"{path}: file {rel} differs from what was signed (tampered); {what}")


def _warn_unsigned_once() -> None:
    global _warned_unsigned
    if not _warned_unsigned:
        _warned_unsigned = True
        logger.warning(
            "checkpoints are unsigned: resume only checkpoints this job wrote, or set %s (or %s) to sign "
            "and verify them",
            KEY_ENV,
            KEY_FILE_ENV,
        )


# --- reading DCP files without unpickling code ----------------------------------------------------

_METADATA_MODULES = {m.__name__: m for m in (dcp_metadata, dcp_filesystem)}
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}


class _MetadataUnpickler(pickle._Unpickler):
    """Admits only the globals a DCP ``.metadata`` holds: DCP's metadata dataclasses and enums, torch
    sizes, dtypes and layouts, paths. Anything else (``os.system``, ``builtins.eval``, …) is refused
    before it is looked up, so a planted pickle cannot run code (the idea of ``weights_only``). The
    Python implementation, so that ``BUILD`` can be refused on a class too (setting attributes of an
    admitted class would change it for the whole process)."""

    def find_class(self, module: str, name: str) -> Any:
        obj: Any = None
        if module in _METADATA_MODULES:
            obj = getattr(_METADATA_MODULES[module], name, None)
            if not (isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                obj = None
        elif module == "torch":
            obj = getattr(torch, name, None) if name == "Size" or not name.startswith("_") else None
            if obj is not torch.Size and not isinstance(obj, torch.dtype):
                obj = None
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = torch.serialization._get_layout
        elif module == "pathlib" and name in _PATHS:
            obj = getattr(pathlib, name)
        elif (module, name) == ("collections", "OrderedDict"):
            obj = collections.OrderedDict
        if obj is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which DCP metadata never holds")
        return obj

    def _load_build(self) -> None:
        if isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError("sets attributes of a class, which DCP metadata never does")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}  # type: ignore[attr-defined]


def read_dcp_metadata(path: str | os.PathLike[str]) -> dcp_metadata.Metadata:
    """A DCP ``.metadata`` file read by :class:`_MetadataUnpickler`; anything else than DCP metadata
    raises :class:`CheckpointRefused` (no code in it runs)."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # any way a parser of untrusted bytes can fail (struct.error, KeyError, …)
        raise CheckpointRefused(
            f"{path}: not a DCP metadata file as this project writes them ({e}); refused unread: it is "
            "damaged or was planted. Remove the checkpoint and resume from another one"
        ) from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointRefused(f"{path}: holds a {type(metadata).__name__}, not DCP metadata; refused")
    return metadata


class SafeMetadataReader(FileSystemReader):
    """DCP's file-system reader with ``.metadata`` read by :func:`read_dcp_metadata` instead of
    ``pickle.load`` (the reader DCP uses on every rank that reads metadata)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with its non-tensor items read with ``weights_only=True`` (the
    default one unpickles them in full)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointRefused(
                f"DCP item {read_item.dest_index.fqn}: not plain data ({str(e).splitlines()[0]}); refused"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class Checkpointer:
    """Saves, finds, loads and prunes the checkpoints of one run (every rank calls every method)."""

    def __init__(self, root: str | Path, env: DistEnv, keep: int) -> None:
        self.root = Path(root)
        self.env = env
        self.keep = keep
        self.key = signing_key()  # every rank reads it (a bad setting fails on every rank alike)
        if self.key is None and env.is_main:
            _warn_unsigned_once()

    # --- saving --------------------------------------------------------------------------------
    def save(self, dmp: torch.nn.Module, optimizer: Any, state: TrainState) -> Path:
        """Writes a checkpoint of ``state`` atomically (signed when a key is configured); returns its
        folder (every rank)."""
        name = f"{PREFIX}{state.global_step:09d}"
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        atomic_write_json(tmp / f"rng-rank{self.env.rank}.json", _rng_state(), sort_keys=False)
        self._barrier()  # every rank's files are in place before the checkpoint becomes visible
        if self.env.is_main:
            # signed as it will read back (a JSON round trip: tuples become lists, odd values strings)
            meta: dict[str, Any] = json.loads(json.dumps(asdict(state), default=str))
            if self.key is not None:
                meta[SIGNATURE] = sign(tmp, name, dict(meta), self.key)
            atomic_write_json(tmp / META, meta, sort_keys=False)
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
        epoch_ends = [p for p in done if _epoch_end(p)]
        if epoch_ends:
            keep.add(epoch_ends[-1])
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # --- finding and loading ---------------------------------------------------------------------
    def find(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` names ("auto": the newest this world size can continue exactly).

        Rank 0 alone lists and reads the folders and broadcasts its choice (or its error, raised
        with the same type and message on every rank): ranks listing a shared volume on their own
        could see different folders (a save renamed between two listings, a lagging network-volume
        cache) and resume from different checkpoints.
        """
        if resume == "never":
            return None
        outcome: tuple[str, str | None] | None = None
        if self.env.is_main:
            try:
                path = self._choose(resume)
                outcome = ("path", None if path is None else str(path))
            except (FileNotFoundError, ValueError, CheckpointRefused) as e:
                outcome = (type(e).__name__, str(e))
            except Exception as e:  # never leave the other ranks waiting for the choice
                outcome = ("RuntimeError", f"choosing the checkpoint to resume failed on rank 0: {e!r}")
        outcome = broadcast_object(outcome)  # type: ignore[assignment]
        assert outcome is not None
        kind, value = outcome
        if kind == "path":
            return None if value is None else Path(value)
        error = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(kind)
        raise (error or (CheckpointRefused if kind == "CheckpointRefused" else RuntimeError))(value)

    def _choose(self, resume: str) -> Path | None:
        """:meth:`find`'s choice on this rank's view of the files (rank 0 only)."""
        if resume != "auto":
            path = Path(resume)
            _check_named_folder(path, resume)
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
        """Restores tensors (and, on the same world size, RNG states) from ``path``; returns its state.

        With a key configured, rank 0 verifies the signature first and every rank gets its verdict:
        no rank opens a torch file of a checkpoint that does not verify, and all raise the same error.
        """
        self._verify(path)
        state = read_meta(path)
        # Adam's state exists only after a step; without it the loaded state would be dropped silently
        # (docs/platform-notes.md). The dummy step's changes are overwritten by the load below.
        optimizer.init_state()
        target = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
        try:
            dcp.load(
                target,
                checkpoint_id=str(path),
                storage_reader=SafeMetadataReader(str(path)),
                planner=SafeLoadPlanner(),
            )
        except CheckpointException as e:  # every rank gets every rank's failures: the same verdict
            refused = _refusal(e)
            if refused is None:
                raise
            raise CheckpointRefused(f"{path}: {refused}") from None
        dmp.load_state_dict(target["model"])
        optimizer.load_state_dict(target["optim"])
        if state.world_size == self.env.world_size:
            _load_rng(path, self.env.rank)
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

    def _verify(self, path: Path) -> None:
        """Rank 0 verifies ``path``'s signature (when a key is configured), then checks its DCP
        ``.metadata`` with the allowlist unpickler, and broadcasts the verdict: every rank raises the
        same one-line error, and none has opened a torch file of a checkpoint that fails."""
        verdict: str | None = None
        if self.env.is_main:
            try:
                if self.key is not None:
                    verify(path, self.key)
                    logger.info("signature of %s verified", path)
                read_dcp_metadata(path / ".metadata")
            except (CheckpointRefused, OSError) as e:
                verdict = str(e)
            except Exception as e:  # never leave the other ranks waiting for a verdict
                verdict = f"{path}: could not be verified ({type(e).__name__}: {e}); refused"
        verdict = broadcast_object(verdict)  # type: ignore[assignment]
        if verdict is not None:
            raise CheckpointRefused(verdict)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.env.world_size > 1:
            dist.barrier()


def _refusal(e: CheckpointException) -> str | None:
    """The first line of a refusal among a DCP load's failures: a file the safe reader or planner
    refused, or a tensor file torch's ``weights_only`` loader refused; None for other failures."""
    for exc, _ in e.failures.values():
        if isinstance(exc, CheckpointRefused):
            return str(exc)
        if isinstance(exc, pickle.UnpicklingError):
            return f"a DCP data file holds more than plain tensors ({str(exc).splitlines()[0]}); refused"
    return None


def _check_named_folder(path: Path, resume: str) -> None:
    """An explicit ``--resume`` folder: one error per way it can fail to be a complete checkpoint."""
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such folder")
    if not (path / META).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint folder (no {META}: unfinished or not a checkpoint)"
        )
    if not path.name.startswith(PREFIX):
        hint = f" ({TMP_PREFIX}… is a save that never finished)" if path.name.startswith(TMP_PREFIX) else ""
        raise ValueError(
            f"--resume {resume}: holds {META}, but a checkpoint folder is named {PREFIX}<global step> "
            f"(its name is part of what is signed){hint}; rename it back to the name it was saved under"
        )


def _epoch_end(path: Path) -> bool:
    """Whether ``path`` closes an epoch; a damaged ``meta.json`` counts as not (prune keeps it only
    among the newest)."""
    try:
        return read_meta(path).epoch_end
    except CheckpointRefused:
        return False


# --- RNG states as JSON ---------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values (no pickle: see the module docstring).

    ``cuda`` holds one base64 state per visible CUDA device (``torch.cuda.get_rng_state_all``; ``[]``
    without CUDA). :func:`_set_rng_state` restores it when as many devices are visible; a file
    without it (saved on CPU, or before it was written) restores the CPU streams only.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "format": RNG_FORMAT,
        "version": RNG_VERSION,
        "torch": _b64(torch.get_rng_state()),
        "cuda": cuda,
        "numpy": {
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    if (
        not isinstance(state, dict)
        or state.get("format") != RNG_FORMAT
        or state.get("version") != RNG_VERSION
    ):
        raise ValueError(f"not a {RNG_FORMAT} v{RNG_VERSION} object")
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []  # absent or empty: saved without CUDA; CPU streams only
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
        else:
            logger.warning(
                "RNG state saved for %d CUDA device(s), this process sees %d: CUDA random streams restart",
                len(cuda),
                torch.cuda.device_count(),
            )
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.asarray(n["keys"], dtype=np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached"]),
        )
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss"]))


def _load_rng(path: Path, rank: int) -> None:
    """Restores this rank's RNG states from ``rng-rank<rank>.json``; an old pickled ``.pt`` is never
    opened (the run continues with fresh random streams and says so)."""
    file = path / f"rng-rank{rank}.json"
    if not file.is_file():
        if (path / f"rng-rank{rank}.pt").is_file():
            logger.warning(
                "%s: RNG states in the old pickled format are not read (unsafe); random streams restart", path
            )
        return
    try:
        _set_rng_state(json.loads(file.read_text()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointRefused(
            f"{file}: not the RNG-state JSON this project writes ({e}); refused: the checkpoint is damaged "
            "or was planted. Remove it and resume from another one"
        ) from None
