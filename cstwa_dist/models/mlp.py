"""The MLP baseline (docs/method.md §3): two independent single-task models, nothing shared.

A CTR model (its own ``ctr`` embedding collection and click tower) is trained on all impressions; a
CVR model (its own ``cvr`` collection and conversion tower) is trained on CLICKED impressions only
(``ClickedSpaceLoss``) — the classic, sample-selection-biased setting that ESMM and its successors
improve on — but, like every model here, it is evaluated over the entire impression space: its
``purchase_logit`` is its ``p_cvr`` logit, output for every row, clicked or not. It is
``SeparateEmbeddings`` unchanged (CSTWA with all three components off has the same network).
"""

from __future__ import annotations

from cstwa_dist.models.base import SeparateEmbeddings


class SingleTaskMLPs(SeparateEmbeddings):
    """A click MLP on the CTR tables and a purchase MLP on the CVR tables; no module is shared."""
