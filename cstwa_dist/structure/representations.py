"""Pre-trained representations on disk: one part per rank and a manifest, read back by row range.

What ``pretrain`` writes next to the graphs when ``structure.save_representations`` is on, and what
``structure.sm_init=pretrained`` (:func:`cstwa_dist.structure.migrator.pretrained_rows`) and
``bench knn --representations`` read. A module of its own, without TorchRec, so that a process that only
reads or writes representations (a bench rank, a test rank) does not pay TorchRec's import.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cstwa_dist.distributed.exchange import all_gather_ints, check_ranges, comm_device, raise_together, world
from cstwa_dist.fs import atomic_path, atomic_write_json, check_parts_cover, read_manifest, sha256_file

logger = logging.getLogger(__name__)

# --- pre-trained representations: one part per rank, a manifest, read by row range ----------------

REPR_FORMAT = "cstwa-representation-parts"
REPR_FORMAT_VERSION = 1
_REPR_DTYPE = np.dtype("<f4")
_REPR_PART = re.compile(r"^part-\d{5}-of-\d{5}\.npy$")
_REPR_SIDE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def representations_dir(graph_dir: str | Path, side: str) -> Path:
    """``<graph_dir>/<side>_representations/``: the parts and ``manifest.json`` of one side."""
    if not isinstance(side, str) or not _REPR_SIDE.match(side):
        raise ValueError(f"side must be a plain name like 'user' or 'item', got {side!r}")
    return Path(graph_dir) / f"{side}_representations"


def _legacy_representations(graph_dir: str | Path, side: str) -> Path:
    """The old layout's single ``[N, w]`` file, which is no longer written or read."""
    return Path(graph_dir) / f"{side}_representations.npy"


def _repr_part_name(index: int, world_size: int) -> str:
    return f"part-{index:05d}-of-{world_size:05d}.npy"


def _digest_ints(hexdigest: str) -> list[int]:
    """A SHA-256 as four signed int64s, so that it travels in an ``all_gather_ints`` (no pickling)."""
    raw = bytes.fromhex(hexdigest)
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]


def _digest_hex(values: Sequence[int]) -> str:
    return b"".join(int(v).to_bytes(8, "little", signed=True) for v in values).hex()


