"""Reading a finished training checkpoint tensor by tensor, at any world size, without a process group.

Export (one process assembling each table of a checkpoint written by W ranks) and warm start (each
rank of a new run copying the rows of *its* shards from yesterday's checkpoint) both need to read
part of a checkpoint without building the model that wrote it. DCP can do that: a load plan is a
list of (checkpoint chunk ∩ destination chunk) reads, so a planner that names a destination chunk
``[start, start + count)`` of one tensor makes DCP read exactly the bytes of those rows from
whichever rank's file holds them. Nothing else of the checkpoint is read.

Trust: the checkpoint is verified like a resume verifies it (``checkpoint.verify`` when a key is
configured; the DCP ``.metadata`` is read by the allowlist unpickler), and no item is unpickled:
only tensor items are ever requested here.

Memory: :meth:`CheckpointTensors.read_rows` holds the requested rows (``count · dim · 4`` bytes for a
float32 table) plus DCP's read buffer of one storage chunk overlap at a time; ``dense_state`` holds
the model's non-table tensors (the towers: a few MB).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from cstwa_dist.distributed.tables import table_name
from cstwa_dist.train.checkpoint import (
    META,
    CheckpointRefused,
    SafeLoadPlanner,
    SafeMetadataReader,
    list_checkpoints,
    read_dcp_metadata,
    read_meta,
    signing_key,
    verify,
)

logger = logging.getLogger(__name__)

MODEL_PREFIX = "model.model."  # DMP(ModelTrain).state_dict(): ModelTrain.model is the RecModel


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its name in the RecModel's ``state_dict``, shape and dtype."""

    name: str  # e.g. "embeddings.ebc.embedding_bags.shared__user_id.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def table(self) -> str | None:
        """The table's name (``shared__user_id``) for an embedding table, else None."""
        return table_name(self.name) if len(self.shape) == 2 else None

    @property
    def is_table(self) -> bool:
        return self.table is not None


class _RowRangePlanner(SafeLoadPlanner):
    """Loads rows ``[start, start + count)`` of one tensor into a plain tensor of ``count`` rows."""

    def __init__(self, key: str, start: int) -> None:
        super().__init__()
        self.key, self.start = key, start

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        out = self.state_dict[self.key]
        offsets = torch.Size([self.start] + [0] * (out.dim() - 1))
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # the destination is the plain tensor of the requested rows (DCP's lookup expects a
        # ShardedTensor when the index carries an offset); read items narrow it by dest_offsets
        return self.state_dict[index.fqn]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``step-*``), or the newest complete one of a run folder or of its
    ``checkpoints/`` folder. Raises ``FileNotFoundError`` naming what was looked for."""
    p = Path(path)
    if (p / META).is_file() and (p / ".metadata").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root) if root.is_dir() else []
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"{p}: no checkpoint here (looked for {p}/meta.json, {p}/checkpoints/step-*/ and {p}/step-*/); "
        "pass a run folder written by `train` or one of its checkpoints/step-* folders"
    )


class CheckpointTensors:
    """The model tensors of one checkpoint, readable whole or by row range in a single process."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_checkpoint(path)
        key = signing_key()
        if key is not None:
            verify(self.path, key)
            logger.info("signature of %s verified", self.path)
        self.state = read_meta(self.path)
        md = read_dcp_metadata(self.path / ".metadata")
        self._md = md
        self.tensors: dict[str, TensorInfo] = {}
        for fqn, item in md.state_dict_metadata.items():
            if not fqn.startswith(MODEL_PREFIX) or not isinstance(item, TensorStorageMetadata):
                continue
            name = fqn[len(MODEL_PREFIX) :]
            self.tensors[name] = TensorInfo(name, tuple(item.size), item.properties.dtype)

    def tables(self) -> dict[str, TensorInfo]:
        """Embedding tables by table name (``shared__user_id`` → its weight)."""
        return {t.table: t for t in self.tensors.values() if t.table is not None}

    def dense_names(self) -> list[str]:
        """Every model tensor that is not an embedding table (towers, layers, buffers)."""
        return sorted(n for n, t in self.tensors.items() if not t.is_table)

    def read_rows(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Rows ``[start, start + count)`` of tensor ``name`` (all rows by default), on the CPU."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: holds no model tensor {name!r}")
        rows = info.shape[0] if info.shape else 1
        count = rows - start if count is None else count
        if not info.shape:
            out = torch.empty((), dtype=info.dtype)
            self._load({MODEL_PREFIX + name: out}, None)
            return out
        if start < 0 or count < 0 or start + count > rows:
            raise IndexError(f"{self.path}: rows [{start}, {start + count}) outside {name}'s {rows} rows")
        out = torch.empty((count, *info.shape[1:]), dtype=info.dtype)
        if count:
            self._load({MODEL_PREFIX + name: out}, start)
        return out

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Every non-table tensor of the model, by its ``state_dict`` name (one read)."""
        names = self.dense_names()
        info = self.tensors
        out = {MODEL_PREFIX + n: torch.empty(info[n].shape, dtype=info[n].dtype) for n in names}
        if out:
            self._load(out, None)
        return {n: out[MODEL_PREFIX + n] for n in names}

    def _load(self, target: dict[str, torch.Tensor], start: int | None) -> None:
        planner = SafeLoadPlanner() if start is None else _RowRangePlanner(next(iter(target)), start)
        try:
            with warnings.catch_warnings():
                # DCP warns that no process group exists: reading in one process is the point here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(
                    target,
                    checkpoint_id=str(self.path),
                    storage_reader=SafeMetadataReader(str(self.path)),
                    planner=planner,
                    no_dist=True,
                )
        except CheckpointRefused:
            raise
        except Exception as e:
            raise CheckpointRefused(f"{self.path}: could not read {sorted(target)[:3]}: {e}") from None
