"""Synthetic impression logs that carry the paper's claims about real traffic.

Why a generator at all: Ali-CCP needs a manual download and the industrial data set is private, yet
every part of CSTWA rests on claims about the traffic, so the data the tests and benchmarks use has to
carry those claims by construction, with known ground truth:

* *Latent structure* (Structure Migrator): users and items that share tastes should end up close in a
  kNN graph over learned representations.
* *Click and purchase disagree* (Click Perceptron, Curse Escaper): some items draw clicks but rarely
  sell (click-bait), others are rarely clicked but sell when they are (necessities), so the click
  signal is an imperfect, partly misleading proxy for purchase.
* *Sparse, skewed labels*: click and purchase rates of the paper's Table 1, Zipf-like item
  popularity and user activity.

Generative model (``SynthPreset`` holds every knob named here; values are at ``scale = 1``):

1. ``C = num_clusters`` taste clusters with unit-norm random centres ``m_c`` in ``R^latent_dim``.
   Every user and item has a cluster (mildly unequal sizes) and a latent vector ``l = m_c + noise``,
   ``noise ~ N(0, (latent_noise^2 / latent_dim) I)``. Item latents are stored; a user's noise is
   recomputed from a seeded hash of its id, so per-user state stays at a few bytes (30M users fit).
2. Affinity of user ``u`` for item ``i``: ``aff = l_u . l_i`` (about 1 within a cluster, about 0
   across clusters).
3. Impressions: a user is drawn with Zipf-like activity (rank exponent ``user_zipf``, ranks mapped to
   ids by a seeded permutation); its item comes, with probability ``in_cluster_exposure``, from the
   user's own cluster (the recommender's targeting), else from the whole catalogue, in both cases by
   Zipf-like popularity (exponent ``item_zipf``; the in-cluster order follows the global one).
   Context: hour (24), position (10) and device (4) drawn independently.
4. Item factors: ``bait_i ~ N(0, bait_std^2)``, ``nec_i ~ N(0, necessity_std^2)``; user purchase
   propensity ``prop_u ~ N(0, user_propensity_std^2)`` (from a hash of the id).
5. ``p_click = sigmoid(affinity_click * aff + bait_i - necessity_click_penalty * nec_i + ctx + b_ctr)``
   with ``ctx = context_strength * (0.2 sin(2 pi hour / 24) - 0.08 position + device offset)``.
6. ``p_buy|click = sigmoid(affinity_purchase * aff - bait_purchase_penalty * bait_i + nec_i + prop_u
   + b_cvr)`` (``bait_purchase_penalty`` is the conflict axis, ``CONFLICT_LEVELS``: at 1 bait has no net
   effect on purchases over all impressions, above 1 a negative one); ``click ~ Bernoulli(p_click)``,
   ``purchase = click * Bernoulli(p_buy|click)``, so ``purchase = 1`` implies ``click = 1`` on every row.
7. ``b_ctr`` and ``b_cvr`` are solved by bisection on a 200k-impression pilot sample so the expected
   click rate and purchase rate (purchases over all impressions) equal the preset's targets.
8. Profile fields are pure functions of the id (seeded hash). User: ``user_age`` (8), ``user_gender``
   (3), ``user_city`` (100) take their cluster's preferred value with probability
   ``profile_cluster_corr``, else a per-id value; ``user_level`` (10) is a noisy decile of ``prop_u``.
   Item: ``item_category`` (64) is the cluster's category with probability
   ``max(profile_cluster_corr, 0.8)``, ``item_brand`` (100) the cluster's brand with probability
   ``profile_cluster_corr / 2``, ``item_price`` (10) a noisy decile of ``nec_i``. Context: ``ctx_hour``
   (24), ``ctx_position`` (10), ``ctx_device`` (4). With ``profile_leakage`` set, every cluster-linked
   field (age, gender, city, category, brand) takes its cluster's value with exactly that probability
   instead: the knob for how much the profiles alone give the clusters away.
9. Vocabulary: ``user_id`` in ``[0, num_users)``, ``item_id`` in ``[0, num_items)``; 0 is a normal id.
   Every field is identity (raw id == row), written as ``vocab/vocab.json`` (:mod:`cstwa_dist.data.vocab`).

Days (``day``, ``growth``, ``drift``; the CLI's ``--day/--growth/--drift``): the same (preset, scale, seed)
world seen on a later day, for retraining with stable ids. Day 1 is the world above, unchanged (same
files). Day ``D > 1``:

* ``num_users`` and ``num_items`` are day 1's times ``(1 + growth)^(D-1)``, rounded. Ids below day 1's
  counts are the same entities (cluster, profile fields, bait, necessity, propensity, latent noise: the
  day-1 world is built first, with its own RNG draws); each id above is drawn from the same distributions
  from seeded hashes of its id (salts ``new_*``), so an id added on day 2 is the same entity on day 3.
  Popularity: old ids keep their relative order, each new id is slotted in at a per-id uniform position.
  Row counts do not grow.
* Tastes drift: every user's and item's latent gets ``drift · Σ_{d=2..D} ε_{d,id}``, ``ε ~ N(0, I /
  latent_dim)`` from a hash of (day, id): a cumulative random walk (day ``D`` continues day ``D-1``'s),
  recomputed per row for users (``O(D)`` hashing, no state) and stored in the item latents.
* The pilot sample and every chunk's RNG stream also take the day as a seed word, so the impressions of
  each day differ; the biases are calibrated for the day as on day 1.

Per-entity state is what day 1 holds, at the day's counts. ``synth.json`` records ``day``, ``growth``
and ``drift``; the identity vocabulary's sizes grow, so day ``D``'s extends day ``D-1``'s.

Output layout (``spec.py``): ``<out>/{train,val,test}/part-NNNNN.parquet`` (int64 feature columns,
int8 ``click`` / ``purchase``), ``spec.yaml``, ``stats.json``, the entity tables ``entities/`` (one scan of
the written splits, :mod:`cstwa_dist.data.entities`) and ``synth.json`` (preset, scale, seed, calibrated
biases, for reproducibility). Rows are produced in fixed chunks of ``CHUNK_ROWS`` from a
generator seeded by ``(seed, split, chunk index)``, so the rows do not depend on how they are cut
into files; the file cut (about 8 files per split, row groups of 128k rows) and the statistics are
:mod:`cstwa_dist.data.writer`'s, shared with the importers. Memory is bounded by one chunk plus
per-entity arrays (under 10 bytes per user, a few hundred bytes per item); the entity scan at the end
holds ``(M+1)·8`` bytes per user and per item (``M`` fields of the side). The whole data set is
written into a staging folder and renamed into place at the end (:func:`cstwa_dist.fs.staged_directory`),
so a crash never leaves a half data set that :func:`cstwa_dist.data.writer.dataset_complete` would
accept.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cstwa_dist.data.progress import Progress
from cstwa_dist.data.spec import SPLITS, DatasetSpec, FieldSpec, SplitStats
from cstwa_dist.data.vocab import VOCAB_DIR, Vocabulary
from cstwa_dist.data.writer import SplitAccumulator, default_rows_per_file, write_metadata
from cstwa_dist.fs import atomic_write_json, staged_directory

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 18  # rows generated per RNG stream; part of the generator's definition (determinism)
MIN_ENTITIES = 50  # users / items at tiny scales, so clusters and kNN stay meaningful
MIN_SPLIT_ROWS = 1000  # every split stays non-empty and has a few clicks at tiny scales
PILOT_ROWS = 200_000  # sample the biases are calibrated on

# Field vocabularies (kept small, like the profile fields of Ali-CCP).
USER_PROFILE_VOCAB = {"user_age": 8, "user_gender": 3, "user_city": 100, "user_level": 10}
ITEM_PROFILE_VOCAB = {"item_category": 64, "item_brand": 100, "item_price": 10}
CONTEXT_VOCAB = {"ctx_hour": 24, "ctx_position": 10, "ctx_device": 4}
_DEVICE_PROBS = np.array([0.55, 0.3, 0.1, 0.05])
_DEVICE_EFFECT = np.array([0.0, 0.1, -0.15, 0.05], dtype=np.float32)
_POSITION_PROBS = 0.8 ** np.arange(10)
_POSITION_PROBS = _POSITION_PROBS / _POSITION_PROBS.sum()
# Deciles of N(0, 1): turn a standard-normal score into a 10-level bucket.
_NORMAL_DECILES = np.array([-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816])

# Hash salts: one independent stream per derived quantity.
_SALT = {
    "user_noise": 1,
    "user_prop": 2,
    "user_level": 3,
    "profile_pick": 10,
    "profile_value": 20,
    "cluster_value": 30,
    # entities added on later days (ids >= the day-1 count): drawn per id, so the same on every day
    "new_user_cluster": 50,
    "new_user_popularity": 51,
    "new_item_cluster": 52,
    "new_item_noise": 53,
    "new_item_bait": 54,
    "new_item_necessity": 55,
    "new_item_popularity": 56,
    "new_item_category_pick": 57,
    "new_item_category": 58,
    "new_item_brand_pick": 59,
    "new_item_brand": 60,
    "new_item_price": 61,
}
# Drift of day d (>= 2): salt _DRIFT_SALT + 2 d (users) / 2 d + 1 (items); far from every salt above.
_DRIFT_SALT = 1_000_000
DEFAULT_GROWTH = 0.1
DEFAULT_DRIFT = 0.05


@dataclass(frozen=True, kw_only=True)
class SynthPreset:
    """Sizes at ``scale = 1`` and every knob of the generative model (module docstring)."""

    description: str = ""
    train_rows: int
    val_rows: int
    test_rows: int
    num_users: int
    num_items: int
    click_rate: float
    purchase_rate: float  # purchases over ALL impressions
    num_clusters: int = 16
    latent_dim: int = 16
    latent_noise: float = 0.35
    user_zipf: float = 0.6
    item_zipf: float = 1.0
    in_cluster_exposure: float = 0.5
    affinity_click: float = 1.5
    affinity_purchase: float = 1.0
    bait_std: float = 0.7
    necessity_std: float = 0.7
    necessity_click_penalty: float = 0.5
    bait_purchase_penalty: float = 1.0
    user_propensity_std: float = 0.3
    context_strength: float = 1.0
    profile_cluster_corr: float = 0.6
    # None: the historical rule (category leaks max(corr, 0.8), brand corr/2). A value in [0, 1]: every
    # cluster-linked profile field (age, gender, city, category, brand) takes its cluster's value with
    # exactly this probability, so how much the profiles give the clusters away is one knob.
    profile_leakage: float | None = None

    def __post_init__(self) -> None:
        for name in ("train_rows", "val_rows", "test_rows", "num_users", "num_items", "num_clusters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SynthPreset.{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_dim < 1:
            raise ValueError(f"SynthPreset.latent_dim must be >= 1, got {self.latent_dim}")
        if not 0.0 < self.click_rate < 1.0:
            raise ValueError(f"SynthPreset.click_rate must be in (0, 1), got {self.click_rate}")
        if not 0.0 < self.purchase_rate < self.click_rate:
            raise ValueError(
                f"SynthPreset.purchase_rate must be in (0, click_rate={self.click_rate}), "
                f"got {self.purchase_rate} (a purchase needs a click)"
            )
        if self.num_clusters > MIN_ENTITIES:
            raise ValueError(
                f"SynthPreset.num_clusters must be <= {MIN_ENTITIES} (the fewest users/items at any "
                f"scale), got {self.num_clusters}"
            )
        for name in ("user_zipf", "item_zipf"):
            if not 0.0 <= getattr(self, name) <= 3.0:
                raise ValueError(f"SynthPreset.{name} must be in [0, 3], got {getattr(self, name)}")
        for name in ("in_cluster_exposure", "profile_cluster_corr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SynthPreset.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.profile_leakage is not None and not 0.0 <= self.profile_leakage <= 1.0:
            raise ValueError(
                f"SynthPreset.profile_leakage must be in [0, 1] or None, got {self.profile_leakage}"
            )
        for name in (
            "latent_noise",
            "affinity_click",
            "affinity_purchase",
            "bait_std",
            "necessity_std",
            "necessity_click_penalty",
            "bait_purchase_penalty",
            "user_propensity_std",
            "context_strength",
        ):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"SynthPreset.{name} must be finite and >= 0, got {v}")

    def sizes(self, scale: float) -> dict[str, int]:
        """Row and entity counts at ``scale`` (linear, with floors so tiny runs stay meaningful)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        return {
            "train": max(MIN_SPLIT_ROWS, round(self.train_rows * scale)),
            "val": max(MIN_SPLIT_ROWS, round(self.val_rows * scale)),
            "test": max(MIN_SPLIT_ROWS, round(self.test_rows * scale)),
            "num_users": max(MIN_ENTITIES, round(self.num_users * scale)),
            "num_items": max(MIN_ENTITIES, round(self.num_items * scale)),
        }


