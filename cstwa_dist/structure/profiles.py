"""Entity profiles for the structure step: a thin view of the data set's entity tables.

The representations ``r_u`` (Eq. 2) are per *entity*, but the data holds impressions. The profiles
(each user's or item's values of its side's fields) used to be rebuilt here by a scan of every impression
file on every rank; they are now written once with the data set (:mod:`cstwa_dist.data.entities`,
``<dataset>/entities/``) and read by id range, so nothing scans impressions at training time. New code
calls :func:`cstwa_dist.data.entities.read_entity_rows` for its own row range; this name stays for
callers that want ``(profiles, seen)`` of a side with a default full range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cstwa_dist.data.entities import read_entity_rows
from cstwa_dist.data.spec import DatasetSpec


def entity_profiles(
    dataset: str | Path, spec: DatasetSpec, side: str, lo: int = 0, hi: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(profiles [hi-lo, M_side] int64 in side_fields order, seen [hi-lo] bool)`` of ids ``[lo, hi)``.

    ``hi=None`` means all ``N`` ids of the side. Per-rank memory: ``(hi-lo)·(M+1)`` values plus one row
    group of the table (:func:`~cstwa_dist.data.entities.read_entity_rows`); only the default full range
    is O(N), so a rank should pass its own range.
    """
    if hi is None:
        hi = spec.field(spec.side_fields(side)[0].name).vocab_size
    return read_entity_rows(dataset, spec, side, lo, hi)
