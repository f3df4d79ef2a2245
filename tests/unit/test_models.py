"""Models through the registry, unsharded on CPU: shapes, gradients, CSTWA's switches."""

import pytest
import torch

from cstwa_dist.config import LossConfig, ModelConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.models.settings import CSTWASettings
from cstwa_dist.registry import MODELS, get_model_spec
from cstwa_dist.train.wrapper import ModelTrain
from tests.unit.model_fixtures import SPEC, loss_trajectory, random_batch


def _batch(n: int = 32, seed: int = 0) -> Batch:
    return random_batch(n, seed)


def test_unknown_model_lists_registered():
    with pytest.raises(ValueError, match="registered"):
        get_model_spec("nope")


@pytest.mark.parametrize("pooling", ["mean", "concat"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_every_parameter_gets_a_gradient(name, pooling):
    spec = get_model_spec(name)
    cfg = ModelConfig(ctr_tower=[16, 8], cvr_tower=[16, 8], dropout=[0.0, 0.0], context_pooling=pooling)
    own = CSTWASettings(info_layer=[8]) if name == "cstwa" else None
    torch.manual_seed(0)
    module = ModelTrain(
        spec.build(SPEC, cfg, torch.device("cpu"), settings=own),
        spec.build_loss(LossConfig(), cfg, None, settings=own),
    )
    b = _batch()
    loss, out = module(b)
    click, purchase = out.click_logit, out.purchase_logit
    assert click.shape == (32,)
    assert (purchase is not None) == spec.predicts_purchase
    if purchase is not None:
        assert purchase.shape == (32,)
    loss.backward()
    # tables read only to initialise the structure tables (Eq. 8) take no part in the step
    init_only = tuple(f"model.{t.init_from}." for t in spec.structure_tables(cfg, settings=own))
    params = [(n, p) for n, p in module.named_parameters() if not n.startswith(init_only)]
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    if init_only:  # and they exist only for that: no lookups of them are computed and discarded
        assert all(p.grad is None for n, p in module.named_parameters() if n.startswith(init_only))


@pytest.mark.parametrize("sm, cp", [(True, True), (False, True), (True, False), (False, False)])
def test_cstwa_switches(sm, cp):
    cfg = ModelConfig(ctr_tower=[16, 8], cvr_tower=[16, 8], dropout=[0.0, 0.0])
    own = CSTWASettings(structure_migrator=sm, click_perceptron=cp)
    model = get_model_spec("cstwa").build(SPEC, cfg, torch.device("cpu"), settings=own)
    assert hasattr(model, "structure_embeddings") == sm
    assert hasattr(model, "info_layer") == cp
    tables = get_model_spec("cstwa").structure_tables(cfg, settings=own)
    assert [t.side for t in tables] == (["user", "item"] if sm else [])
    out = model(_batch().features)
    assert out.purchase_logit.shape == (32,)


@pytest.mark.parametrize("ce", [True, False])
def test_cstwa_loss_reads_the_curse_escaper_switch_from_cstwas_settings(ce):
    loss = get_model_spec("cstwa").build_loss(
        LossConfig(), ModelConfig(), None, settings=CSTWASettings(curse_escaper=ce)
    )
    assert (loss.curse_escaper is not None) == ce


def test_a_model_is_built_with_its_own_settings_class_only():
    from cstwa_dist.models.settings import PLESettings

    with pytest.raises(TypeError, match="cstwa reads CSTWASettings, got PLESettings"):
        get_model_spec("cstwa").build(SPEC, ModelConfig(), torch.device("meta"), settings=PLESettings())
    with pytest.raises(TypeError, match="esmm has no settings of its own"):
        get_model_spec("esmm").build(SPEC, ModelConfig(), torch.device("meta"), settings=PLESettings())


def test_loss_falls_on_a_fixed_batch():
    spec = get_model_spec("cstwa")
    cfg = ModelConfig(ctr_tower=[16, 8], cvr_tower=[16, 8], dropout=[0.0, 0.0])
    torch.manual_seed(0)
    module = ModelTrain(spec.build(SPEC, cfg, torch.device("cpu")), spec.build_loss(LossConfig(), cfg, None))
    losses = loss_trajectory(module, _batch(64), lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_models_build_on_meta():
    cfg = ModelConfig()
    for name in MODELS:
        m = get_model_spec(name).build(SPEC, cfg, torch.device("meta"))
        assert all(p.is_meta for p in m.parameters())


def test_context_pooling_mean_or_concat_of_the_context_embeddings():
    """``concat`` keeps every context field's embedding; ``mean`` (Eq. 7) averages them; the first
    layer of every tower is sized for what it gets."""
    from cstwa_dist.models.blocks import FieldEmbeddings, concat_by_keys

    torch.manual_seed(0)
    b = _batch()
    ctx_keys = [f.name for f in SPEC.context_fields]
    mean = FieldEmbeddings(SPEC, "t", 8, torch.device("cpu"), context_pooling="mean")
    cat = FieldEmbeddings(SPEC, "t", 8, torch.device("cpu"), context_pooling="concat")
    cat.load_state_dict(mean.state_dict())
    kt = mean.ebc(b.features)
    _, _, m = mean(b.features)
    _, _, c = cat(b.features)
    assert m.shape == (32, 8) and c.shape == (32, 8 * len(ctx_keys))
    assert torch.allclose(c, concat_by_keys(kt, ctx_keys))
    assert torch.allclose(m, c.view(32, len(ctx_keys), 8).mean(dim=1))
    assert cat.out_dim == mean.out_dim + 8 * (len(ctx_keys) - 1)
    with pytest.raises(ValueError, match="context_pooling"):
        FieldEmbeddings(SPEC, "t", 8, torch.device("cpu"), context_pooling="max")
