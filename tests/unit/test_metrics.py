"""Exact AUC, GAUC and calibration equal direct computations with scikit-learn, ties included."""

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from cstwa_dist.train.metrics import (
    calibration,
    decile_table,
    evaluation_report,
    exact_auc,
    group_auc,
    scalar_view,
    write_reliability,
)


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


# --- GAUC --------------------------------------------------------------------------------------------
def _gauc_by_sklearn(y, s, u):
    """The definition, one user at a time: Σ n_u·AUC_u / Σ n_u over users with both classes."""
    num = den = 0.0
    used = skipped = 0
    for user in np.unique(u):
        m = u == user
        if y[m].min() == y[m].max():
            skipped += 1
            continue
        used += 1
        num += m.sum() * roc_auc_score(y[m], s[m])
        den += m.sum()
    return num / den, used, skipped


def test_gauc_matches_per_user_sklearn_with_ties_and_single_class_users():
    rng = np.random.default_rng(1)
    n = 3000
    u = rng.integers(0, 120, n) * 7919  # sparse, unsorted ids
    u[:40] = 10**12  # a user with 40 impressions, all negative below: skipped
    u[40:43] = 10**12 + 1  # a user with 3 impressions, all positive: skipped
    y = rng.random(n) < 0.3
    y[:40], y[40:43] = False, True
    s = np.round(rng.random(n) + 0.2 * y, 1).astype(np.float32)  # one decimal: ties inside users
    perm = rng.permutation(n)
    y, s, u = y[perm], s[perm], u[perm]
    want, used, skipped = _gauc_by_sklearn(y, s, u)
    got = group_auc(y, s, u)
    assert math.isclose(got["gauc"], want, abs_tol=1e-12)
    assert (got["gauc_users_used"], got["gauc_users_skipped"]) == (used, skipped)
    assert skipped >= 2


def test_gauc_edge_cases():
    assert group_auc(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8]), np.array([1, 1, 2, 2])) == {
        "gauc": 0.5,  # user 1: 1.0, user 2: 0.0, equal weights
        "gauc_users_used": 2,
        "gauc_users_skipped": 0,
    }
    none = group_auc(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2]))
    assert math.isnan(none["gauc"]) and none["gauc_users_skipped"] == 2
    assert group_auc(np.array([]), np.array([]), np.array([]))["gauc_users_used"] == 0


# --- calibration -------------------------------------------------------------------------------------
def test_calibration_matches_sklearn_log_loss_and_direct_deciles():
    rng = np.random.default_rng(2)
    n = 1003  # not a multiple of 10: bins of 100 and 101 rows
    p = rng.beta(0.5, 8, n).astype(np.float32)
    p[:5] = 0.0  # clipped like sklearn's
    y = rng.random(n) < p
    c = calibration(y, p)
    # sklearn sums float32 input in float32; in float64 the two agree to the last digits
    assert math.isclose(c["logloss"], log_loss(y, p), rel_tol=1e-6)
    p64 = p.astype(np.float64)
    assert math.isclose(calibration(y, p64)["logloss"], log_loss(y, p64), rel_tol=1e-12)
    assert math.isclose(c["mean_pred"], float(p.astype(np.float64).mean()), rel_tol=1e-12)
    assert math.isclose(c["observed_rate"], float(y.mean()), rel_tol=1e-12)
    d = c["deciles"]
    assert sum(d["rows"]) == n and len(d["rows"]) == 10 and set(d["rows"]) == {100, 101}
    order = np.argsort(p, kind="mergesort")
    ece = 0.0
    for i, idx in enumerate(np.array_split(order, 10)):  # equal-count bins, directly
        assert d["rows"][i] == idx.size
        assert math.isclose(d["mean_pred"][i], p[idx].astype(np.float64).mean(), rel_tol=1e-9)
        assert math.isclose(d["observed_rate"][i], y[idx].mean(), rel_tol=1e-12)
        ece += idx.size / n * abs(p[idx].astype(np.float64).mean() - y[idx].mean())
    assert math.isclose(c["ece"], ece, rel_tol=1e-9)
    assert np.all(np.diff(d["mean_pred"]) >= 0)  # bins in predicted-probability order


