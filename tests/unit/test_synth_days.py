"""Synthetic days (synth.py docstring, "Days"): later days grow the same world, keep every earlier id's
entity, drift tastes a little, draw new impressions, and day 1 stays the historical output."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cstwa_dist import cli
from cstwa_dist.data.spec import DatasetSpec, split_files
from cstwa_dist.data.synth import build_world, generate, world_of
from cstwa_dist.data.vocab import VocabError, Vocabulary

SCALE = 0.05  # demo: 1000-row floors per split, 250 users, 100 items
SEED = 3


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("days")
    out = {}
    for day in (1, 2):
        out[day] = root / f"day{day}"
        generate("demo", SCALE, SEED, out[day], progress=False, day=day)
    return out


def test_day_two_grows_and_keeps_every_entity() -> None:
    w1 = build_world("demo", SCALE, SEED)
    w2 = build_world("demo", SCALE, SEED, day=2)
    w3 = build_world("demo", SCALE, SEED, day=3)
    assert (w2.num_users, w2.num_items) == (round(w1.num_users * 1.1), round(w1.num_items * 1.1))
    assert (w3.num_users, w3.num_items) == (round(w1.num_users * 1.1**2), round(w1.num_items * 1.1**2))
    nu, ni = w1.num_users, w1.num_items
    uid = np.arange(nu)
    assert np.array_equal(w2.user_cluster[:nu], w1.user_cluster)
    assert np.array_equal(w2.user_propensity(uid), w1.user_propensity(uid))
    for name, col in w1.user_profile(uid).items():
        assert np.array_equal(w2.user_profile(uid)[name], col), name
    for attr in ("item_cluster", "item_bait", "item_necessity", "item_category", "item_brand", "item_price"):
        assert np.array_equal(getattr(w2, attr)[:ni], getattr(w1, attr)), attr
    # an id added on day 2 is the same entity on day 3
    nu2, ni2 = w2.num_users, w2.num_items
    assert np.array_equal(w3.user_cluster[:nu2], w2.user_cluster)
    for attr in ("item_cluster", "item_bait", "item_category", "item_price"):
        assert np.array_equal(getattr(w3, attr)[:ni2], getattr(w2, attr)), attr
    # popularity: old ids keep their relative order among themselves
    r1 = w1.item_rank_to_id
    r2 = w2.item_rank_to_id
    assert np.array_equal(r2[r2 < ni], r1) and sorted(r2.tolist()) == list(range(ni2))
    # every cluster still has items, and the cluster index covers the grown catalogue
    assert w2.cluster_count.sum() == ni2 and (w2.cluster_count > 0).all()


def test_drift_is_a_small_cumulative_walk() -> None:
    w1 = build_world("demo", SCALE, SEED)
    w2 = build_world("demo", SCALE, SEED, day=2, drift=0.05)
    w3 = build_world("demo", SCALE, SEED, day=3, drift=0.05)
    ni = w1.num_items
    step2 = np.linalg.norm(w2.item_latent[:ni] - w1.item_latent, axis=1)
    assert step2.mean() == pytest.approx(0.05, rel=0.25)
    step23 = np.linalg.norm(w3.item_latent[:ni] - w2.item_latent[:ni], axis=1)
    assert step23.mean() == pytest.approx(0.05, rel=0.25)  # day 3 continues day 2's walk
    uid = np.arange(w1.num_users)
    du = np.linalg.norm(w2.user_noise(uid) - w1.user_noise(uid), axis=1)
    assert du.mean() == pytest.approx(0.05, rel=0.25)
    still = build_world("demo", SCALE, SEED, day=2, drift=0.0)
    assert np.array_equal(still.item_latent[:ni], w1.item_latent)


def test_day_two_dataset_extends_day_one(days: dict[int, Path]) -> None:
    s1, s2 = DatasetSpec.load(days[1]), DatasetSpec.load(days[2])
    assert s2.num_users > s1.num_users and s2.num_items > s1.num_items
    v1, v2 = Vocabulary.load(days[1]), Vocabulary.load(days[2])
    assert v2.fields["user_id"].size == s2.num_users and v2.fields["user_id"].kind == "identity"
    v2.check_extends(v1)
    with pytest.raises(VocabError, match="user_id"):
        v1.check_extends(v2)
    meta = json.loads((days[2] / "synth.json").read_text())
    assert (meta["day"], meta["growth"], meta["drift"]) == (2, 0.1, 0.05)
    world, _ = world_of(days[2])
    assert (world.day, world.num_users) == (2, s2.num_users)
    # impressions differ from day 1's and reach the new ids
    t1 = pq.read_table(split_files(days[1], "train")[0]).to_pandas()
    t2 = pq.read_table(split_files(days[2], "train")[0]).to_pandas()
    assert not t1["user_id"].head(100).equals(t2["user_id"].head(100))
    assert (t2["user_id"] >= s1.num_users).any() and (t2["item_id"] >= s1.num_items).any()


def test_day_one_is_the_historical_output(days: dict[int, Path], tmp_path: Path) -> None:
    """Day 1 ignores growth and drift: its files equal a default generation's (synth.json records them)."""
    out = tmp_path / "d1"
    generate("demo", SCALE, SEED, out, progress=False, day=1, growth=0.7, drift=0.9)
    files = sorted(p.relative_to(days[1]) for p in days[1].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert Path("vocab/vocab.json") in files
    differ = [str(f) for f in files if not filecmp.cmp(days[1] / f, out / f, shallow=False)]
    assert differ == ["synth.json"]
    a, b = json.loads((days[1] / "synth.json").read_text()), json.loads((out / "synth.json").read_text())
    assert {k for k in a if a[k] != b[k]} == {"growth", "drift"}


def test_bad_day_arguments(tmp_path: Path) -> None:
    for bad in (["--day", "0"], ["--growth", "-0.1"], ["--drift", "nan"]):
        args = ["synth", "--preset", "demo", "--scale", "0.01", "--out", str(tmp_path / "x"), *bad]
        assert cli.main(args) == 2, bad
    assert not (tmp_path / "x").exists()