PRESETS: dict[str, SynthPreset] = {
    "fair": SynthPreset(
        description="the experiments' instrument: ~200 train impressions per user and ~400 per item so "
        "interactions are learnable, 5,000 test purchases at scale 1, profiles that leak the clusters "
        "only weakly (docs/experiments/README.md)",
        train_rows=400_000,
        val_rows=40_000,
        test_rows=275_000,
        num_users=2_000,
        num_items=1_000,
        click_rate=0.15,
        purchase_rate=0.02,
        profile_leakage=0.25,
    ),
    "demo": SynthPreset(
        description="small and label-rich so a laptop run learns something in minutes",
        train_rows=300_000,
        val_rows=30_000,
        test_rows=100_000,
        num_users=5_000,
        num_items=2_000,
        click_rate=0.10,
        purchase_rate=0.01,
    ),
    "aliccp-like": SynthPreset(
        description="shape of Ali-CCP (paper Table 1, Public)",
        train_rows=38_000_000,
        val_rows=4_200_000,
        test_rows=43_000_000,
        num_users=200_000,
        num_items=500_000,
        click_rate=0.0389,
        purchase_rate=0.0002,
        num_clusters=32,
    ),
    "industrial-like": SynthPreset(
        description="shape of the paper's industrial data set (Table 1)",
        train_rows=465_000_000,
        val_rows=45_000_000,
        test_rows=44_000_000,
        num_users=30_000_000,
        num_items=280_000,
        click_rate=0.0704,
        purchase_rate=0.0028,
        num_clusters=32,
    ),
}

