"""What ``bench knn`` and ``bench propagate`` share: the seeded row generator and a process's own
resource readings.

Both benchmarks let every spawned rank make only its own rows, so the generator must give any row
range without generating the rest (block-wise from the seed, :data:`GEN_BLOCK` rows a block); and
both report per-process CPU time and RSS, the figures that stay meaningful on a shared machine.
"""

from __future__ import annotations

import math
import os
import resource

import numpy as np

GEN_BLOCK = 65536  # rows per generator block: the unit of reproducible generation


def clustered_rows(lo: int, hi: int, dim: int, *, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of the seeded Gaussian-mixture data set (float32), independent of other rows."""
    centres = np.random.default_rng([seed, 0]).normal(size=(clusters, dim))
    out = np.empty((hi - lo, dim), dtype=np.float32)
    for b in range(lo // GEN_BLOCK, math.ceil(hi / GEN_BLOCK)):
        b_lo, b_hi = b * GEN_BLOCK, (b + 1) * GEN_BLOCK
        rng = np.random.default_rng([seed, 1, b])
        labels = rng.integers(0, clusters, GEN_BLOCK)
        noise = rng.normal(size=(GEN_BLOCK, dim))
        block = centres[labels] + spread * noise
        a, z = max(lo, b_lo), min(hi, b_hi)
        out[a - lo : z - lo] = block[a - b_lo : z - b_lo]
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Current (not peak) resident set size of this process, MiB: checkpoints between steps."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) of this process so far: unlike wall time, barely moved
    by other jobs sharing the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
