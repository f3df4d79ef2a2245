"""The vocabulary: exact id counts on the train split, the frequency filter and the dense remap.

Protocol (AITM, ``docs/method.md §6``): ids are counted on the *train* lines (after the validation split
is cut off); an id seen fewer than ``min_count`` times becomes 0 (unknown), the others become ``1..V`` in
increasing raw-id order (vocab size ``V + 1``). A field missing on a sample is 0.

Memory: counts are kept as sorted ``(unique ids, counts)`` arrays per field (16 bytes per distinct id),
and the per-chunk counts are merged in batches of :data:`COUNT_MERGE_ENTRIES` pairs, so the driver never
holds a Python object per id and the result does not depend on how the file was chunked.
"""

from __future__ import annotations

import numpy as np

from cstwa_dist.data.aliccp.fields import ITEM_ID_FIELD, MISSING, USER_ID_FIELD, field_side
from cstwa_dist.data.spec import DatasetSpec, FieldSpec

COUNT_MERGE_ENTRIES = 1 << 22  # pending (id, count) pairs per field before they are merged

IdCount = tuple[np.ndarray, np.ndarray]  # (sorted unique raw ids, int64 counts)


def merge_counts(pending: list[IdCount]) -> IdCount:
    ids = np.concatenate([p[0] for p in pending])
    counts = np.concatenate([p[1] for p in pending])
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


class IdCounts:
    """Exact per-field id counts, fed one chunk's ``(unique ids, counts)`` per field at a time."""

    def __init__(self, n_fields: int) -> None:
        self._merged: list[IdCount] = [
            (np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(n_fields)
        ]
        self._pending: list[list[IdCount]] = [[] for _ in range(n_fields)]
        self._sizes = [0] * n_fields

    def add(self, counts: list[IdCount]) -> None:
        for j, uc in enumerate(counts):
            self._pending[j].append(uc)
            self._sizes[j] += uc[0].size
            if self._sizes[j] >= COUNT_MERGE_ENTRIES:
                self._merged[j] = merge_counts([self._merged[j], *self._pending[j]])
                self._pending[j], self._sizes[j] = [], 0

    def result(self) -> list[IdCount]:
        """The merged counts of every field (merges what is still pending)."""
        for j, pending in enumerate(self._pending):
            if pending:
                self._merged[j] = merge_counts([self._merged[j], *pending])
                self._pending[j], self._sizes[j] = [], 0
        return self._merged


def chunk_counts(ids: np.ndarray) -> list[IdCount]:
    """``(unique ids, counts)`` per column of an ``[n, F]`` raw-id matrix, absent ids left out."""
    out = []
    for j in range(ids.shape[1]):
        col = ids[:, j]
        out.append(np.unique(col[col != MISSING], return_counts=True))
    return out


def build_vocab(
    fields: tuple[str, ...], counts: list[IdCount], min_count: int
) -> tuple[tuple[np.ndarray, ...], DatasetSpec, dict[str, dict[str, int]]]:
    """(kept raw ids per field, the data set's spec, per-field vocabulary facts for ``stats.json``)."""
    vocab = tuple(ids[c >= min_count] for ids, c in counts)
    spec = DatasetSpec(
        fields=tuple(
            FieldSpec(name=f, side=field_side(f), vocab_size=int(v.size) + 1)
            for f, v in zip(fields, vocab, strict=True)
        ),
        user_id=USER_ID_FIELD,
        item_id=ITEM_ID_FIELD,
    )
    info = {
        f: {"vocab_size": int(v.size) + 1, "raw_distinct": int(ids.size), "raw_kept": int(v.size)}
        for f, v, (ids, _) in zip(fields, vocab, counts, strict=True)
    }
    return vocab, spec, info


def remap(raw: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Raw ids -> dense ids: position in the sorted ``kept`` array + 1; anything else (rare, absent) -> 0."""
    if kept.size == 0:
        return np.zeros(raw.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(kept, raw), kept.size - 1)
    return np.where((kept[pos] == raw) & (raw != MISSING), pos + 1, 0).astype(np.int64)
