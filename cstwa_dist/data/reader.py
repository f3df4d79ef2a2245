"""Ray Data streaming reader: one rank's share of a Parquet split → fixed-size :class:`Batch` objects.

Why it looks like this (docs/platform-notes.md, "Ray Data inside a torchrun job"):

* **One Ray runtime per node**, attached to by every rank (``distributed/runtime.py``).
* **Shares planned from Parquet metadata.** :func:`plan_shares` assigns whole files to ranks, greedy
  largest-first by row count, so every rank knows every share without reading data or talking to the
  others, and ``steps_per_epoch`` is agreed up front.
* **Equal steps, nothing dropped, nothing counted twice (padding policy).** Every rank runs exactly
  ``steps_per_epoch = ceil(max_rank_rows / batch_size)`` batches of exactly ``batch_size`` rows, so no
  collective (DMP all-to-alls, all-reduces) can hang on a rank that ran out of data. Real rows carry
  ``mask=True``. A rank's last partial batch is filled up, and the extra steps of a rank whose share is
  shorter than the longest are made entirely of, *copies of real rows of this rank* with ``mask=False``
  (so the embedding lookups see realistic ids; the loss gives them weight 0). A rank with no rows at
  all pads with id 0 in every field (a valid id) and labels 0, also ``mask=False``, and logs a warning
  once. The masked-in rows of all ranks together are the split, each row exactly once.
* **Shuffle that streams.** With ``shuffle=True`` each epoch reads the rank's files in an order
  permuted with ``seed + epoch`` and passes the rows through Ray's local shuffle buffer seeded with
  ``seed + epoch``; blocks are consumed in order (``preserve_order``), so the same seed and epoch give
  the same batches and another epoch gives another order. File-order permutation is used instead of
  ``randomize_block_order`` because the latter is an all-to-all step that materialises the whole share
  in the object store before the first batch. ``shuffle=False`` yields rows in file order.
* **Validation that loses nothing.** The schema of every file is checked from the footer at
  construction; each streamed batch is checked with a few vectorised reductions; on failure the rank's
  files are re-scanned with pyarrow to name the first bad (file, row, field, value) in a
  :class:`DataError`. Bad rows are never dropped or clamped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from cstwa_dist.data.batch import Batch, make_kjt
from cstwa_dist.data.spec import LABELS, DatasetSpec, split_files
from cstwa_dist.data.validate import DataError, check_batch, check_schema, locate_first_error
from cstwa_dist.distributed.runtime import quiet_ray_loggers

__all__ = [
    "DataError",
    "SplitReader",
    "measure_input_rate",
    "plan_shares",
]

log = logging.getLogger(__name__)

# Rows held by Ray's local shuffle buffer (per rank). Large enough to mix rows across several
# row groups/files, small enough to stay a few MB: a row is ~8 bytes per field.
DEFAULT_SHUFFLE_BUFFER_ROWS = 65536


def _row_counts(files: list[Path]) -> list[int]:
    return [pq.read_metadata(f).num_rows for f in files]


def _plan(rows: list[int], world_size: int) -> list[list[int]]:
    """Greedy largest-first: each file (largest first, ties by index) goes to the least-loaded rank
    (ties by lowest rank). Within a rank, files keep their original order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(rows)), key=lambda j: (-rows[j], j)):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        shares[r].append(i)
        loads[r] += rows[i]
    return [sorted(s) for s in shares]


def plan_shares(files: list[Path], world_size: int) -> list[list[Path]]:
    """Files per rank, balanced by Parquet-metadata row counts (greedy largest-first), deterministic.

    Whole files are the unit so each rank reads its own files with no coordination; balance is then as
    good as the file sizes allow (write more, smaller files for more ranks). Every rank computes the
    same plan from the same sorted file list.
    """
    files = [Path(f) for f in files]
    return [[files[i] for i in share] for share in _plan(_row_counts(files), world_size)]


