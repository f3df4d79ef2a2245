"""Exact AUC equals scikit-learn's, ties included."""

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from cstwa_dist.train.metrics import exact_auc


def test_exact_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # rounding creates many ties
    assert math.isclose(exact_auc(y, s), roc_auc_score(y, s), abs_tol=1e-12)


def test_exact_auc_edge_cases():
    assert exact_auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert exact_auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert exact_auc(np.array([0, 1, 0, 1]), np.array([0.5] * 4)) == 0.5
    assert math.isnan(exact_auc(np.array([0, 0]), np.array([0.1, 0.2])))
