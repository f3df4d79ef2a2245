"""The vocabulary: exact id counts on the train split, the frequency filter and the dense remap.

Protocol (AITM, ``docs/method.md §6``): ids are counted on the *train* lines (after the validation split
is cut off); an id seen fewer than ``min_count`` times becomes 0 (unknown), the others become ``1..V`` in
increasing raw-id order (vocab size ``V + 1``). A field missing on a sample is 0. The mapping is written
as a table vocabulary (:mod:`cstwa_dist.data.vocab`); an import ``--vocab-from`` an earlier data set keeps
that data set's rows and appends today's new ids after them (:func:`build_vocab`), so the written rows are
no longer in raw-id order overall and :func:`remap` takes the ``(sorted raw ids, rows)`` pair.

Memory: counts are kept as sorted ``(unique ids, counts)`` arrays per field (16 bytes per distinct id),
and the per-chunk counts are merged in batches of :data:`COUNT_MERGE_ENTRIES` pairs, so the driver never
holds a Python object per id and the result does not depend on how the file was chunked.
"""

from __future__ import annotations

import numpy as np

from cstwa_dist.data.aliccp.fields import ITEM_ID_FIELD, MISSING, USER_ID_FIELD, field_side
from cstwa_dist.data.spec import DatasetSpec, FieldSpec
from cstwa_dist.data.vocab import FieldVocab, IdRows, VocabError, Vocabulary, table_field

COUNT_MERGE_ENTRIES = 1 << 22  # pending (id, count) pairs per field before they are merged

IdCount = tuple[np.ndarray, np.ndarray]  # (sorted unique raw ids, int64 counts)
UNKNOWN_ROW = 0  # rare and absent ids


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


def check_previous(previous: Vocabulary, fields: tuple[str, ...], source: str) -> None:
    """Refuses a ``--vocab-from`` data set whose vocabularies cannot be extended by this import."""
    if set(previous.fields) != set(fields):
        raise VocabError(
            f"--vocab-from {source}: its fields {sorted(previous.fields)} differ from this import's "
            f"{sorted(fields)}; import with the same --fields"
        )
    for f in fields:
        fv = previous.fields[f]
        if fv.kind != "table" or fv.unknown_row != UNKNOWN_ROW:
            raise VocabError(
                f"--vocab-from {source}: field {f!r} has no Ali-CCP table vocabulary (kind {fv.kind}, "
                f"unknown_row {fv.unknown_row}: a data set without vocab/, or not written by import-aliccp); "
                "give an import-aliccp data set that has vocab/"
            )


def build_vocab(
    fields: tuple[str, ...], counts: list[IdCount], min_count: int, previous: Vocabulary | None = None
) -> tuple[tuple[IdRows, ...], DatasetSpec, dict[str, dict[str, int]], Vocabulary]:
    """(``(sorted raw ids, rows)`` per field, the data set's spec, per-field facts for ``stats.json``, the
    vocabulary written to ``vocab/``).

    Without ``previous``: row 0 is unknown, kept ids get rows ``1..V`` in raw-id order. With it (a
    ``--vocab-from`` import, checked by :func:`check_previous`): every raw id of ``previous`` keeps its row
    (even one rare today), and the ids kept today (``count >= min_count``) that it lacks are appended in
    raw-id order; the lineage continues ``previous``'s. Memory: the old table of a field (16 bytes per
    id) plus its ``by_row`` array (8 bytes per row) while that field is built.
    """
    mappings: list[IdRows] = []
    fvs: dict[str, FieldVocab] = {}
    info: dict[str, dict[str, int]] = {}
    for f, (ids, c) in zip(fields, counts, strict=True):
        kept = ids[c >= min_count]
        if previous is None:
            by_row = np.concatenate([[-1], kept]).astype(np.int64)
            fv, pair = table_field(f, by_row, UNKNOWN_ROW)
            facts = {
                "vocab_size": int(by_row.size),
                "raw_distinct": int(ids.size),
                "raw_kept": int(kept.size),
            }
        else:
            old_keys, _ = previous.table(f)
            new = kept[~_member(kept, old_keys)]
            by_row = np.concatenate([previous.by_row(f), new]).astype(np.int64)
            fv, pair = table_field(f, by_row, UNKNOWN_ROW, previous=previous.fields[f])
            facts = {
                "vocab_size": int(by_row.size),
                "raw_distinct": int(ids.size),
                "raw_kept": int(kept.size),
                "previous_vocab_size": previous.fields[f].size,
                "appended": int(new.size),
            }
        mappings.append(pair)
        fvs[f] = fv
        info[f] = facts
    spec = DatasetSpec(
        fields=tuple(FieldSpec(name=f, side=field_side(f), vocab_size=fvs[f].size) for f in fields),
        user_id=USER_ID_FIELD,
        item_id=ITEM_ID_FIELD,
    )
    vocabulary = Vocabulary(fvs, {f: m for f, m in zip(fields, mappings, strict=True)})
    return tuple(mappings), spec, info, vocabulary


def _member(x: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of ``x`` is in the sorted array ``sorted_keys`` (vectorised)."""
    if sorted_keys.size == 0:
        return np.zeros(x.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, x), sorted_keys.size - 1)
    return sorted_keys[pos] == x


def remap(raw: np.ndarray, kept: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Raw ids -> rows: ``rows[k]`` where ``raw == kept[k]`` (``kept`` sorted; default ``rows``: ``k + 1``,
    the first import's raw-id order); anything else (rare, absent) -> 0."""
    if kept.size == 0:
        return np.zeros(raw.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(kept, raw), kept.size - 1)
    hit = (kept[pos] == raw) & (raw != MISSING)
    return np.where(hit, pos + 1 if rows is None else rows[pos], 0).astype(np.int64)
