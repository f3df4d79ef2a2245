"""Exact metrics over all impressions of a split, and the choice of the epoch a run reports.

Every number here is a function of the predictions of *all* ranks (padding rows excluded), never an
average over ranks: an average of per-rank AUCs is not the AUC of the split, and per-rank GAUCs
would split a user's impressions between ranks. The functions below compute them over arrays held
in one process (one rank, tests, tools). A multi-rank evaluation does not gather the rows: it
computes the same report with the rows spread over the ranks
(:func:`cstwa_dist.train.evaluation.distributed_evaluation_report`, ``O(rows / W)`` per rank), from
the pieces this module exposes for it (:func:`group_auc_sums`, :func:`auc_from_rank_sum`,
:func:`calibration_from_sums`), so both paths assemble their numbers with the same code.

* **AUC**: the Mann–Whitney statistic, tied scores sharing their average rank (= scikit-learn's
  ``roc_auc_score``). Exact, no binning.
* **GAUC**: the per-user AUC weighted by the user's number of impressions, as in the CTR literature
  (DIN, AITM's reference code). A user whose impressions are all of one class has no AUC: skipped and
  counted (``*_gauc_users_skipped``), so a reader sees on how many users the number rests. Purchase
  GAUC is over all impressions like Purchase AUC, so most users are skipped there (no purchase).
  One sort by (user, score) and ``bincount`` sums: no Python loop over users.
* **Calibration**: log loss (clipped like scikit-learn's ``log_loss``), mean predicted probability
  against the observed rate, the same in 10 equal-count bins of predicted probability (deciles) and
  the expected calibration error over those bins. AUC/GAUC only rank; a model whose probabilities
  are off (e.g. purchase rates inflated by an IPS-weighted loss) is caught here.
* **Epoch selection** (``train.select_epoch``): the paper's protocol, as AITM's reference code runs it,
  reports the test metrics of the epoch with the best validation Purchase AUC. The trainer evaluates
  the test split at the end of every epoch that sets a new best validation Purchase AUC, and of the
  last epoch, and keeps each result in that epoch's history record. The history is part of the saved
  training state, so a resumed run selects the same epoch with the same numbers as an uninterrupted
  one, and no copy of the model is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from cstwa_dist.config import SelectEpoch

logger = logging.getLogger(__name__)

TASKS = ("click", "purchase")
CALIBRATION_BINS = 10
SELECT_RULES: tuple[str, ...] = get_args(SelectEpoch)  # train.select_epoch's choices
# the record fields that are not scalars per task (not for TensorBoard or tables)
_NOT_SCALARS = {"rows", "seconds"}


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
    return auc_from_rank_sum(float(ranks[labels].sum()), n_pos, n_neg)


def auc_from_rank_sum(rank_sum: float, n_pos: int, n_neg: int) -> float:
    """The Mann–Whitney AUC from the sum of the positives' 1-based (tie-averaged) ranks; NaN when a
    class is absent. Shared with the distributed evaluation, which sums the ranks on every rank."""
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """GAUC: Σ_u n_u·AUC_u / Σ_u n_u over the users ``u`` with both classes (``n_u``: impressions).

    Returns ``gauc`` (NaN when no user has both classes), ``gauc_users_used`` and
    ``gauc_users_skipped``.
    Exact per user (ties share their average rank within the user, as in ``roc_auc_score``); one
    lexicographic sort by (user, score), so O(n log n) whatever the number of users.
    """
    num, den, used, n_groups = group_auc_sums(labels, scores, groups)
    return gauc_from_sums(num, den, used, n_groups)


def gauc_from_sums(num: float, den: float, used: int, n_groups: int) -> dict[str, Any]:
    """``group_auc``'s dict from ``Σ n_u·AUC_u``, ``Σ n_u`` (users with both classes), the number of
    those users and of all users; the distributed evaluation all-reduces these four numbers."""
    if used == 0:
        if n_groups:
            logger.warning("GAUC undefined: none of %d users has both classes", n_groups)
        return {"gauc": float("nan"), "gauc_users_used": 0, "gauc_users_skipped": int(n_groups)}
    return {
        "gauc": float(num / den),
        "gauc_users_used": int(used),
        "gauc_users_skipped": int(n_groups - used),
    }


def group_auc_sums(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[float, float, int, int]:
    """``(Σ_u n_u·AUC_u, Σ_u n_u, users used, users)`` over the users with both classes.

    Every user's rows must be in these arrays (the distributed evaluation routes each user's rows to
    one rank first). Sums rather than the ratio, so that ranks holding disjoint users can add them.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if not y.shape == s.shape == g.shape:
        raise ValueError(f"labels {y.shape}, scores {s.shape} and groups {g.shape} differ")
    n = y.size
    if n == 0:
        return 0.0, 0.0, 0, 0
    order = np.lexsort((s, g))  # by user, then by score within the user
    y, s, g = y[order], s[order], g[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.flatnonzero(new_group)
    gid = np.cumsum(new_group) - 1
    n_groups = group_start.size
    # runs of equal score inside one user: they share the average of their 1-based ranks in the user
    run_start = np.flatnonzero(new_group | np.r_[True, s[1:] != s[:-1]])
    run_end = np.r_[run_start[1:], n]
    avg = (run_start + run_end + 1) / 2.0 - group_start[gid[run_start]]
    ranks = np.repeat(avg, run_end - run_start)
    size = np.bincount(gid, minlength=n_groups).astype(np.float64)
    pos = np.bincount(gid, weights=y, minlength=n_groups)
    rank_pos = np.bincount(gid, weights=ranks * y, minlength=n_groups)
    neg = size - pos
    ok = (pos > 0) & (neg > 0)
    used = int(ok.sum())
    if used == 0:
        return 0.0, 0.0, 0, int(n_groups)
    auc = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2.0) / (pos[ok] * neg[ok])
    return float((auc * size[ok]).sum()), float(size[ok].sum()), used, int(n_groups)


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Log loss, mean predicted vs observed rate, per-bin (equal-count) rates and ECE.

    Bins: the impressions sorted by predicted probability (stable sort) and cut into ``bins`` runs of
    equal count (±1), so every bin rests on n/bins impressions even when predictions crowd near 0 —
    fixed-width bins would put almost all purchase predictions into the first one. ECE is the
    impression-weighted mean of |mean predicted − observed rate| over these bins. ``deciles`` holds
    the bins as lists (bins with no rows, possible only when n < ``bins``, are left out).
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p_in = np.asarray(scores)
    p = p_in.astype(np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and scores {p.shape} differ")
    n = y.size
    if n == 0:
        nan = float("nan")
        return {
            "logloss": nan,
            "mean_pred": nan,
            "observed_rate": nan,
            "ece": nan,
            "deciles": {"mean_pred": [], "observed_rate": [], "rows": []},
        }
    order = np.argsort(p, kind="mergesort")
    b = np.repeat(np.arange(bins), bin_sizes(n, bins))
    return calibration_from_sums(
        n,
        log_likelihood_sum(y, p, logloss_eps(p_in.dtype)),
        float(p.sum()),
        float(y.sum()),
        np.bincount(b, minlength=bins),
        np.bincount(b, weights=p[order], minlength=bins),
        np.bincount(b, weights=y[order], minlength=bins),
    )


def bin_sizes(n: int, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Rows per calibration bin in predicted-probability order: ``n // bins`` each, the first
    ``n % bins`` one more (``np.array_split``'s cut)."""
    return n // bins + (np.arange(bins) < n % bins)


def logloss_eps(dtype: np.dtype) -> float:
    """scikit-learn's ``log_loss`` clips to the machine epsilon of the predictions' dtype."""
    return float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps)


def log_likelihood_sum(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    """``Σ y·log p + (1 − y)·log(1 − p)`` (float64) with ``p`` clipped to ``[eps, 1 − eps]``."""
    pc = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return float((y * np.log(pc) + (1.0 - y) * np.log1p(-pc)).sum())


def calibration_from_sums(
    n: int,
    loglik_sum: float,
    p_sum: float,
    y_sum: float,
    bin_rows: np.ndarray,
    bin_p: np.ndarray,
    bin_y: np.ndarray,
) -> dict[str, Any]:
    """``calibration``'s dict (n > 0) from sums over all rows and per bin; the distributed
    evaluation all-reduces these sums over ranks and assembles the dict here."""
    rows = np.asarray(bin_rows).astype(np.int64)
    keep = rows > 0
    rows, sum_p, sum_y = rows[keep], np.asarray(bin_p)[keep], np.asarray(bin_y)[keep]
    mean_p, rate = sum_p / rows, sum_y / rows
    ece = float((rows * np.abs(mean_p - rate)).sum() / n)
    return {
        "logloss": float(-loglik_sum / n),
        "mean_pred": float(p_sum / n),
        "observed_rate": float(y_sum / n),
        "ece": ece,
        "deciles": {
            "mean_pred": [float(x) for x in mean_p],
            "observed_rate": [float(x) for x in rate],
            "rows": [int(x) for x in rows],
        },
    }


def task_metrics(
    task: str, labels: np.ndarray, scores: np.ndarray, users: np.ndarray | None
) -> dict[str, Any]:
    """Every metric of one task under ``<task>_`` keys (GAUC only when ``users`` is given)."""
    out: dict[str, Any] = {f"{task}_auc": exact_auc(labels, scores)}
    if users is not None:
        for k, v in group_auc(labels, scores, users).items():
            out[f"{task}_{k}"] = v
    for k, v in calibration(labels, scores).items():
        out[f"{task}_{k}"] = v
    return out


def evaluation_report(pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """The metrics of one split from ``predict``'s gathered columns.

    ``click``/``purchase`` labels, ``p_click``/``p_purchase`` probabilities, ``user`` ids. A model
    without a purchase head (no ``p_purchase``) gets ``purchase_auc: None`` and no other purchase keys.
    """
    users = pred.get("user")
    out: dict[str, Any] = {"rows": int(pred["click"].size)}
    out.update(task_metrics("click", pred["click"], pred["p_click"], users))
    if "p_purchase" in pred:
        out.update(task_metrics("purchase", pred["purchase"], pred["p_purchase"], users))
    else:
        out["purchase_auc"] = None
    return out


def scalar_view(report: dict[str, Any]) -> dict[str, float | None]:
    """The report's per-task numbers worth a curve (AUC, GAUC, log loss, ECE, rates), for TensorBoard."""
    return {
        k: v
        for k, v in report.items()
        if k not in _NOT_SCALARS
        and not k.endswith(("_users_used", "_users_skipped"))
        and (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))
    }


# --- epoch selection ------------------------------------------------------------------------------
def _val_purchase_auc(record: dict[str, Any]) -> float | None:
    v = (record.get("val") or {}).get("purchase_auc")
    return None if v is None or math.isnan(v) else float(v)


def is_new_best(previous: Sequence[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Whether ``record``'s validation Purchase AUC beats every earlier epoch's (strictly).

    Strictly, so of equal epochs the earliest is kept (AITM's reference code keeps a model only on
    ``auc > best``). False when the record has no usable validation Purchase AUC (no validation, a
    click-only model, a validation split without purchases).
    """
    mine = _val_purchase_auc(record)
    if mine is None:
        return False
    earlier = [a for a in map(_val_purchase_auc, previous) if a is not None]
    return not earlier or mine > max(earlier)


def _best_by_val(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The earliest record with the highest validation Purchase AUC (None if none has one)."""
    best, best_auc = None, -math.inf
    for r in records:
        a = _val_purchase_auc(r)
        if a is not None and a > best_auc:
            best, best_auc = r, a
    return best


def select_record(history: Sequence[dict[str, Any]], rule: str) -> tuple[dict[str, Any] | None, str]:
    """The epoch record whose test metrics the run reports, and the rule that chose it.

    ``best_val_purchase_auc``: the earliest epoch with the highest validation Purchase AUC; when no
    epoch has one (validation off, a click-only model), the last epoch, and the returned rule says
    ``last``. Only records holding a ``test`` result are candidates (the trainer gives one to every
    new best and to the last epoch; a record from a checkpoint of an older version may lack it).
    None when no record holds a test result.
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"select rule must be one of {SELECT_RULES}, got {rule!r}")
    tested = [r for r in history if "test" in r]
    if not tested:
        return None, rule
    if rule == "best_val_purchase_auc":
        best = _best_by_val(history)
        if best is not None and "test" in best:
            return best, rule
        if best is not None:
            logger.warning(
                "epoch %s has the best validation Purchase AUC but no test result (a checkpoint of an "
                "older version?): reporting the best epoch among those tested",
                best.get("epoch"),
            )
            best = _best_by_val(tested)
            if best is not None:
                return best, rule
    return tested[-1], "last"


# --- reliability plot -----------------------------------------------------------------------------
def decile_table(metrics: dict[str, Any], task: str) -> str:
    """The calibration bins of ``task`` as a text table (also the fallback without matplotlib)."""
    d = metrics.get(f"{task}_deciles") or {}
    lines = [
        f"{task}: mean predicted {_f(metrics.get(f'{task}_mean_pred'))}, observed rate "
        f"{_f(metrics.get(f'{task}_observed_rate'))}, ECE {_f(metrics.get(f'{task}_ece'))}, "
        f"log loss {_f(metrics.get(f'{task}_logloss'))}",
        f"{'bin':>4} {'rows':>9} {'mean predicted':>15} {'observed rate':>14}",
    ]
    for i, (r, p, o) in enumerate(
        zip(d.get("rows", []), d.get("mean_pred", []), d.get("observed_rate", []), strict=True)
    ):
        lines.append(f"{i + 1:>4} {r:>9d} {p:>15.6f} {o:>14.6f}")
    return "\n".join(lines) + "\n"


def write_reliability(metrics: dict[str, Any], task: str, out_dir: Path) -> Path | None:
    """``<out_dir>/reliability_<task>.png`` (observed rate against mean predicted, per decile).

    Without matplotlib (it is pinned in launchers/requirements, but ``report`` is a light tool) the
    decile table goes to ``reliability_<task>.txt`` instead. None when the run has no bins for the task.
    """
    d = metrics.get(f"{task}_deciles")
    if not d or not d.get("rows"):
        return None
    try:
        import matplotlib
    except ImportError:
        path = out_dir / f"reliability_{task}.txt"
        path.write_text(decile_table(metrics, task))
        logger.warning("matplotlib is not installed: wrote the decile table %s instead of a plot", path)
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mp, rate = d["mean_pred"], d["observed_rate"]
    hi = max(max(mp), max(rate)) * 1.05 or 1.0
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="perfectly calibrated")
    ax.plot(mp, rate, marker="o", label="deciles of predicted probability")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ax.set_title(
        f"{metrics.get('model', '')} {task} (epoch {metrics.get('best_epoch', '?')}): "
        f"ECE {_f(metrics.get(f'{task}_ece'))}, "
        f"log loss {_f(metrics.get(f'{task}_logloss'))}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out_dir / f"reliability_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