# The conflict-strength axis (pre-registered in docs/experiments/README.md before any model ran on it):
# the purchase-given-click penalty of click-bait. Bait adds +1·bait to the click logit; over all
# impressions the purchase log-probability moves by about (1 − p_click) − penalty·(1 − p_buy) per unit
# of bait, i.e. about 1 − penalty at small rates. "none": bait has no net effect on purchases over
# all impressions (it still conflicts among clicked rows); "moderate" / "strong": net effect −1 / −2.
CONFLICT_LEVELS: dict[str, float] = {"none": 1.0, "moderate": 2.0, "strong": 3.0}


def preset_with(
    preset: str | SynthPreset, *, conflict: str | None = None, profile_leakage: float | None = None
) -> SynthPreset:
    """``preset`` with the conflict level and / or the profile leakage set (the CLI's knobs)."""
    p = _resolve(preset)
    changes: dict[str, float] = {}
    if conflict is not None:
        if conflict not in CONFLICT_LEVELS:
            raise ValueError(f"unknown conflict level {conflict!r}; valid: {list(CONFLICT_LEVELS)}")
        changes["bait_purchase_penalty"] = CONFLICT_LEVELS[conflict]
    if profile_leakage is not None:
        changes["profile_leakage"] = float(profile_leakage)
    return replace(p, **changes) if changes else p


