"""The join of samples with their common features (the user profile of a request), by key.

Why a sorted-array table rather than a dict: the common file of Ali-CCP has millions of keys, and a
Python dict of them would cost about ten times the memory. The table holds sorted fixed-width keys and an
``int64 [keys, kept fields present in the file]`` matrix of raw ids — about ``key length + 8 x fields``
bytes per key, never the multi-valued lists — and is looked up with ``searchsorted``. It is the one
large object of an import and crosses to the Ray workers once, through the object store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cstwa_dist.data.aliccp.fields import MISSING
from cstwa_dist.data.aliccp.parse import Bad, Samples
from cstwa_dist.data.quarantine import COMMON_FEATURES_QUARANTINED, REPEATED_FIELD, UNKNOWN_COMMON_KEY


@dataclass
class CommonTable:
    """The common-features table held in memory: sorted keys and the kept fields' raw ids per key.

    ``columns[c]`` is the index (in the import's field tuple) of ``values[:, c]``; only kept fields that
    occur in the common file get a column. ``bad_keys`` (sorted) are keys of quarantined common lines, so
    a sample pointing at one is reported as such rather than as an unknown key.
    """

    keys: np.ndarray  # bytes [K], sorted, unique
    values: np.ndarray  # int64 [K, C]
    columns: tuple[int, ...]
    bad_keys: np.ndarray  # bytes [B], sorted

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes + self.bad_keys.nbytes)


def first_duplicates(keys: np.ndarray, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, duplicate mask over the sorted order): a key repeated after its first line is a duplicate."""
    order = np.argsort(keys, kind="stable")  # ``lines`` ascend, so the first occurrence sorts first
    sk = keys[order]
    dup = np.zeros(len(sk), dtype=bool)
    if len(sk) > 1:
        dup[1:] = sk[1:] == sk[:-1]
    return order, dup


def lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each key in a sorted bytes array (exact match, any key width)."""
    if sorted_keys.size == 0 or keys.size == 0:
        return np.zeros(keys.size, dtype=np.int64), np.zeros(keys.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return pos, sorted_keys[pos] == keys


def join(
    samples: Samples, table: CommonTable, lines: list[str], first_line: int, fields: tuple[str, ...]
) -> tuple[np.ndarray, list[Bad]]:
    """Fills the samples' ids from their common features in place; returns the mask of good rows.

    A sample is bad if its key is unknown, if its key's common line was quarantined, or if a kept field
    is both on the sample and in its common features (which one would be the truth is unknowable).
    """
    pos, found = lookup(table.keys, samples.keys)
    _, quarantined_key = lookup(table.bad_keys, samples.keys)
    conflict = np.zeros(len(found), dtype=bool)
    conflict_field = np.full(len(found), -1, dtype=np.int64)
    rows = (
        table.values[pos] if table.values.shape[0] else np.zeros((len(found), len(table.columns)), np.int64)
    )
    for c, j in enumerate(table.columns):
        own, common = samples.ids[:, j], rows[:, c]
        both = found & (own != MISSING) & (common != MISSING)
        conflict_field[both & ~conflict] = j
        conflict |= both
        samples.ids[:, j] = np.where(found & (own == MISSING), common, own)
    bad: list[Bad] = []
    for k in np.flatnonzero(~found | conflict):
        no = int(samples.line[k])
        raw = lines[no - first_line]
        if not found[k]:
            key = samples.keys[k].decode("utf-8", errors="surrogateescape")
            if quarantined_key[k]:
                bad.append(
                    Bad(no, COMMON_FEATURES_QUARANTINED, raw, f"common line of key {key!r} is quarantined")
                )
            else:
                bad.append(Bad(no, UNKNOWN_COMMON_KEY, raw, f"key {key!r} not in the common features"))
        else:
            bad.append(
                Bad(
                    no,
                    REPEATED_FIELD,
                    raw,
                    f"field {fields[conflict_field[k]]} on the sample and in its common features",
                )
            )
    return found & ~conflict, bad
