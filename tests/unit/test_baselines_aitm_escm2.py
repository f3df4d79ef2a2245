"""AITM and ESCM² (IPS, DR): shapes, gradients, training, and the loss terms against hand values."""

import math

import pytest
import torch
import torch.nn.functional as F

from cstwa_dist.config import LossConfig, ModelConfig
from cstwa_dist.data.batch import Batch, make_kjt
from cstwa_dist.losses.constrained import AITMLoss
from cstwa_dist.losses.counterfactual import ESCM2Loss
from cstwa_dist.models.aitm import AITM, AttentionInfoTransfer
from cstwa_dist.models.blocks import ctcvr_logit
from cstwa_dist.models.escm2 import CVR_LOGIT, IMPUTED_ERROR
from cstwa_dist.models.outputs import ModelOutput
from cstwa_dist.models.settings import AITMSettings
from cstwa_dist.registry import get_model_spec
from cstwa_dist.train.wrapper import ModelTrain
from tests.unit.model_fixtures import SPEC, loss_trajectory, random_batch

NAMES = ["aitm", "escm2_ips", "escm2_dr"]
CPU = torch.device("cpu")


AITM_SMALL = AITMSettings(ait_dim=8)  # AITM's own settings (models.aitm)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(ctr_tower=[16, 8], cvr_tower=[16, 8], dropout=[0.0, 0.0], **kw)


def _batch(n: int = 32, seed: int = 0) -> Batch:
    return random_batch(n, seed)