def save_representations(
    graph_dir: str | Path, side: str, block: np.ndarray, ranges: Sequence[tuple[int, int]]
) -> Path:
    """Write this rank's rows ``ranges[rank]`` of the ``[N, w]`` representations as its own part under
    ``<graph_dir>/<side>_representations/``; rank 0 writes ``manifest.json`` last. Collective; every
    rank calls it, ``graph_dir`` must be a file system every rank sees. Returns the folder.

    Why parts and not one shared file: ranks writing their rows of one ``.npy`` through memory maps
    lose rows on network volumes, which write a dirty page back whole: rank boundaries are not page
    aligned, so a rank's stale copy of a boundary page can overwrite its neighbour's rows. Here no two
    ranks ever write the same file.

    Order (as ``sharded_graph.save_graph_shard``): (1) every rank checks its block and rank 0 removes
    an old manifest (and the old single-file layout's ``<side>_representations.npy``), so a reader
    meanwhile sees an incomplete folder, never a manifest over mixed parts; the ranks agree on the
    width; (2) every rank writes ``part-<r>-of-<W>.npy`` atomically (temp file, fsync, rename;
    ``np.save`` with ``allow_pickle=False``) and hashes it; (3) after all ranks have written, rank 0
    checks each part is visible with the size its writer saw, writes the manifest (world size, ``N``,
    width, dtype, per part ``[lo, hi)``, byte size and SHA-256) and removes parts of earlier writes it
    does not list. A failure on any rank raises on every rank (none is left in a collective).

    Per-rank memory: the rank's own block (``n_r·w·4`` B, plus one copy when it is not C-contiguous
    float32), one hashing chunk (``fs.HASH_CHUNK``) and ``O(W)`` ints of sizes and digests.
    """
    rank, size = world()
    dev = comm_device()
    error: BaseException | None = None
    out = representations_dir(graph_dir, side)
    width = int(block.shape[1]) if getattr(block, "ndim", 0) == 2 else -1
    try:
        n_total = check_ranges(ranges, size)
        lo, hi = int(ranges[rank][0]), int(ranges[rank][1])
        if width < 0 or block.shape[0] != hi - lo:
            raise ValueError(
                f"rank {rank}: representations block of shape {tuple(block.shape)} for rows [{lo}, {hi}): "
                f"need a [{hi - lo}, w] array"
            )
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").unlink(missing_ok=True)
            legacy = _legacy_representations(graph_dir, side)
            if legacy.exists():
                legacy.unlink()
                logger.info("removed %s: the old single-file layout, replaced by %s", legacy, out)
    except (OSError, ValueError) as e:
        error = e
    raise_together(error, dev)
    widths = [row[0] for row in all_gather_ints([width], dev)]
    if len(set(widths)) != 1:  # every rank sees the same list, so every rank raises
        raise ValueError(f"{side} representations: the ranks' blocks have different widths {widths}")

    name = _repr_part_name(rank, size)
    digest, nbytes = "0" * 64, 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(block, dtype=_REPR_DTYPE), allow_pickle=False)
        digest, nbytes = sha256_file(out / name), (out / name).stat().st_size
    except OSError as e:
        error = OSError(f"rank {rank}: writing {out / name} failed: {e}")
    raise_together(error, dev)

    written = all_gather_ints([nbytes, *_digest_ints(digest)], dev)
    if rank == 0:
        try:
            parts = []
            for r, (plo, phi) in enumerate(ranges):
                part = out / _repr_part_name(r, size)
                seen = part.stat().st_size if part.is_file() else None
                if seen != written[r][0]:
                    raise FileNotFoundError(
                        f"{part}: rank {r} wrote {written[r][0]} bytes but rank 0 sees "
                        f"{'no file' if seen is None else f'{seen} bytes'}; graph_dir must be on a file "
                        "system shared by all ranks"
                    )
                parts.append(
                    {
                        "index": r,
                        "lo": int(plo),
                        "hi": int(phi),
                        "file": part.name,
                        "bytes": int(written[r][0]),
                        "sha256": _digest_hex(written[r][1:]),
                    }
                )
            manifest = {
                "format": REPR_FORMAT,
                "version": REPR_FORMAT_VERSION,
                "side": side,
                "n_total": n_total,
                "width": widths[0],
                "dtype": "float32",
                "world_size": size,
                "parts": parts,
            }
            atomic_write_json(out / "manifest.json", manifest, sort_keys=False)
            listed = {p["file"] for p in parts}
            for stale in out.iterdir():
                if _REPR_PART.match(stale.name) and stale.name not in listed:
                    stale.unlink(missing_ok=True)
            logger.info(
                "%s representations: %d rows of width %d in %d part(s) → %s",
                side,
                n_total,
                widths[0],
                size,
                out,
            )
        except OSError as e:
            error = e
    raise_together(error, dev)
    return out