def test_calibration_small_and_empty():
    c = calibration(np.array([1, 0, 1]), np.array([0.9, 0.1, 0.5]))
    assert c["deciles"]["rows"] == [1, 1, 1]
    assert math.isnan(calibration(np.array([]), np.array([]))["logloss"])


def test_evaluation_report_keys_and_click_only_model():
    rng = np.random.default_rng(3)
    n = 500
    pred = {
        "click": (rng.random(n) < 0.3).astype(np.float32),
        "purchase": (rng.random(n) < 0.05).astype(np.float32),
        "p_click": rng.random(n).astype(np.float32),
        "p_purchase": rng.random(n).astype(np.float32),
        "user": rng.integers(0, 20, n),
    }
    r = evaluation_report(pred)
    for task in ("click", "purchase"):
        for k in ("auc", "gauc", "gauc_users_used", "gauc_users_skipped", "logloss", "ece", "deciles"):
            assert f"{task}_{k}" in r, (task, k)
    assert r["rows"] == n
    scalars = scalar_view(r)
    assert "click_gauc" in scalars and "click_deciles" not in scalars and "rows" not in scalars
    del pred["p_purchase"]
    r = evaluation_report(pred)
    assert r["purchase_auc"] is None and "purchase_gauc" not in r


def test_reliability_plot_and_text_table(tmp_path):
    rng = np.random.default_rng(4)
    p = rng.random(400)
    m = {"model": "m", **{f"click_{k}": v for k, v in calibration(rng.random(400) < p, p).items()}}
    path = write_reliability(m, "click", tmp_path)
    assert path == tmp_path / "reliability_click.png" and path.stat().st_size > 1000
    assert write_reliability(m, "purchase", tmp_path) is None  # no bins for that task
    table = decile_table(m, "click")
    assert "ECE" in table and len(table.strip().splitlines()) == 12


# --- the pieces the distributed evaluation (cstwa_dist/distributed/ranking.py) assembles -----------
def test_sums_of_disjoint_users_add_up_to_group_auc():
    """GAUC from per-owner sums (users split between two owners) equals GAUC over all rows."""
    from cstwa_dist.train.metrics import gauc_from_sums, group_auc_sums

    rng = np.random.default_rng(5)
    n = 3000
    y = rng.random(n) < 0.2
    s = np.round(rng.random(n), 1)  # ties within users
    g = rng.integers(0, 60, n)
    parts = [group_auc_sums(y[g % 2 == k], s[g % 2 == k], g[g % 2 == k]) for k in (0, 1)]
    num, den, used, groups = (sum(p[i] for p in parts) for i in range(4))
    want = group_auc(y, s, g)
    got = gauc_from_sums(num, den, used, groups)
    assert got["gauc_users_used"] == want["gauc_users_used"] and got["gauc_users_skipped"] == 0
    assert math.isclose(got["gauc"], want["gauc"], abs_tol=1e-12)
    assert group_auc_sums(y[:0], s[:0], g[:0]) == (0.0, 0.0, 0, 0)


def test_distributed_report_on_one_process_is_the_in_memory_report():
    """Without a process group (W = 1) the distributed report is ``evaluation_report`` itself."""
    from cstwa_dist.distributed.ranking import evaluation_bytes_per_rank
    from cstwa_dist.train.evaluation import distributed_evaluation_report

    rng = np.random.default_rng(6)
    n = 400
    pred = {
        "click": (rng.random(n) < 0.3).astype(np.float32),
        "purchase": (rng.random(n) < 0.05).astype(np.float32),
        "p_click": rng.random(n).astype(np.float32),
        "user": rng.integers(0, 20, n),
    }
    assert distributed_evaluation_report(pred) == evaluation_report(pred)
    # the estimate shrinks with the world size and has no O(rows) term on a rank beyond its share
    one, eight = evaluation_bytes_per_rank(44_000_000, 1), evaluation_bytes_per_rank(44_000_000, 8)
    assert eight < one / 6
    assert evaluation_bytes_per_rank(0, 4) > 0  # the splitter samples
