"""Atomic writes: every result file and data set appears whole or not at all.

A reader that polls for a file (``dataset_complete``, ``structure_complete``, an experiment's finished
cells, ``--resume``) must never see a half-written one, even when the writer is killed mid-write. Both
helpers write next to the destination (same file system, so the final ``rename`` is atomic) under a
name that carries the writer's pid, and only then rename into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a sibling temp path to write; renames it to ``path`` when the block succeeds.

    For writers that want a path or a file handle (``torch.save``, pyarrow); on an exception the temp
    file is removed and ``path`` keeps its old content (or stays absent). The temp file is fsynced
    before the rename, so after a crash ``path`` holds either the old or the complete new content.
    Creates parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


HASH_CHUNK = 1 << 20  # bytes read at a time while hashing a file


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read :data:`HASH_CHUNK` at a time (memory: one chunk), for the
    digests checkpoints are signed over and exported model folders list in their manifests."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` to ``path`` through a sibling temp file and a rename; creates parent folders."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any, *, sort_keys: bool = True) -> Path:
    """``payload`` as indented JSON (non-JSON values through ``str``), written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str))


def check_fresh_output(out: str | Path, what: str = "data set") -> Path:
    """Refuses an ``out`` that exists and is not an empty folder: a data set is never overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not an empty directory; a {what} is never overwritten. "
            "Remove it or choose another output folder."
        )
    return out


@contextlib.contextmanager
def staged_directory(out: str | Path, what: str = "data set") -> Iterator[Path]:
    """Yields a fresh sibling ``<out>.tmp-<pid>`` folder; renames it to ``out`` when the block succeeds.

    On an exception the staging folder is removed and ``out`` is untouched, so a crash never leaves a
    half-written ``out``. ``out`` must not exist or be empty, before and (checked again) after the work.
    """
    out = check_fresh_output(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_fresh_output(out, what)  # someone may have created it meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: Path, fmt: str, version: int) -> dict[str, Any]:
    """The JSON object of a parts manifest at ``path`` (a graph's, the pre-trained representations'),
    checked to be ``fmt`` at ``version``; ``ValueError`` naming the file otherwise. JSON only: a
    manifest is never unpickled."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} manifest")
    if m.get("version") != version:
        raise ValueError(f"{path}: unsupported manifest version {m.get('version')!r}")
    return m


def check_parts_cover(path: Path, parts: list[dict[str, Any]], n_total: int) -> None:
    """The parts of the manifest at ``path`` cover rows ``[0, n_total)`` in order, each ``[lo, hi)``
    starting where the previous one ended; ``ValueError`` naming the file and the first gap otherwise."""
    pos = 0
    for i, p in enumerate(parts):
        if p["lo"] != pos or p["hi"] < p["lo"]:
            raise ValueError(
                f"{path}: parts must cover [0, {n_total}) in order; part {i} is [{p['lo']}, {p['hi']})"
            )
        pos = p["hi"]
    if pos != n_total:
        raise ValueError(f"{path}: parts cover [0, {pos}) but n_total is {n_total}")
