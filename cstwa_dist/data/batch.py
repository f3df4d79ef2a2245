"""The unit of work between the input pipeline and the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One fixed-size batch for one rank.

    ``mask`` is False for padding rows: every rank runs the same number of fixed-size batches, and
    a rank whose share is shorter pads its last batches with copies of real rows that carry weight 0,
    so no collective waits on a rank that ran out of data and no sample is counted twice.

    A ``Pipelineable`` (``to`` + ``record_stream``), so TorchRec's train pipelines can copy it to the
    device and start its input all-to-all while the previous batch trains.
    """

    features: KeyedJaggedTensor  # one id per field and row; keys = field names in spec order
    click: torch.Tensor  # [B] float32 in {0, 1}
    purchase: torch.Tensor  # [B] float32 in {0, 1}
    mask: torch.Tensor  # [B] bool; False = padding
    # Real rows of this step summed over all ranks, from the reader's plan (no collective needed);
    # None when the batch was not made by a reader.
    global_rows: int | None = None
    # One key per equal chunk of rows (the reader's shares, in order): the dropout masks of a chunk's
    # rows are drawn from its key (models/blocks.KeyedDropout); None = the torch stream's draws.
    dropout_keys: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return int(self.click.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            click=self.click.to(device=device, non_blocking=non_blocking),
            purchase=self.purchase.to(device=device, non_blocking=non_blocking),
            mask=self.mask.to(device=device, non_blocking=non_blocking),
            global_rows=self.global_rows,
            dropout_keys=self.dropout_keys,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Lets TorchRec's train pipelines keep the batch alive across CUDA streams."""
        self.features.record_stream(stream)
        for t in (self.click, self.purchase, self.mask):
            t.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            features=self.features.pin_memory(),
            click=self.click.pin_memory(),
            purchase=self.purchase.pin_memory(),
            mask=self.mask.pin_memory(),
            global_rows=self.global_rows,
            dropout_keys=self.dropout_keys,
        )


def make_kjt(columns: dict[str, torch.Tensor], keys: list[str]) -> KeyedJaggedTensor:
    """Builds a KJT of single-valued fields from ``[B]`` int64 id columns, in ``keys`` order."""
    b = int(columns[keys[0]].shape[0])
    values = torch.cat([columns[k].reshape(-1).to(torch.int64) for k in keys])
    lengths = torch.ones(len(keys) * b, dtype=torch.int32)
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, stride=b)


def batch_from_columns(
    cols: Mapping[str, np.ndarray],
    keys: Sequence[str],
    real: int | np.ndarray,
    *,
    global_rows: int | None = None,
    pin: bool = False,
    dropout_keys: tuple[int, ...] | None = None,
) -> Batch:
    """A :class:`Batch` from numpy columns (ids in ``keys``, labels ``click``/``purchase``); ``real``:
    the number of leading real rows (the rest is padding), or a bool array marking the real rows.
    Runs on the reader's producer thread, so the training thread receives a
    finished KJT (in pinned memory with ``pin``, ready for a non-blocking copy to the GPU)."""
    b = len(cols["click"])
    values = torch.from_numpy(np.concatenate([np.asarray(cols[k], dtype=np.int64) for k in keys]))
    if isinstance(real, np.ndarray):
        if real.shape != (b,):
            raise ValueError(f"mask of shape {real.shape} for a batch of {b} rows")
        mask = torch.from_numpy(real.astype(bool))
    else:
        mask = torch.zeros(b, dtype=torch.bool)
        mask[:real] = True
    batch = Batch(
        features=KeyedJaggedTensor(
            keys=list(keys), values=values, lengths=torch.ones(len(keys) * b, dtype=torch.int32), stride=b
        ),
        click=torch.from_numpy(np.asarray(cols["click"], dtype=np.float32)),
        purchase=torch.from_numpy(np.asarray(cols["purchase"], dtype=np.float32)),
        mask=mask,
        global_rows=global_rows,
        dropout_keys=dropout_keys,
    )
    return batch.pin_memory() if pin else batch