def read_representation_manifest(graph_dir: str | Path, side: str) -> tuple[Path, dict[str, Any]]:
    """The checked manifest of ``<graph_dir>/<side>_representations/`` and its folder.

    Raises FileNotFoundError when it is missing (naming the old single-file layout when that is what
    is there: it must be re-mined) and ValueError for a manifest that is not valid JSON of this format
    or whose parts do not cover ``[0, N)`` in order. Never unpickles anything (JSON only).
    """
    out = representations_dir(graph_dir, side)
    path = out / "manifest.json"
    if not path.is_file():
        legacy = _legacy_representations(graph_dir, side)
        if legacy.exists():
            raise FileNotFoundError(
                f"{legacy} is the old single-file layout of the pre-trained {side} representations (one "
                "[N, w] file all ranks wrote through memory maps, which can lose rows on network file "
                "systems) and is no longer read: re-mine it with `cstwa-dist pretrain` and this "
                f"structure.graph_dir, which writes {out}/ (one part per rank and manifest.json); an "
                f"experiment reuses a mined directory, so delete {Path(graph_dir)} first"
            )
        raise FileNotFoundError(
            f"{path} not found: the pre-trained {side} representations are missing or incomplete (the "
            "manifest is written last, after every rank's part); run `cstwa-dist pretrain` with "
            "structure.save_representations=true (the default) and the same structure.graph_dir"
        )
    m = read_manifest(path, REPR_FORMAT, REPR_FORMAT_VERSION)
    n_total, width, parts = m.get("n_total"), m.get("width"), m.get("parts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (n_total, width)):
        raise ValueError(f"{path}: needs non-negative integers n_total and width, got {n_total!r}, {width!r}")
    if m.get("dtype") != "float32":
        raise ValueError(f"{path}: dtype {m.get('dtype')!r}, expected 'float32'")
    if not isinstance(parts, list) or not parts or m.get("world_size") != len(parts):
        raise ValueError(f"{path}: needs one part per writing rank (world_size {m.get('world_size')!r})")
    for i, p in enumerate(parts):
        ok = (
            isinstance(p, dict)
            and all(
                isinstance(p.get(k), int) and not isinstance(p.get(k), bool) for k in ("lo", "hi", "bytes")
            )
            and isinstance(p.get("file"), str)
            and bool(_REPR_PART.match(p["file"]))
            and isinstance(p.get("sha256"), str)
            and bool(_SHA256.match(p["sha256"]))
        )
        if not ok:
            raise ValueError(f"{path}: part {i} needs integer lo, hi, bytes, a part file name and a sha256")
    check_parts_cover(path, parts, n_total)
    return out, m


def _open_repr_part(out: Path, part: dict[str, Any], width: int, verify: bool) -> np.ndarray:
    """One part, memory-mapped after its size (and with ``verify`` its SHA-256) matched the manifest."""
    path = out / part["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: listed in {out / 'manifest.json'} but missing; the representations are incomplete: "
            "re-mine them with `cstwa-dist pretrain`"
        )
    size = path.stat().st_size
    if size != part["bytes"]:
        raise ValueError(
            f"{path}: {size} bytes but the manifest lists {part['bytes']} (a short or replaced part); "
            "re-mine with `cstwa-dist pretrain`"
        )
    if verify and sha256_file(path) != part["sha256"]:
        raise ValueError(
            f"{path}: content does not match the manifest's sha256; re-mine with `cstwa-dist pretrain`"
        )
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable part file ({e})") from None
    rows = part["hi"] - part["lo"]
    if arr.ndim != 2 or arr.shape != (rows, width) or arr.dtype != _REPR_DTYPE:
        raise ValueError(
            f"{path}: expected rows [{part['lo']}, {part['hi']}) as a [{rows}, {width}] float32 array, found "
            f"shape {tuple(arr.shape)} {arr.dtype}"
        )
    return arr


def _representation_rows(out: Path, m: dict[str, Any], lo: int, hi: int, verify: bool) -> np.ndarray:
    n_total, width = int(m["n_total"]), int(m["width"])
    if any(isinstance(v, bool) or int(v) != v for v in (lo, hi)) or not 0 <= int(lo) <= int(hi) <= n_total:
        raise ValueError(f"rows [{lo}, {hi}) outside [0, {n_total}) of {out / 'manifest.json'}")
    lo, hi = int(lo), int(hi)
    rows = np.empty((hi - lo, width), dtype=np.float32)
    for p in m["parts"]:
        a, b = max(lo, p["lo"]), min(hi, p["hi"])
        if a >= b:
            continue
        arr = _open_repr_part(out, p, width, verify)
        rows[a - lo : b - lo] = arr[a - p["lo"] : b - p["lo"]]
        del arr  # closes the map
    return rows


def representation_shape(graph_dir: str | Path, side: str) -> tuple[int, int]:
    """``(N, w)`` of the saved representations of ``side``, from the manifest alone."""
    _, m = read_representation_manifest(graph_dir, side)
    return int(m["n_total"]), int(m["width"])


def representation_rows(
    graph_dir: str | Path, side: str, lo: int, hi: int, *, verify: bool = True
) -> np.ndarray:
    """Rows ``[lo, hi)`` of the saved ``[N, w]`` representations (float32), from whichever parts
    overlap them, so parts written by ``W`` ranks are read at any other world size. Not collective.

    Each overlapping part is checked against the manifest (size; with ``verify``, its SHA-256, which
    reads the whole part once; then shape and dtype) and memory-mapped with ``allow_pickle=False``;
    only the requested rows are copied out. Errors are one line naming the file and what is wrong.

    Per-rank memory: the returned ``(hi − lo)·w·4`` B plus one hashing chunk; the manifest is ``O(W)``.
    """
    out, m = read_representation_manifest(graph_dir, side)
    return _representation_rows(out, m, lo, hi, verify)
