"""The unit of work between the input pipeline and the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One fixed-size batch for one rank.

    ``mask`` is False for padding rows: every rank runs the same number of fixed-size batches, and
    a rank whose share is shorter pads its last batches with copies of real rows that carry weight 0,
    so no collective waits on a rank that ran out of data and no sample is counted twice.
    """

    features: KeyedJaggedTensor  # one id per field and row; keys = field names in spec order
    click: torch.Tensor  # [B] float32 in {0, 1}
    purchase: torch.Tensor  # [B] float32 in {0, 1}
    mask: torch.Tensor  # [B] bool; False = padding

    @property
    def size(self) -> int:
        return int(self.click.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            click=self.click.to(device=device, non_blocking=non_blocking),
            purchase=self.purchase.to(device=device, non_blocking=non_blocking),
            mask=self.mask.to(device=device, non_blocking=non_blocking),
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
        )


def make_kjt(columns: dict[str, torch.Tensor], keys: list[str]) -> KeyedJaggedTensor:
    """Builds a KJT of single-valued fields from ``[B]`` int64 id columns, in ``keys`` order."""
    b = int(columns[keys[0]].shape[0])
    values = torch.cat([columns[k].reshape(-1).to(torch.int64) for k in keys])
    lengths = torch.ones(len(keys) * b, dtype=torch.int32)
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, stride=b)