def _labels(click, purchase, mask=None) -> Batch:
    """A batch whose features are never read: for losses called on a hand-built ModelOutput."""
    n = len(click)
    return Batch(
        features=make_kjt({"f": torch.zeros(n, dtype=torch.int64)}, ["f"]),
        click=torch.tensor(click, dtype=torch.float32),
        purchase=torch.tensor(purchase, dtype=torch.float32),
        mask=torch.ones(n, dtype=torch.bool) if mask is None else torch.tensor(mask),
    )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _train_module(name: str, lc: LossConfig | None = None) -> ModelTrain:
    spec = get_model_spec(name)
    cfg, own = _cfg(), AITM_SMALL if name == "aitm" else None
    torch.manual_seed(0)
    return ModelTrain(
        spec.build(SPEC, cfg, CPU, settings=own), spec.build_loss(lc or LossConfig(), cfg, None, settings=own)
    )


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_every_parameter_gets_a_finite_gradient(name):
    module = _train_module(name)
    b = _batch()
    out = module.model(b.features)
    assert out.click_logit.shape == (32,) and out.purchase_logit.shape == (32,)
    if name.startswith("escm2"):
        assert out.extras[CVR_LOGIT].shape == (32,)
        assert (IMPUTED_ERROR in out.extras) == (name == "escm2_dr")
        if name == "escm2_dr":
            assert (out.extras[IMPUTED_ERROR] >= 0).all()
    loss, out = module(b)
    parts, click, purchase = out.parts, out.click_logit, out.purchase_logit
    assert click.shape == (32,) and purchase.shape == (32,)
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    bad = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"no finite gradient for {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name):
    module = _train_module(name)
    losses = loss_trajectory(module, _batch(64), lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta(name):
    m = get_model_spec(name).build(SPEC, ModelConfig(), torch.device("meta"))
    assert all(p.is_meta for p in m.parameters())


def test_aitm_calibrator_and_total_by_hand():
    click = [_logit(0.2), _logit(0.5), _logit(0.9), _logit(0.1)]
    purchase = [_logit(0.3), _logit(0.1), _logit(0.95), _logit(0.9)]
    out = ModelOutput(click_logit=_t(click), purchase_logit=_t(purchase))
    # the 4th row is padding: its calibrator violation (0.8) must weigh nothing
    b = _labels([1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], mask=[True, True, True, False])
    loss, parts = AITMLoss(LossConfig(constraint_weight=0.6))(out, b)
    l_c = (max(0.3 - 0.2, 0) + max(0.1 - 0.5, 0) + max(0.95 - 0.9, 0)) / 3  # = 0.05
    assert math.isclose(parts["calibrator"].item(), l_c, rel_tol=1e-5)
    l_ctr = -(math.log(0.2) + math.log(0.5) + math.log(0.9)) / 3
    l_cvr = -(math.log(0.7) + math.log(0.9) + math.log(0.95)) / 3
    assert math.isclose(parts["ctr"].item(), l_ctr, rel_tol=1e-5)
    assert math.isclose(parts["cvr"].item(), l_cvr, rel_tol=1e-5)
    assert math.isclose(loss.item(), l_ctr + l_cvr + 0.6 * l_c, rel_tol=1e-5)


def test_ait_attention_weights_sum_to_one_over_the_two_inputs():
    torch.manual_seed(0)
    model = AITM(SPEC, _cfg(), CPU, settings=AITM_SMALL).eval()
    assert model.ait.out_dim == 8
    w = model.attention(_batch(16).features)
    assert w.shape == (16, 2)
    assert (w > 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones(16), atol=1e-6)
    # the module itself: w_u = softmax_u(<h2(u), h3(u)> / sqrt(k)), z = sum_u w_u h1(u)
    ait = AttentionInfoTransfer(5, 4, CPU)
    p, q = torch.randn(3, 5), torch.randn(3, 5)
    z, w = ait(p, q)
    s = torch.stack([(ait.queries(v) * ait.keys(v)).sum(-1) / 2.0 for v in (p, q)], dim=1)
    ref_w = torch.softmax(s, dim=1)
    assert torch.allclose(w, ref_w, atol=1e-6)
    assert torch.allclose(z, ref_w[:, :1] * ait.values(p) + ref_w[:, 1:] * ait.values(q), atol=1e-6)


# A 3-row batch for ESCM²: row 0 clicked + purchased, row 1 clicked with a tiny CTR (0.005, clipped to
# 0.01), row 2 not clicked. e = BCE(cvr, z) = −log 0.8, −log 0.7, −log 0.4.
P_CTR = [0.5, 0.005, 0.2]
P_CVR = [0.8, 0.3, 0.6]
CLICK, PURCHASE = [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]
E = [-math.log(0.8), -math.log(0.7), -math.log(0.4)]


def _escm2_out(e_hat=None) -> ModelOutput:
    ctr = _t([_logit(p) for p in P_CTR]).requires_grad_()
    cvr = _t([_logit(p) for p in P_CVR]).requires_grad_()
    extras = {CVR_LOGIT: cvr}
    if e_hat is not None:
        extras[IMPUTED_ERROR] = _t(e_hat).requires_grad_()
    return ModelOutput(click_logit=ctr, purchase_logit=ctcvr_logit(ctr, cvr), extras=extras)


def _entire_space_terms(out: ModelOutput) -> tuple[float, float]:
    b = _labels(CLICK, PURCHASE)
    l_ctr = F.binary_cross_entropy_with_logits(out.click_logit, b.click).item()
    l_ctcvr = F.binary_cross_entropy_with_logits(out.purchase_logit, b.purchase).item()
    return l_ctr, l_ctcvr


def test_escm2_ips_term_by_hand_with_propensity_clipping():
    out = _escm2_out()
    loss, parts = ESCM2Loss(LossConfig(counterfactual_weight=0.5, propensity_clip=0.01), "ips")(
        out, _labels(CLICK, PURCHASE)
    )
    ips = (E[0] / 0.5 + E[1] / 0.01 + 0.0) / 3  # row 1's propensity 0.005 is clipped to 0.01
    assert math.isclose(parts["counterfactual"].item(), ips, rel_tol=1e-5)
    l_ctr, l_ctcvr = _entire_space_terms(out)
    assert math.isclose(loss.item(), l_ctr + l_ctcvr + 0.5 * ips, rel_tol=1e-5)
    # a smaller clip lets the raw propensity through
    _, loose = ESCM2Loss(LossConfig(propensity_clip=0.001), "ips")(_escm2_out(), _labels(CLICK, PURCHASE))
    assert math.isclose(loose["counterfactual"].item(), (E[0] / 0.5 + E[1] / 0.005) / 3, rel_tol=1e-5)


def test_escm2_dr_terms_by_hand():
    e_hat = [0.1, 0.2, 0.3]
    out = _escm2_out(e_hat)
    loss, parts = ESCM2Loss(LossConfig(counterfactual_weight=0.5, propensity_clip=0.01), "dr")(
        out, _labels(CLICK, PURCHASE)
    )
    o_hat = [0.5, 0.01, 0.2]
    dr = sum(eh + o * (e - eh) / p for eh, o, e, p in zip(e_hat, CLICK, E, o_hat, strict=True)) / 3
    imp = sum(o * (e - eh) ** 2 / p for eh, o, e, p in zip(e_hat, CLICK, E, o_hat, strict=True)) / 3
    assert math.isclose(parts["counterfactual"].item(), dr, rel_tol=1e-5)
    assert math.isclose(parts["imputation"].item(), imp, rel_tol=1e-5)
    l_ctr, l_ctcvr = _entire_space_terms(out)
    assert math.isclose(loss.item(), l_ctr + l_ctcvr + 0.5 * dr + imp, rel_tol=1e-5)


def test_escm2_gradients_follow_the_documented_detaches():
    # only the counterfactual terms: the propensity is detached, so the CTR logit gets no gradient;
    # in DR, ê learns from L_imp alone: d/dê of mean o(e − ê)²/ô = −2·o·(e − ê)/(3·ô)
    lc = LossConfig(ctr_weight=0.0, cvr_weight=0.0, counterfactual_weight=1.0, propensity_clip=0.01)
    e_hat = [0.1, 0.2, 0.3]
    out = _escm2_out(e_hat)
    loss, _ = ESCM2Loss(lc, "dr")(out, _labels(CLICK, PURCHASE))
    loss.backward()
    assert torch.equal(out.click_logit.grad, torch.zeros(3))
    o_hat = [0.5, 0.01, 0.2]
    ref = [-2 * o * (e - eh) / (3 * p) for eh, o, e, p in zip(e_hat, CLICK, E, o_hat, strict=True)]
    assert torch.allclose(out.extras[IMPUTED_ERROR].grad, _t(ref), rtol=1e-5)
    # the unclicked row trains no CVR logit through the risk (its e carries no label)
    assert out.extras[CVR_LOGIT].grad[2] == 0


def test_escm2_ignores_padding_rows_and_needs_its_extras():
    out = _escm2_out()
    _, parts = ESCM2Loss(LossConfig(), "ips")(out, _labels(CLICK, PURCHASE, mask=[True, False, True]))
    assert math.isclose(parts["counterfactual"].item(), (E[0] / 0.5) / 2, rel_tol=1e-5)
    with pytest.raises(ValueError, match="imputed_error"):
        ESCM2Loss(LossConfig(), "dr")(out, _labels(CLICK, PURCHASE))
    with pytest.raises(ValueError, match="ips or dr"):
        ESCM2Loss(LossConfig(), "snips")
