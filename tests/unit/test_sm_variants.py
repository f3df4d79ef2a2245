"""The switchable Structure Migrator variants, unsharded on CPU (docs/method.md §2, "Two readings of
the Structure Migrator"): config validation, what each variant builds, reading (b)'s forward
(live field tables + a detached structure term), shared tables, the pre-trained start's file checks."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from cstwa_dist.config import ConfigError, LossConfig, ModelConfig, StructureConfig
from cstwa_dist.models.settings import CSTWASettings
from cstwa_dist.registry import MODELS, get_model_spec, load_config
from cstwa_dist.train.wrapper import ModelTrain
from tests.unit.model_fixtures import SPEC, random_batch

SMALL = {"ctr_tower": [16, 8], "cvr_tower": [16, 8], "dropout": [0.0, 0.0]}


def _cstwa(reading: str = "free", shared: bool = False, sm: bool = True, beta: float = 0.3, cp: bool = True):
    """CSTWA and what built it: (model, shared model section, structure section, CSTWA's own settings)."""
    cfg = ModelConfig(**SMALL, shared_tables=shared)
    own = CSTWASettings(structure_migrator=sm, click_perceptron=cp, info_layer=[8])
    st = StructureConfig(sm_reading=reading, beta=beta)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return (
        get_model_spec("cstwa").build(SPEC, cfg, torch.device("cpu"), structure=st, settings=own),
        cfg,
        st,
        own,
    )


def _tables(module: torch.nn.Module) -> set[str]:
    return {
        n.split(".embedding_bags.")[1].removesuffix(".weight")
        for n, _ in module.named_parameters()
        if ".embedding_bags." in n
    }


# --- config ------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_choices():
    cfg = load_config(None)
    assert cfg.structure.sm_reading == "free" and cfg.structure.sm_init == "fields"
    assert cfg.model.shared_tables is False


@pytest.mark.parametrize(
    "override, words",
    [
        ("structure.sm_reading=both", "sm_reading: must be one of free | recomputed"),
        ("structure.sm_init=random", "sm_init: must be one of fields | pretrained"),
        ("model.shared_tables=maybe", "expected true/false"),
    ],
)
def test_bad_values_are_config_errors(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [override])


def test_pretrained_start_is_rejected_for_the_recomputed_reading():
    with pytest.raises(ConfigError, match="applies to structure.sm_reading=free only"):
        load_config(None, ["structure.sm_reading=recomputed", "structure.sm_init=pretrained"])
    cfg = load_config(None, ["structure.sm_reading=recomputed", "model.shared_tables=true"])
    assert cfg.structure.sm_reading == "recomputed" and cfg.model.shared_tables


# --- what each variant builds -------------------------------------------------------------------------
@pytest.mark.parametrize("reading", ["free", "recomputed"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("sm", [True, False])
def test_every_variant_builds_trains_and_declares_its_tables(reading, shared, sm):
    model, cfg, st, own = _cstwa(reading, shared, sm)
    tables = _tables(model)
    fields = [f.name for f in SPEC.fields]
    assert {f"ctr__{f}" for f in fields} <= tables
    side_ids = ("cvr__user_id", "cvr__item_id")
    if shared:  # no CVR collection at all
        assert not any(t.startswith("cvr__") for t in tables) and not hasattr(model, "cvr_embeddings")
    elif sm and reading == "free":  # context only in the step's collection, side fields for Eq. 8
        assert model.cvr_embeddings.user_keys == [] and model.cvr_embeddings.item_keys == []
        assert {"cvr__age", "cvr__cat"} <= tables and not set(side_ids) & tables
    else:  # SM off or reading (b): every field, ids included, in the step's CVR collection
        assert {f"cvr__{f}" for f in fields} <= tables and not hasattr(model, "cvr_side_embeddings")
    assert ({"sm__user", "sm__item"} <= tables) == sm
    declared = get_model_spec("cstwa").structure_tables(cfg, st, settings=own)
    assert [t.side for t in declared] == (["user", "item"] if sm else [])
    for t in declared:
        want = (
            "ctr_embeddings"
            if shared
            else ("cvr_embeddings" if reading == "recomputed" else "cvr_side_embeddings")
        )
        assert t.init_from == want and t.reads_id == (shared or reading == "recomputed")
        assert hasattr(model, t.init_from)
    module = ModelTrain(model, get_model_spec("cstwa").build_loss(LossConfig(), cfg, None, settings=own))
    loss, out = module(random_batch())
    assert out.purchase_logit.shape == (32,) and torch.isfinite(loss)
    loss.backward()


def test_default_build_is_reading_a_without_a_structure_section():
    """Callers that pass no ``structure`` (the sharding dry run) get the paper's reading."""
    cfg = ModelConfig(**SMALL)
    spec = get_model_spec("cstwa")
    model = spec.build(SPEC, cfg, torch.device("cpu"))
    assert not model.recomputed and hasattr(model, "cvr_side_embeddings")
    assert spec.structure_tables(cfg)[0].init_from == "cvr_side_embeddings"


# --- reading (b): live field tables + the detached, fixed structure term -----------------------------
def test_recomputed_forward_is_the_beta_mix_and_only_the_field_tables_get_gradients():
    beta = 0.4
    model, cfg, _, own = _cstwa("recomputed", beta=beta, cp=False)
    batch = random_batch()
    with torch.no_grad():  # a recognisable P, so the mix can be checked by hand
        for t in ("sm__user", "sm__item"):
            model.structure_embeddings.embedding_bags[t].weight.normal_()
    c_u, c_i, c_ctx = model.cvr_embeddings(batch.features)
    sm = model.structure_embeddings(batch.features).to_dict()
    x = model.cvr_input(batch.features, (c_u, c_i, c_ctx))
    want = torch.cat(
        [(1 - beta) * c_u + beta * sm["user_id"], (1 - beta) * c_i + beta * sm["item_id"], c_ctx], dim=1
    )
    assert torch.allclose(x, want)
    module = ModelTrain(model, get_model_spec("cstwa").build_loss(LossConfig(), cfg, None, settings=own))
    loss, _ = module(batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for f in SPEC.user_fields + SPEC.item_fields + SPEC.context_fields:  # the CVR field tables train
        g = grads[f"cvr_embeddings.ebc.embedding_bags.cvr__{f.name}.weight"]
        assert g is not None and g.abs().sum() > 0, f.name
    for t in ("sm__user", "sm__item"):  # the structure term is a constant of the step
        assert grads[f"structure_embeddings.embedding_bags.{t}.weight"] is None


def test_free_reading_still_trains_u_and_i_and_leaves_the_side_tables_alone():
    model, cfg, _, own = _cstwa("free")
    module = ModelTrain(model, get_model_spec("cstwa").build_loss(LossConfig(), cfg, None, settings=own))
    loss, _ = module(random_batch())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["structure_embeddings.embedding_bags.sm__user.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("cvr_side_embeddings."))


# --- shared tables (ablation) -------------------------------------------------------------------------
def test_shared_tables_feed_the_ctr_embeddings_to_the_cvr_side(caplog):
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.models.base"):
        model, _, _, _ = _cstwa(shared=True, sm=False, cp=False)
    assert "deviation from the paper's Eq. 6" in caplog.text
    f = random_batch().features
    ctr = model.ctr_embeddings(f)
    assert torch.equal(model.cvr_input(f, model.cvr_views(f, ctr)), torch.cat(list(ctr), dim=1))
    mlp = get_model_spec("mlp").build(SPEC, ModelConfig(**SMALL, shared_tables=True), torch.device("cpu"))
    assert not hasattr(mlp, "cvr_embeddings")


@pytest.mark.parametrize("name", sorted(n for n, s in MODELS.items() if s.predicts_purchase))
def test_models_without_separate_collections_reject_shared_tables(name):
    cfg = ModelConfig(**SMALL, shared_tables=True)
    spec = get_model_spec(name)
    if name in ("cstwa", "mlp"):
        spec.build(SPEC, cfg, torch.device("cpu"))
    else:
        with pytest.raises(ConfigError, match="already shares one collection"):  # before any module
            spec.build(SPEC, cfg, torch.device("meta"))


def test_the_pretraining_model_ignores_shared_tables():
    """``pretrain`` and an ablation's ``train`` share one config; the click-only model has no CVR side."""
    get_model_spec("ctr_mlp").build(SPEC, ModelConfig(**SMALL, shared_tables=True), torch.device("cpu"))


# --- the pre-trained start's file checks ---------------------------------------------------------------
def test_pretrained_rows_read_the_block_and_check_the_file(tmp_path):
    from cstwa_dist.structure.migrator import pretrained_rows
    from cstwa_dist.structure.representations import save_representations

    cfg = StructureConfig(graph_dir=str(tmp_path), sm_init="pretrained")
    with pytest.raises(FileNotFoundError, match="save_representations=true"):
        pretrained_rows(cfg, "user", 30, 0, 10, 16)
    reps = np.arange(30 * 16, dtype=np.float32).reshape(30, 16)
    save_representations(tmp_path, "user", reps, [(0, 30)])  # no process group: one part
    assert torch.equal(pretrained_rows(cfg, "user", 30, 7, 19, 16), torch.from_numpy(reps[7:19]))
    assert pretrained_rows(cfg, "user", 30, 30, 30, 16).shape == (0, 16)
    with pytest.raises(ConfigError, match="width 16 but the user structure table's rows have width 24"):
        pretrained_rows(cfg, "user", 30, 0, 10, 24)
    with pytest.raises(ValueError, match="the dataset has 31 users"):
        pretrained_rows(cfg, "user", 31, 0, 10, 16)


def test_bench_knn_reads_a_pretrain_parts_folder(tmp_path):
    """``bench knn --representations`` takes the folder ``pretrain`` writes (or a .npy of one's own)."""
    from cstwa_dist.bench.knn import _rows, representation_dims
    from cstwa_dist.structure.representations import save_representations

    reps = np.arange(30 * 16, dtype=np.float32).reshape(30, 16)
    save_representations(tmp_path, "item", reps, [(0, 30)])
    folder = tmp_path / "item_representations"
    assert representation_dims(folder) == (30, 16)
    assert np.array_equal(_rows({"representations": str(folder)}, 4, 21), reps[4:21])
    np.save(tmp_path / "mine.npy", reps)
    assert representation_dims(tmp_path / "mine.npy") == (30, 16)
    with pytest.raises(ValueError, match="named <side>_representations"):
        representation_dims(tmp_path)
