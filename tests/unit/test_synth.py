"""The synthetic generator: labels, layout and the structure it promises to carry (synth.py docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cstwa_dist.data.spec import LABELS, SPLITS, DatasetSpec, load_stats, split_files
from cstwa_dist.data.synth import (
    MIN_ENTITIES,
    MIN_SPLIT_ROWS,
    PRESETS,
    SynthPreset,
    build_world,
    dataset_spec,
    generate,
)
from cstwa_dist.data.writer import dataset_complete

SCALE = 0.2  # demo: 60k/6k/20k rows, 1000 users, 400 items; about a second to write
SEED = 7


def _read_split(out: Path, split: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in split_files(out, split)], ignore_index=True)


def _read_all(out: Path) -> pd.DataFrame:
    return pd.concat([_read_split(out, s) for s in SPLITS], ignore_index=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "demo"
    generate("demo", SCALE, SEED, out, progress=False)
    return out


@pytest.fixture(scope="module")
def demo_df(demo: Path) -> pd.DataFrame:
    return _read_all(demo)


def test_rates_match_preset_targets(demo: Path, demo_df: pd.DataFrame) -> None:
    preset = PRESETS["demo"]
    meta = json.loads((demo / "synth.json").read_text())
    # The calibration is exact in expectation (on the pilot sample) ...
    assert meta["expected_click_rate"] == pytest.approx(preset.click_rate, rel=0.01)
    assert meta["expected_purchase_rate"] == pytest.approx(preset.purchase_rate, rel=0.01)
    # ... and the realised rates differ only by Bernoulli noise (~1% / ~3.5% relative std here).
    assert demo_df["click"].mean() == pytest.approx(preset.click_rate, rel=0.05)
    assert demo_df["purchase"].mean() == pytest.approx(preset.purchase_rate, rel=0.12)


def test_purchase_implies_click(demo_df: pd.DataFrame) -> None:
    assert demo_df["purchase"].sum() > 0
    assert not ((demo_df["purchase"] == 1) & (demo_df["click"] == 0)).any()
    assert set(demo_df["click"].unique()) <= {0, 1}


def test_stats_match_parquet(demo: Path) -> None:
    stats = load_stats(demo / "stats.json")
    world = build_world("demo", SCALE, SEED)
    assert set(stats) == set(SPLITS)
    for split in SPLITS:
        df = _read_split(demo, split)
        s = stats[split]
        assert s.rows == len(df) == world.sizes[split]
        assert s.click_rate == pytest.approx(df["click"].mean())
        assert s.purchase_rate == pytest.approx(df["purchase"].mean())
        assert s.users == df["user_id"].nunique()
        assert s.items == df["item_id"].nunique()
        assert s.extra["files"] == len(split_files(demo, split))
    # Every split is cut into several files so several ranks get a share.
    assert len(split_files(demo, "train")) >= 4


def test_spec_round_trip_dtypes_and_vocab(demo: Path) -> None:
    spec = DatasetSpec.load(demo)
    assert spec == dataset_spec(build_world("demo", SCALE, SEED))
    assert spec.num_users == PRESETS["demo"].sizes(SCALE)["num_users"]
    assert spec.num_items == PRESETS["demo"].sizes(SCALE)["num_items"]
    assert [f.name for f in spec.user_fields][0] == "user_id"
    assert len(spec.user_fields) == 5 and len(spec.item_fields) == 4 and len(spec.context_fields) == 3
    table = pq.read_table(split_files(demo, "train")[0])
    assert table.schema.names == spec.names + list(LABELS)
    for f in spec.fields:
        assert str(table.schema.field(f.name).type) == "int64"
    for label in LABELS:
        assert str(table.schema.field(label).type) == "int8"
    md = pq.ParquetFile(split_files(demo, "train")[0]).metadata
    assert all(md.row_group(i).num_rows <= 131072 for i in range(md.num_row_groups))
    df = _read_all(demo)
    for f in spec.fields:
        assert df[f.name].min() >= 0 and df[f.name].max() < f.vocab_size, f.name


def test_profile_fields_are_functions_of_the_id(demo_df: pd.DataFrame) -> None:
    spec = dataset_spec(build_world("demo", SCALE, SEED))
    for side, key in (("user", "user_id"), ("item", "item_id")):
        profile = [f.name for f in spec.side_fields(side) if f.name != key]
        per_id = demo_df.groupby(key)[profile].nunique()
        assert (per_id == 1).all().all(), side
        # ... and not constant: they carry information.
        assert (demo_df[profile].nunique() > 1).all()


def test_clickbait_vs_necessity(demo_df: pd.DataFrame) -> None:
    world = build_world("demo", SCALE, SEED)
    bait = np.flatnonzero(world.item_bait >= np.quantile(world.item_bait, 0.9))
    nec = np.flatnonzero(world.item_necessity >= np.quantile(world.item_necessity, 0.9))

    def rates(items: np.ndarray) -> tuple[float, float]:
        rows = demo_df[demo_df["item_id"].isin(items)]
        return rows["click"].mean(), rows["purchase"].sum() / rows["click"].sum()

    bait_ctr, bait_cvr = rates(bait)
    nec_ctr, nec_cvr = rates(nec)
    assert bait_ctr > 1.5 * nec_ctr
    assert bait_cvr < 0.5 * nec_cvr


def test_users_of_a_cluster_click_alike(demo_df: pd.DataFrame) -> None:
    """Cosine similarity of per-user click histograms over item clusters: same cluster > different."""
    world = build_world("demo", SCALE, SEED)
    clicks = demo_df[demo_df["click"] == 1]
    hist = np.zeros((world.num_users, world.preset.num_clusters))
    np.add.at(hist, (clicks["user_id"].to_numpy(), world.item_cluster[clicks["item_id"].to_numpy()]), 1.0)
    active = np.flatnonzero(hist.sum(1) >= 3)
    assert len(active) > 100
    h = hist[active] / np.linalg.norm(hist[active], axis=1, keepdims=True)
    sim = h @ h.T
    ucl = world.user_cluster[active]
    same = ucl[:, None] == ucl[None, :]
    off_diag = ~np.eye(len(active), dtype=bool)
    same_sim = sim[same & off_diag].mean()
    diff_sim = sim[~same].mean()
    assert same_sim > diff_sim + 0.2, (same_sim, diff_sim)


def test_latents_follow_clusters() -> None:
    world = build_world("demo", SCALE, SEED)
    ids = np.arange(world.num_users)
    lat = world.user_latent(ids)
    # Each user's nearest centre is its own cluster (noise is small next to centre separation).
    assert (np.argmax(lat @ world.centres.T, axis=1) == world.user_cluster).mean() > 0.95
    np.testing.assert_array_equal(world.user_latent(ids[:10]), lat[:10])  # a function of the id


def test_determinism_and_file_cut_independence(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    generate("demo", 0.02, 1, a, progress=False)
    generate("demo", 0.02, 1, b, rows_per_file=1500, progress=False)
    generate("demo", 0.02, 2, c, progress=False)
    assert len(split_files(b, "train")) != len(split_files(a, "train"))
    for split in SPLITS:
        pd.testing.assert_frame_equal(_read_split(a, split), _read_split(b, split))
        assert not _read_split(a, split).equals(_read_split(c, split))
    assert (a / "stats.json").read_text() != (c / "stats.json").read_text()


def test_refuses_to_overwrite_and_completion_flag(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()  # an empty directory is fine
    assert not dataset_complete(out)
    generate("demo", 0.001, 0, out, progress=False)
    assert dataset_complete(out)
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(FileExistsError, match="already exists"):
        generate("demo", 0.001, 0, out, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate("demo", 0.001, 0, other, progress=False)
    assert (other / "x.txt").read_text() == "keep me"


def test_tiny_scale_floors_and_preset_validation() -> None:
    sizes = PRESETS["industrial-like"].sizes(1e-7)
    assert sizes["num_users"] == MIN_ENTITIES and sizes["num_items"] == MIN_ENTITIES
    assert min(sizes[s] for s in SPLITS) == MIN_SPLIT_ROWS
    assert PRESETS["aliccp-like"].sizes(1.0)["num_items"] == 500_000
    with pytest.raises(ValueError, match="purchase_rate"):
        SynthPreset(
            train_rows=10,
            val_rows=1,
            test_rows=1,
            num_users=5,
            num_items=5,
            click_rate=0.1,
            purchase_rate=0.2,
        )
    with pytest.raises(ValueError, match="unknown synth preset"):
        build_world("nope", 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        PRESETS["demo"].sizes(0.0)


def _oracle_aucs(preset: SynthPreset, n: int = 120_000) -> dict[str, float]:
    """AUCs of ground-truth scores for purchases over all impressions, on fresh rows of the world."""
    from sklearn.metrics import roc_auc_score

    from cstwa_dist.data.synth import SynthWorld, _sample_impressions, _sigmoid, calibrate

    world = SynthWorld(preset, 0.3, 3)
    biases = calibrate(world)
    rng = np.random.default_rng(11)
    cols, click_logit, buy_logit = _sample_impressions(world, rng, n)
    p_click = _sigmoid(click_logit + biases["bias_ctr"])
    click = rng.random(n) < p_click
    buy = click & (rng.random(n) < _sigmoid(buy_logit + biases["bias_cvr"]))
    truth = world.truth(
        cols["user_id"], cols["item_id"], cols["ctx_hour"], cols["ctx_position"], cols["ctx_device"]
    )
    np.testing.assert_array_equal(truth["click_logit"], click_logit)  # truth() is what generated the row
    return {
        "bait": float(roc_auc_score(buy, truth["bait"])),
        "p_click": float(roc_auc_score(buy, p_click)),
        "p_click_among_clicks": float(roc_auc_score(buy[click], p_click[click])),
    }


def test_conflict_axis_moves_bait_effect_on_purchases() -> None:
    """The pre-registered levels: bait's net effect on purchases goes from about none to strongly negative."""
    from cstwa_dist.data.synth import CONFLICT_LEVELS, preset_with

    aucs = {lvl: _oracle_aucs(preset_with("fair", conflict=lvl)) for lvl in CONFLICT_LEVELS}
    assert abs(aucs["none"]["bait"] - 0.5) < 0.05
    assert aucs["none"]["bait"] > aucs["moderate"]["bait"] + 0.05 > aucs["strong"]["bait"] + 0.1
    assert aucs["none"]["p_click"] > aucs["moderate"]["p_click"] > aucs["strong"]["p_click"]
    for lvl in CONFLICT_LEVELS:  # among clicked rows the click signal points the wrong way at every level
        assert aucs[lvl]["p_click_among_clicks"] < 0.45
    with pytest.raises(ValueError, match="conflict level"):
        preset_with("fair", conflict="extreme")


def test_profile_leakage_sets_how_often_profiles_name_the_cluster() -> None:
    from cstwa_dist.data.synth import preset_with

    def same_cluster_value_rate(leak: float) -> float:
        world = build_world(preset_with("fair", profile_leakage=leak), 0.5, 0)
        cat = world.item_category
        # share of items whose category is their cluster's most common category
        hits = 0
        for c in range(world.preset.num_clusters):
            vals = cat[world.item_cluster == c]
            hits += np.bincount(vals).max()
        return hits / world.num_items

    low, high = same_cluster_value_rate(0.1), same_cluster_value_rate(0.9)
    assert low < 0.3 < 0.85 < high
    with pytest.raises(ValueError, match="profile_leakage"):
        preset_with("fair", profile_leakage=1.5)


def test_writes_identity_vocab(demo: Path) -> None:
    from cstwa_dist.data.vocab import Vocabulary

    doc = json.loads((demo / "vocab" / "vocab.json").read_text())
    spec = DatasetSpec.load(demo)
    assert list(doc["fields"]) == spec.names
    assert doc["fields"]["user_id"] == {"kind": "identity", "size": spec.num_users}
    assert Vocabulary.load(demo).to_json() == Vocabulary.identity(spec).to_json()
