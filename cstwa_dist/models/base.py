"""The small contract every registered model follows, so the trainer needs no model-specific code."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True, kw_only=True)
class StructureTable:
    """A trainable per-entity table the Structure Migrator smooths over a kNN graph between epochs.

    ``collection`` and ``init_from`` are attribute paths inside the model (``a.b``) so that the
    trainer can find the (sharded) modules after DistributedModelParallel has replaced them.
    """

    side: str  # "user" | "item": which graph and which entity ids
    collection: str  # path of the EmbeddingBagCollection holding the table
    table: str  # table name inside that collection
    init_from: str  # path of the FieldEmbeddings whose side concatenation initialises it (Eq. 8)


class RecModel(nn.Module):
    """Base for registered models: declares needs, computes nothing itself."""

    def structure_tables(self) -> list[StructureTable]:
        """Tables to initialise from representations and smooth with graphs (empty: no graphs needed)."""
        return []

    def representation_source(self) -> str | None:
        """Path of the FieldEmbeddings whose user/item tables give ``r_u``, ``r_i`` (pre-training)."""
        return None
