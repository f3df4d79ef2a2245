"""The validation split: which lines of the train file become validation rows.

Why a hash of ``(seed, line number)`` rather than a sequential RNG: any chunk can decide its lines alone,
so every execution order (single process, Ray tasks, any chunk size) gives the same split, and the split
is cut off before the vocabulary is counted, so no validation line shapes the vocabulary.
"""

from __future__ import annotations

import numpy as np


def val_mask(lines: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True for lines of the train file assigned to validation: a splitmix64 hash of (seed, line number).

    A hash rather than a sequential RNG, so any chunk can decide its lines alone and every execution
    order gives the same split.
    """
    with np.errstate(over="ignore"):
        x = lines.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1342543DE82EF95)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < val_fraction


def line_splits(lines: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Per line: 0 = the file's own split (train, or test for the test file, ``val_fraction=0``), 1 = val."""
    if val_fraction <= 0:
        return np.zeros(lines.shape, dtype=np.int8)
    return val_mask(lines, seed, val_fraction).astype(np.int8)
