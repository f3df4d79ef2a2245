"""Exact AUC over all test impressions (predictions gathered across ranks, never averaged)."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic with tied scores sharing their average rank.

    O(n log n) and exact, so the number does not depend on binning; NaN when a class is absent.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        logger.warning("AUC undefined: %d positives, %d negatives", n_pos, n_neg)
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
