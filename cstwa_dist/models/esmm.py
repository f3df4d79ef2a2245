"""ESMM (Ma et al., 2018): shared embeddings, ``p_ctcvr = p_ctr · p_cvr`` over the entire space.

ESMM is the plain ``SharedBottom``: both towers on ``x``, the purchase prediction the CTCVR logit.
"""

from __future__ import annotations

import torch

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SharedBottom


class ESMM(SharedBottom):
    """Shared embedding collection, a CTR tower and a CVR tower; purchase prediction = ``p_ctcvr``."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__(spec, cfg, device)