# --- seeded hashing: per-id values without per-id state ----------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed uint64 -> uint64 map (wraps modulo 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _hash(key: int, salt: int, ids: np.ndarray) -> np.ndarray:
    """Hash of (dataset key, salt, id); ids may have any shape."""
    base = _mix64(np.array([(key * 1_000_003 + salt) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _mix64(ids.astype(np.uint64) * _GOLDEN + base)


def _hash_uniform(h: np.ndarray) -> np.ndarray:
    """Uniform in (0, 1) from the top 53 bits of a hash."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def _hash_normal(h: np.ndarray) -> np.ndarray:
    """Standard normal from one 64-bit hash (Box-Muller on its two 32-bit halves)."""
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / (1 << 32))
    u2 = ((h & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * (1.0 / (1 << 32))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _power_law_rank(u: np.ndarray, n: np.ndarray | int, s: float) -> np.ndarray:
    """Rank in [0, n) with P(rank = r) roughly proportional to (r + 1)^-s (inverse CDF, O(1) memory)."""
    n1 = np.asarray(n, dtype=np.float64) + 1.0
    if abs(1.0 - s) < 1e-9:
        x = np.power(n1, u)
    else:
        e = 1.0 - s
        x = np.power(1.0 + u * (np.power(n1, e) - 1.0), 1.0 / e)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, np.asarray(n, dtype=np.int64) - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _decile(score: np.ndarray) -> np.ndarray:
    return np.searchsorted(_NORMAL_DECILES, score).astype(np.int64)


# --- the world: per-entity state ---------------------------------------------------------------
class SynthWorld:
    """Per-entity ground truth of one (preset, scale, seed): clusters, latents, item factors.

    Public so tests and benchmarks can check what a model or the kNN step recovers against the truth
    (e.g. kNN recall of same-cluster neighbours); ``build_world`` rebuilds it without the data. ``day`` > 1
    builds day 1's world first, then grows it (:meth:`_grow`, module docstring "Days").
    """

    def __init__(
        self,
        preset: SynthPreset,
        scale: float,
        seed: int,
        *,
        day: int = 1,
        growth: float = DEFAULT_GROWTH,
        drift: float = DEFAULT_DRIFT,
    ) -> None:
        check_day(day, growth, drift)
        self.preset = preset
        self.scale = float(scale)
        self.seed = int(seed)
        self.day, self.growth, self.drift = int(day), float(growth), float(drift)
        self.sizes = preset.sizes(scale)
        self.num_users = self.sizes["num_users"]
        self.num_items = self.sizes["num_items"]
        self.key = int(seed) * 2_654_435_761 + 12_345
        p = preset
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1_000_001]))
        c, d = p.num_clusters, p.latent_dim

        centres = rng.standard_normal((c, d))
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        # Mildly unequal cluster sizes, as real taste groups are.
        w = 1.0 / np.sqrt(np.arange(1, c + 1))
        cluster_p = w / w.sum()

        # Users: compact state (cluster id + popularity permutation); the rest is hashed from the id.
        self.user_cluster = rng.choice(c, size=self.num_users, p=cluster_p).astype(np.int16)
        self.user_rank_to_id = rng.permutation(self.num_users).astype(np.int32)

        # Items: full state (the catalogue is small next to the user base).
        icl = rng.choice(c, size=self.num_items, p=cluster_p)
        icl[rng.permutation(self.num_items)[:c]] = np.arange(c)  # every cluster has items
        self.item_cluster = icl.astype(np.int16)
        noise = rng.standard_normal((self.num_items, d)) * (p.latent_noise / math.sqrt(d))
        self.item_latent = (self.centres[icl] + noise).astype(np.float32)
        self.item_centre_dot = (self.item_latent @ self.centres.T).astype(np.float32)  # [N_I, C]
        self.item_bait = (rng.standard_normal(self.num_items) * p.bait_std).astype(np.float32)
        self.item_necessity = (rng.standard_normal(self.num_items) * p.necessity_std).astype(np.float32)
        item_rank_to_id = rng.permutation(self.num_items)
        self.item_rank_to_id = item_rank_to_id.astype(np.int32)
        item_rank = np.empty(self.num_items, dtype=np.int64)
        item_rank[item_rank_to_id] = np.arange(self.num_items)
        # Items grouped by cluster, each group in global popularity order.
        self.cluster_items = np.lexsort((item_rank, icl)).astype(np.int32)
        self.cluster_count = np.bincount(icl, minlength=c).astype(np.int64)
        self.cluster_start = np.concatenate([[0], np.cumsum(self.cluster_count)[:-1]]).astype(np.int64)

        # Item profile fields.
        corr = p.profile_cluster_corr
        leak = p.profile_leakage
        ncat = ITEM_PROFILE_VOCAB["item_category"]
        pref_cat = rng.integers(0, ncat, size=c)
        self.item_category = np.where(
            rng.random(self.num_items) < (max(corr, 0.8) if leak is None else leak),
            pref_cat[icl],
            rng.integers(0, ncat, self.num_items),
        ).astype(np.int64)
        nbrand = ITEM_PROFILE_VOCAB["item_brand"]
        pref_brand = rng.integers(0, nbrand, size=c)
        self.item_brand = np.where(
            rng.random(self.num_items) < (corr * 0.5 if leak is None else leak),
            pref_brand[icl],
            rng.integers(0, nbrand, self.num_items),
        ).astype(np.int64)
        nec_z = self.item_necessity / max(p.necessity_std, 1e-12)
        self.item_price = _decile(0.6 * nec_z + 0.8 * rng.standard_normal(self.num_items))
        self.device_effect = _DEVICE_EFFECT * p.context_strength
        self.cluster_p = cluster_p
        if self.day > 1:
            self._grow(pref_cat, pref_brand)

    # --- later days (module docstring, "Days") ----------------------------------------------------
    def _grow(self, pref_cat: np.ndarray, pref_brand: np.ndarray) -> None:
        """Turns the day-1 world into day ``self.day``'s: appended entities, merged popularity, drift."""
        p, c, d = self.preset, self.preset.num_clusters, self.preset.latent_dim
        factor = (1.0 + self.growth) ** (self.day - 1)
        n_u1, n_i1 = self.num_users, self.num_items
        n_u, n_i = round(n_u1 * factor), round(n_i1 * factor)
        self.sizes = {**self.sizes, "num_users": n_u, "num_items": n_i}
        self.num_users, self.num_items = n_u, n_i
        cdf = np.cumsum(self.cluster_p)

        def uniform(salt: str, ids: np.ndarray) -> np.ndarray:
            return _hash_uniform(_hash(self.key, _SALT[salt], ids))

        def normal(salt: str, ids: np.ndarray) -> np.ndarray:
            return _hash_normal(_hash(self.key, _SALT[salt], ids))

        def cluster_of(salt: str, ids: np.ndarray) -> np.ndarray:
            return np.minimum(np.searchsorted(cdf, uniform(salt, ids)), c - 1).astype(np.int16)

        def popularity(rank_to_id: np.ndarray, n1: int, n: int, salt: str) -> np.ndarray:
            # old ids keep their relative order; new ids are slotted in at per-id uniform positions
            key = np.empty(n, dtype=np.float64)
            key[rank_to_id] = (np.arange(n1) + 0.5) / n1
            key[n1:] = uniform(salt, np.arange(n1, n))
            return np.argsort(key, kind="stable").astype(np.int32)

        new_u = np.arange(n_u1, n_u)
        self.user_cluster = np.concatenate([self.user_cluster, cluster_of("new_user_cluster", new_u)])
        self.user_rank_to_id = popularity(self.user_rank_to_id, n_u1, n_u, "new_user_popularity")

        new_i = np.arange(n_i1, n_i)
        icl_new = cluster_of("new_item_cluster", new_i)
        cells = new_i.astype(np.uint64)[:, None] * np.uint64(d) + np.arange(d, dtype=np.uint64)[None, :]
        noise = normal("new_item_noise", cells) * (p.latent_noise / math.sqrt(d))
        latent_new = (self.centres[icl_new] + noise).astype(np.float32)
        bait_new = (normal("new_item_bait", new_i) * p.bait_std).astype(np.float32)
        nec_new = (normal("new_item_necessity", new_i) * p.necessity_std).astype(np.float32)
        corr, leak = p.profile_cluster_corr, p.profile_leakage
        ncat, nbrand = ITEM_PROFILE_VOCAB["item_category"], ITEM_PROFILE_VOCAB["item_brand"]
        cat_new = np.where(
            uniform("new_item_category_pick", new_i) < (max(corr, 0.8) if leak is None else leak),
            pref_cat[icl_new],
            _hash(self.key, _SALT["new_item_category"], new_i) % np.uint64(ncat),
        ).astype(np.int64)
        brand_new = np.where(
            uniform("new_item_brand_pick", new_i) < (corr * 0.5 if leak is None else leak),
            pref_brand[icl_new],
            _hash(self.key, _SALT["new_item_brand"], new_i) % np.uint64(nbrand),
        ).astype(np.int64)
        nec_z = nec_new / max(p.necessity_std, 1e-12)
        price_new = _decile(0.6 * nec_z + 0.8 * normal("new_item_price", new_i))

        self.item_cluster = np.concatenate([self.item_cluster, icl_new])
        self.item_latent = np.concatenate([self.item_latent, latent_new])
        self.item_bait = np.concatenate([self.item_bait, bait_new])
        self.item_necessity = np.concatenate([self.item_necessity, nec_new])
        self.item_category = np.concatenate([self.item_category, cat_new])
        self.item_brand = np.concatenate([self.item_brand, brand_new])
        self.item_price = np.concatenate([self.item_price, price_new])
        self.item_rank_to_id = popularity(self.item_rank_to_id, n_i1, n_i, "new_item_popularity")
        self.item_latent = self.item_latent + self._drift(np.arange(n_i), item=True)
        self.item_centre_dot = (self.item_latent @ self.centres.T).astype(np.float32)
        item_rank = np.empty(n_i, dtype=np.int64)
        item_rank[self.item_rank_to_id] = np.arange(n_i)
        icl = self.item_cluster.astype(np.int64)
        self.cluster_items = np.lexsort((item_rank, icl)).astype(np.int32)
        self.cluster_count = np.bincount(icl, minlength=c).astype(np.int64)
        self.cluster_start = np.concatenate([[0], np.cumsum(self.cluster_count)[:-1]]).astype(np.int64)

    def _drift(self, ids: np.ndarray, *, item: bool) -> np.ndarray:
        """[n, latent_dim] cumulative taste drift up to ``self.day``: the sum over days ``2..day`` of a
        per-(day, id) ``N(0, (drift^2 / latent_dim) I)`` step (a random walk; 0 on day 1)."""
        d = self.preset.latent_dim
        out = np.zeros((ids.size, d), dtype=np.float64)
        if self.day <= 1 or self.drift == 0.0:
            return out.astype(np.float32)
        cells = ids.astype(np.uint64)[:, None] * np.uint64(d) + np.arange(d, dtype=np.uint64)[None, :]
        for day in range(2, self.day + 1):
            out += _hash_normal(_hash(self.key, _DRIFT_SALT + 2 * day + int(item), cells))
        return (out * (self.drift / math.sqrt(d))).astype(np.float32)

    # Per-user quantities derived from the id (no per-user storage beyond the cluster).
    def user_noise(self, uid: np.ndarray) -> np.ndarray:
        """[n, latent_dim] float32 offset of each user's latent from its cluster centre (noise, plus the
        drift so far on a later day)."""
        d = self.preset.latent_dim
        cells = uid.astype(np.uint64)[:, None] * np.uint64(d) + np.arange(d, dtype=np.uint64)[None, :]
        z = _hash_normal(_hash(self.key, _SALT["user_noise"], cells))
        noise = (z * (self.preset.latent_noise / math.sqrt(d))).astype(np.float32)
        if self.day > 1:  # later days: the taste drift so far, added to the noise (recomputed, not stored)
            noise = noise + self._drift(uid, item=False)
        return noise

    def user_latent(self, uid: np.ndarray) -> np.ndarray:
        """[n, latent_dim] latent vectors (cluster centre + noise) of the given users."""
        return self.centres[self.user_cluster[uid]] + self.user_noise(uid)

    def user_propensity(self, uid: np.ndarray) -> np.ndarray:
        z = _hash_normal(_hash(self.key, _SALT["user_prop"], uid))
        return (z * self.preset.user_propensity_std).astype(np.float32)

    def truth(
        self, uid: np.ndarray, iid: np.ndarray, hour: np.ndarray, position: np.ndarray, device: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The ground-truth terms of impressions (steps 2, 4–6), before the calibrated biases.

        A function of the row's ids and context only, so the partial oracles of the experiment reports
        (``cstwa_dist/experiments/oracles.py``) recompute it for any written row: ``affinity``, ``bait``,
        ``necessity``, ``propensity``, ``context`` and the two logits ``click_logit`` and ``buy_logit``
        (add ``bias_ctr`` / ``bias_cvr`` from ``synth.json`` and apply a sigmoid for the probabilities).
        """
        p = self.preset
        uid = np.asarray(uid, dtype=np.int64)
        iid = np.asarray(iid, dtype=np.int64)
        ucl = self.user_cluster[uid].astype(np.int64)
        # aff = (m_cu + noise_u) . l_i = (l_i . m_cu) + noise_u . l_i
        aff = self.item_centre_dot[iid, ucl]
        aff = aff + np.einsum("nd,nd->n", self.user_noise(uid), self.item_latent[iid])
        ctx = (
            p.context_strength
            * (
                0.2 * np.sin(2.0 * np.pi * np.asarray(hour) / 24.0).astype(np.float32)
                - 0.08 * np.asarray(position).astype(np.float32)
            )
            + self.device_effect[np.asarray(device)]
        )
        bait = self.item_bait[iid]
        nec = self.item_necessity[iid]
        prop = self.user_propensity(uid)
        click_logit = p.affinity_click * aff + bait - p.necessity_click_penalty * nec + ctx
        buy_logit = p.affinity_purchase * aff - p.bait_purchase_penalty * bait + nec + prop
        return {
            "affinity": aff.astype(np.float32),
            "bait": bait,
            "necessity": nec,
            "propensity": prop,
            "context": ctx.astype(np.float32),
            "click_logit": click_logit.astype(np.float32),
            "buy_logit": buy_logit.astype(np.float32),
        }

    def user_profile(self, uid: np.ndarray) -> dict[str, np.ndarray]:
        """Profile fields of the given users: functions of the id only (and of its cluster)."""
        ucl = self.user_cluster[uid].astype(np.int64)
        out: dict[str, np.ndarray] = {}
        for k, (name, vocab) in enumerate(USER_PROFILE_VOCAB.items()):
            if name == "user_level":
                prop_z = _hash_normal(_hash(self.key, _SALT["user_prop"], uid))
                noise = _hash_normal(_hash(self.key, _SALT["user_level"], uid))
                out[name] = _decile(0.8 * prop_z + 0.6 * noise)
                continue
            pick = _hash_uniform(_hash(self.key, _SALT["profile_pick"] + k, uid))
            own = _hash(self.key, _SALT["profile_value"] + k, uid) % np.uint64(vocab)
            pref = _hash(self.key, _SALT["cluster_value"] + k, ucl) % np.uint64(vocab)
            leak = self.preset.profile_leakage
            corr = self.preset.profile_cluster_corr if leak is None else leak
            out[name] = np.where(pick < corr, pref, own).astype(np.int64)
        return out


def check_day(day: int, growth: float, drift: float) -> None:
    """Refuses a day before 1 and a negative or non-finite growth or drift."""
    if isinstance(day, bool) or int(day) != day or day < 1:
        raise ValueError(f"synth day must be an integer >= 1, got {day}")
    for name, v in (("growth", growth), ("drift", drift)):
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"synth {name} must be finite and >= 0, got {v}")


def build_world(
    preset: str | SynthPreset,
    scale: float,
    seed: int,
    *,
    day: int = 1,
    growth: float = DEFAULT_GROWTH,
    drift: float = DEFAULT_DRIFT,
) -> SynthWorld:
    """The ground truth behind ``generate(preset, scale, seed, ...)``, without writing any data."""
    return SynthWorld(_resolve(preset), scale, seed, day=day, growth=growth, drift=drift)


def world_of(dataset: str | Path) -> tuple[SynthWorld, dict]:
    """The world behind a written synthetic data set (from its ``synth.json``) and that metadata.

    Raises FileNotFoundError for a data set that ``synth`` did not write (an import has no ground truth).
    """
    path = Path(dataset) / "synth.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a synthetic data set (no ground truth to compare with)")
    meta = json.loads(path.read_text())
    world = SynthWorld(
        SynthPreset(**meta["preset"]),
        meta["scale"],
        meta["seed"],
        day=meta.get("day", 1),  # written before days existed: day 1
        growth=meta.get("growth", DEFAULT_GROWTH),
        drift=meta.get("drift", DEFAULT_DRIFT),
    )
    return world, meta


def _resolve(preset: str | SynthPreset) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; valid: {sorted(PRESETS)}")
    return PRESETS[preset]


def dataset_spec(world: SynthWorld) -> DatasetSpec:
    """Field order: user side, item side, context (the spec's column order)."""
    fields = [FieldSpec(name="user_id", side="user", vocab_size=world.num_users)]
    fields += [FieldSpec(name=n, side="user", vocab_size=v) for n, v in USER_PROFILE_VOCAB.items()]
    fields.append(FieldSpec(name="item_id", side="item", vocab_size=world.num_items))
    fields += [FieldSpec(name=n, side="item", vocab_size=v) for n, v in ITEM_PROFILE_VOCAB.items()]
    fields += [FieldSpec(name=n, side="context", vocab_size=v) for n, v in CONTEXT_VOCAB.items()]
    return DatasetSpec(fields=tuple(fields), user_id="user_id", item_id="item_id")


# --- impressions -------------------------------------------------------------------------------
def _sample_impressions(
    world: SynthWorld, rng: np.random.Generator, n: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Features of ``n`` impressions plus their click and buy-given-click logits before the biases."""
    p = world.preset
    uid = world.user_rank_to_id[_power_law_rank(rng.random(n), world.num_users, p.user_zipf)].astype(np.int64)
    ucl = world.user_cluster[uid].astype(np.int64)

    global_item = world.item_rank_to_id[_power_law_rank(rng.random(n), world.num_items, p.item_zipf)]
    in_cluster = rng.random(n) < p.in_cluster_exposure
    cnt = world.cluster_count[ucl]
    local_rank = _power_law_rank(rng.random(n), cnt, p.item_zipf)
    cluster_item = world.cluster_items[world.cluster_start[ucl] + local_rank]
    iid = np.where(in_cluster, cluster_item, global_item).astype(np.int64)

    hour = rng.integers(0, CONTEXT_VOCAB["ctx_hour"], size=n)
    position = rng.choice(CONTEXT_VOCAB["ctx_position"], size=n, p=_POSITION_PROBS)
    device = rng.choice(CONTEXT_VOCAB["ctx_device"], size=n, p=_DEVICE_PROBS)

    truth = world.truth(uid, iid, hour, position, device)

    cols: dict[str, np.ndarray] = {"user_id": uid}
    cols.update(world.user_profile(uid))
    cols["item_id"] = iid
    cols["item_category"] = world.item_category[iid]
    cols["item_brand"] = world.item_brand[iid]
    cols["item_price"] = world.item_price[iid]
    cols["ctx_hour"] = hour.astype(np.int64)
    cols["ctx_position"] = position.astype(np.int64)
    cols["ctx_device"] = device.astype(np.int64)
    return cols, truth["click_logit"], truth["buy_logit"]


def _bisect_bias(
    f: Callable[[float], float], target: float, lo: float = -40.0, hi: float = 40.0, iters: int = 80
) -> float:
    """Solve f(b) = target for a function increasing in b."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def calibrate(world: SynthWorld) -> dict[str, float]:
    """Biases that make the expected click and purchase rates equal the preset's targets.

    Done on a pilot sample from the same distribution as the splits (its own RNG stream), because the
    rates depend on the whole mix of users, items and contexts, which has no closed form.
    """
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, 2_000_003, *_day_key(world)]))
    _, click_logit, buy_logit = _sample_impressions(world, rng, PILOT_ROWS)
    cl = click_logit.astype(np.float64)
    bl = buy_logit.astype(np.float64)
    p = world.preset
    b_ctr = _bisect_bias(lambda b: float(_sigmoid(cl + b).mean()), p.click_rate)
    p_click = _sigmoid(cl + b_ctr)
    b_cvr = _bisect_bias(lambda b: float((p_click * _sigmoid(bl + b)).mean()), p.purchase_rate)
    return {
        "bias_ctr": b_ctr,
        "bias_cvr": b_cvr,
        "expected_click_rate": float(p_click.mean()),
        "expected_purchase_rate": float((p_click * _sigmoid(bl + b_cvr)).mean()),
    }


def _day_key(world: SynthWorld) -> list[int]:
    """Extra RNG seed words of a day: none on day 1 (its streams are the historical ones), else the day."""
    return [] if world.day == 1 else [1_000_000 + world.day]


def _chunks(
    world: SynthWorld, biases: dict[str, float], split: str, rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """The split's rows in fixed chunks, each from its own RNG stream keyed by (seed, split, chunk, day)."""
    split_idx = SPLITS.index(split)
    for chunk_idx, start in enumerate(range(0, rows, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, rows - start)
        rng = np.random.default_rng(
            np.random.SeedSequence([world.seed, split_idx, chunk_idx, *_day_key(world)])
        )
        cols, click_logit, buy_logit = _sample_impressions(world, rng, n)
        p_click = _sigmoid(click_logit + np.float32(biases["bias_ctr"]))
        p_buy = _sigmoid(buy_logit + np.float32(biases["bias_cvr"]))
        click = rng.random(n, dtype=np.float32) < p_click
        purchase = click & (rng.random(n, dtype=np.float32) < p_buy)
        cols["click"] = click.astype(np.int8)
        cols["purchase"] = purchase.astype(np.int8)
        yield cols


def generate(
    preset: str | SynthPreset,
    scale: float,
    seed: int,
    out: str | Path,
    *,
    rows_per_file: int | None = None,
    progress: bool = True,
    name: str | None = None,
    day: int = 1,
    growth: float = DEFAULT_GROWTH,
    drift: float = DEFAULT_DRIFT,
) -> dict[str, SplitStats]:
    """Write a synthetic data set to ``out`` and return the per-split statistics (also in stats.json).

    ``rows_per_file`` overrides ``default_rows_per_file`` for every split; it changes only how rows
    are cut into files, never the rows themselves. Raises FileExistsError if ``out`` exists and is not
    an empty directory. ``name`` is the preset name recorded in ``synth.json`` (for a preset changed
    by :func:`preset_with`; the changed knobs are recorded with the whole preset). ``day``, ``growth`` and
    ``drift``: the world on a later day (module docstring, "Days"); day 1 is the same whatever the other
    two are.
    """
    p = _resolve(preset)
    preset_name = name or (preset if isinstance(preset, str) else "custom")
    if rows_per_file is not None and int(rows_per_file) < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    check_day(day, growth, drift)
    out = Path(out)
    with staged_directory(out, "data set") as tmp:  # refuses an existing data set before any work
        t0 = time.perf_counter()
        world = SynthWorld(p, scale, seed, day=day, growth=growth, drift=drift)
        biases = calibrate(world)
        spec = dataset_spec(world)
        logger.info(
            "synth %s scale=%g seed=%d day=%d: users=%d items=%d rows train/val/test=%d/%d/%d; "
            "calibrated b_ctr=%.3f b_cvr=%.3f (setup %.1fs)",
            preset_name,
            scale,
            seed,
            world.day,
            world.num_users,
            world.num_items,
            world.sizes["train"],
            world.sizes["val"],
            world.sizes["test"],
            biases["bias_ctr"],
            biases["bias_cvr"],
            time.perf_counter() - t0,
        )
        stats = {
            split: _write_split(world, biases, spec, split, tmp / split, rows_per_file, progress)
            for split in SPLITS
        }
        write_metadata(tmp, spec, stats, progress=progress)
        Vocabulary.identity(spec).save(tmp / VOCAB_DIR)
        meta = {
            "preset_name": preset_name,
            "preset": asdict(p),
            "scale": float(scale),
            "seed": int(seed),
            "day": world.day,
            "growth": world.growth,
            "drift": world.drift,
            "sizes": world.sizes,
            "chunk_rows": CHUNK_ROWS,
            **biases,
        }
        atomic_write_json(tmp / "synth.json", meta)
    logger.info("synth %s written to %s in %.1fs", preset_name, out, time.perf_counter() - t0)
    return stats


def _write_split(
    world: SynthWorld,
    biases: dict[str, float],
    spec: DatasetSpec,
    split: str,
    directory: Path,
    rows_per_file: int | None,
    progress: bool,
) -> SplitStats:
    rows = world.sizes[split]
    rpf = int(rows_per_file) if rows_per_file is not None else default_rows_per_file(rows)
    # Chunks go to the files as generated (CHUNK_ROWS is part of the generator's definition).
    acc = SplitAccumulator(directory, spec, rpf, zero_is_unknown=False, align_row_groups=False)
    prog = Progress(f"synth {split}", rows, progress, unit="rows", log=logger)
    for cols in _chunks(world, biases, split, rows):
        acc.write(cols)
        prog.step(len(cols["click"]))
    stats = acc.close()
    prog.finish()
    logger.log(
        prog.level,
        "synth %s: %d files, click %.4f purchase %.5f",
        split,
        stats.extra["files"],
        stats.click_rate,
        stats.purchase_rate,
    )
    return stats
