"""Entity profiles: for each user (item), the values of its side's fields, read from the dataset.

The representations ``r_u`` (Eq. 2) are per *entity*, but the data holds impressions. Profile fields
are functions of the entity id, so one scan over the splits recovers them. If the data disagrees
(a user seen with two ages), the last value read wins and the number of such entities is logged.
Entities never seen keep profile value 0 (unknown) and their own id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cstwa_dist.data.spec import SPLITS, DatasetSpec, split_files

logger = logging.getLogger(__name__)


def entity_profiles(dataset: str | Path, spec: DatasetSpec, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(profiles [N, M_side] int64 in side_fields order, seen [N] bool)``."""
    fields = [f.name for f in spec.side_fields(side)]
    key = fields[0]  # the side's id field comes first
    n = spec.field(key).vocab_size
    prof = np.zeros((n, len(fields)), dtype=np.int64)
    prof[:, 0] = np.arange(n)
    seen = np.zeros(n, dtype=bool)
    conflicts = np.zeros(n, dtype=bool)
    for split in SPLITS:
        d = Path(dataset) / split
        if not d.exists():
            continue
        for path in split_files(dataset, split):
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                tbl = pf.read_row_group(rg, columns=fields)
                cols = np.stack([tbl.column(f).to_numpy() for f in fields], axis=1).astype(np.int64)
                ids = cols[:, 0]
                if ids.size and (ids.min() < 0 or ids.max() >= n):
                    raise ValueError(f"{path}: {key} outside [0, {n}) in row group {rg}")
                again = seen[ids]
                if again.any():
                    differ = (prof[ids[again], 1:] != cols[again, 1:]).any(axis=1)
                    conflicts[ids[again][differ]] = True
                prof[ids] = cols
                seen[ids] = True
    if conflicts.any():
        logger.warning(
            "%d %ss have more than one profile in the data; the last one read is used",
            int(conflicts.sum()),
            side,
        )
    logger.info("%s profiles: %d of %d ids seen in the data", side, int(seen.sum()), n)
    return prof, seen