class SplitReader:
    """Streams this rank's share of ``<dataset>/<split>/*.parquet`` as fixed-size, masked batches.

    See the module docstring for the padding, shuffle and validation policies. Construction reads only
    Parquet footers (schema check, row counts, share plan); data is read lazily in :meth:`epoch`.
    """

    rows: int
    total_rows: int
    steps_per_epoch: int
    files: list[Path]

    def __init__(
        self,
        dataset: str | Path,
        split: str,
        spec: DatasetSpec,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        prefetch_batches: int = 2,
        shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = Path(dataset)
        self.split = split
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.prefetch_batches = prefetch_batches
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, batch_size)
        self.columns = [*spec.names, *LABELS]

        all_files = split_files(self.dataset, split)
        counts = []
        for f in all_files:
            meta = pq.read_metadata(f)  # footer only
            check_schema(f, spec, meta.schema.to_arrow_schema())
            counts.append(meta.num_rows)
        plan = _plan(counts, world_size)
        share_rows = [sum(counts[i] for i in share) for share in plan]
        self.files = [all_files[i] for i in plan[rank]]
        self.rows = share_rows[rank]
        self.total_rows = sum(counts)
        self.steps_per_epoch = math.ceil(max(share_rows) / batch_size)
        if self.rows == 0:
            log.warning(
                "rank %d/%d has no rows of split %r (%d files for %d ranks): it will run %d "
                "all-padding steps per epoch; write more, smaller files to use every rank",
                rank,
                world_size,
                split,
                len(all_files),
                world_size,
                self.steps_per_epoch,
            )
        log.info(
            "rank %d: %s split %d/%d rows in %d files, %d steps/epoch of %d",
            rank,
            split,
            self.rows,
            self.total_rows,
            len(self.files),
            self.steps_per_epoch,
            batch_size,
        )

    # --- batches ---------------------------------------------------------------------------------
    def _batch(self, cols: dict[str, np.ndarray], n_real: int) -> Batch:
        """Tensors + KJT from numpy columns; rows ``>= n_real`` are padding (mask False)."""
        ids = {name: torch.from_numpy(np.array(cols[name], dtype=np.int64)) for name in self.spec.names}
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[:n_real] = True
        return Batch(
            features=make_kjt(ids, self.spec.names),
            click=torch.from_numpy(np.asarray(cols["click"], dtype=np.float32)),
            purchase=torch.from_numpy(np.asarray(cols["purchase"], dtype=np.float32)),
            mask=mask,
        )

    def _padded(self, cols: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Fills ``n`` real rows up to batch_size by cycling over them (copies, not new data)."""
        idx = np.arange(self.batch_size) % n
        return {k: v[idx] for k, v in cols.items()}

    def _zeros(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(self.batch_size, dtype=np.int64) for k in self.columns}

    def _epoch_files(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return list(self.files)
        perm = np.random.default_rng(self.seed + epoch).permutation(len(self.files))
        return [self.files[i] for i in perm]

    def _stream(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        import ray.data

        quiet_ray_loggers()
        ds = ray.data.read_parquet([str(f) for f in self._epoch_files(epoch)]).select_columns(self.columns)
        ctx = ds.context  # per-dataset copy: these settings do not leak into other datasets
        ctx.execution_options.preserve_order = True  # reproducible order for a given seed/epoch
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.enable_auto_log_stats = False
        kwargs: dict[str, Any] = {}
        if self.shuffle:
            kwargs = {
                "local_shuffle_buffer_size": self.shuffle_buffer_rows,
                "local_shuffle_seed": self.seed + epoch,
            }
        yield from ds.iter_batches(
            batch_size=self.batch_size,
            prefetch_batches=self.prefetch_batches,
            batch_format="numpy",
            drop_last=False,
            **kwargs,
        )

    def _raise_located(self, reason: str) -> None:
        err = locate_first_error(self.files, self.spec)
        if err is not None:
            raise err
        # Should not happen (the scan applies the same rules); still never train on the batch.
        raise DataError(f"rank {self.rank} files {[str(f) for f in self.files]}: {reason}")

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Exactly ``steps_per_epoch`` batches of exactly ``batch_size`` rows (padding masked out)."""
        steps = 0
        seen = 0
        template: dict[str, np.ndarray] | None = None
        if self.rows > 0:
            for cols in self._stream(epoch):
                n = len(cols["click"])
                if n == 0:
                    continue
                reason = check_batch(cols, self.spec)
                if reason is not None:
                    self._raise_located(reason)
                if n > self.batch_size:  # not expected from iter_batches; keep the contract anyway
                    raise RuntimeError(f"ray returned a batch of {n} rows > batch_size {self.batch_size}")
                seen += n
                if n < self.batch_size:
                    cols = self._padded(cols, n)
                if template is None:
                    template = cols
                steps += 1
                yield self._batch(cols, n)
            if seen != self.rows:
                raise DataError(
                    f"rank {self.rank}: read {seen} rows but the Parquet metadata of "
                    f"{[str(f) for f in self.files]} says {self.rows}"
                )
        pad = template if template is not None else self._zeros()
        while steps < self.steps_per_epoch:
            steps += 1
            yield self._batch(pad, 0)


def measure_input_rate(reader: SplitReader, epochs: int = 1) -> dict[str, Any]:
    """Input-only throughput of one reader: rows/s of real rows, with per-epoch timings.

    The first epoch includes Ray worker start-up, so report ``rows_per_s_after_first`` when epochs > 1.
    """
    per_epoch = []
    for e in range(epochs):
        t0 = time.perf_counter()
        real = 0
        steps = 0
        for b in reader.epoch(e):
            real += int(b.mask.sum())
            steps += 1
        per_epoch.append({"epoch": e, "seconds": time.perf_counter() - t0, "rows": real, "steps": steps})
    total_s = sum(p["seconds"] for p in per_epoch)
    total_rows = sum(p["rows"] for p in per_epoch)
    out: dict[str, Any] = {
        "rank": reader.rank,
        "world_size": reader.world_size,
        "batch_size": reader.batch_size,
        "shuffle": reader.shuffle,
        "epochs": epochs,
        "rows": total_rows,
        "seconds": total_s,
        "rows_per_s": total_rows / total_s if total_s > 0 else float("nan"),
        "per_epoch": per_epoch,
    }
    if epochs > 1:
        rest = per_epoch[1:]
        rest_s = sum(p["seconds"] for p in rest)
        out["rows_per_s_after_first"] = sum(p["rows"] for p in rest) / rest_s if rest_s > 0 else float("nan")
    return out
