"""Losses against hand-computed values: CE weights and percentile window, constraint, ESMM's CTCVR."""

import math

import torch
import torch.nn.functional as F

from cstwa_dist.config import LossConfig
from cstwa_dist.data.batch import Batch, make_kjt
from cstwa_dist.losses.bce import EntireSpaceLoss
from cstwa_dist.losses.common import masked_mean
from cstwa_dist.losses.constrained import CSTWALoss
from cstwa_dist.losses.curse_escaper import CurseEscaper
from cstwa_dist.models.blocks import ctcvr_logit
from cstwa_dist.models.outputs import ModelOutput


def _batch(click, purchase, mask=None) -> Batch:
    n = len(click)
    kjt = make_kjt({"f": torch.zeros(n, dtype=torch.int64)}, ["f"])
    return Batch(
        features=kjt,
        click=torch.tensor(click, dtype=torch.float32),
        purchase=torch.tensor(purchase, dtype=torch.float32),
        mask=torch.ones(n, dtype=torch.bool) if mask is None else torch.tensor(mask),
    )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_curse_escaper_window_and_weights_by_hand():
    ce = CurseEscaper(LossConfig(gamma=3.0, window=5, high_percentile=80.0, low_percentile=20.0))
    z = torch.tensor([0.0, 1.0, 1.0, 0.0])
    mask = torch.ones(4, dtype=torch.bool)
    # first step: empty window → every weight is 1, then the batch joins the window
    w0 = ce.weights(torch.tensor([0.1, 0.2, 0.3, 0.4]), z, mask)
    assert torch.equal(w0, torch.ones(4))
    assert torch.allclose(ce.window, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    # window [0.1 .. 0.4]: 20th pct = 0.16, 80th pct = 0.34 (linear interpolation)
    lo, hi = ce.thresholds()
    assert math.isclose(lo, 0.16, abs_tol=1e-6) and math.isclose(hi, 0.34, abs_tol=1e-6)
    p = torch.tensor([0.9, 0.05, 0.9, 0.2])
    w1 = ce.weights(p, z, mask)
    # row0: p>hi and z=0 → false positive γ; row1: p<lo and z=1 → false negative γ;
    # row2: p>hi but z=1 → 1; row3: inside the window band → 1
    assert torch.equal(w1, torch.tensor([3.0, 3.0, 1.0, 1.0]))
    # capacity 5 keeps the newest predictions only
    assert torch.allclose(ce.window, torch.tensor([0.4, 0.9, 0.05, 0.9, 0.2]))


def test_curse_escaper_ignores_padding_and_eval():
    ce = CurseEscaper(LossConfig(window=100))
    ce.weights(torch.tensor([0.1, 0.7]), torch.tensor([0.0, 0.0]), torch.tensor([True, False]))
    assert ce.window.tolist() == [0.10000000149011612]
    ce.eval()
    w = ce.weights(torch.tensor([0.99, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([True, True]))
    assert torch.equal(w, torch.ones(2)) and ce.window.numel() == 1


def test_cstwa_loss_by_hand():
    cfg = LossConfig(gamma=3.0, window=10, constraint_weight=0.6)
    loss_fn = CSTWALoss(cfg, curse_escaper=False)
    p_ctr, p_cvr = [0.5, 0.2], [0.1, 0.4]
    out = ModelOutput(
        click_logit=torch.tensor([_logit(p) for p in p_ctr]),
        purchase_logit=torch.tensor([_logit(p) for p in p_cvr]),
    )
    b = _batch([1, 0], [0, 0])
    loss, parts = loss_fn(out, b)
    l_ctr = -(math.log(0.5) + math.log(0.8)) / 2
    l_cvr = -(math.log(0.9) + math.log(0.6)) / 2
    l_c = (0.0 + (0.4 - 0.2)) / 2
    assert math.isclose(parts["ctr"].item(), l_ctr, rel_tol=1e-5)
    assert math.isclose(parts["cvr"].item(), l_cvr, rel_tol=1e-5)
    assert math.isclose(parts["constraint"].item(), l_c, rel_tol=1e-5)
    assert math.isclose(loss.item(), l_ctr + l_cvr + 0.6 * l_c, rel_tol=1e-5)


def test_cstwa_loss_applies_ce_weights_on_second_step():
    cfg = LossConfig(gamma=2.0, window=10, high_percentile=50.0, low_percentile=10.0)
    loss_fn = CSTWALoss(cfg, curse_escaper=True)
    b = _batch([1, 1], [0, 1])
    out = ModelOutput(
        click_logit=torch.tensor([_logit(0.2), _logit(0.6)]),
        purchase_logit=torch.tensor([_logit(0.3), _logit(0.3)]),
    )
    loss_fn(out, b)  # fills the window with 0.2, 0.6 → median 0.4, 10th pct 0.24
    out2 = ModelOutput(
        click_logit=torch.tensor([_logit(0.9), _logit(0.1)]),
        purchase_logit=torch.tensor([_logit(0.3), _logit(0.3)]),
    )
    _, parts = loss_fn(out2, b)
    # row0: p 0.9 > 0.4 and z=0 → γ; row1: p 0.1 < 0.24 and z=1 → γ
    expected = (2.0 * -math.log(0.7) + 2.0 * -math.log(0.3)) / 2
    assert math.isclose(parts["cvr"].item(), expected, rel_tol=1e-5)


def test_masked_mean_ignores_padding():
    v = torch.tensor([1.0, 2.0, 100.0])
    assert masked_mean(v, torch.tensor([True, True, False])).item() == 1.5
    assert masked_mean(v, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_ctcvr_logit_is_product_of_probabilities():
    a = torch.tensor([-12.0, -3.0, 0.0, 2.0, 9.0])
    b = torch.tensor([-15.0, 1.0, 0.5, -2.0, 9.0])
    got = torch.sigmoid(ctcvr_logit(a, b))
    assert torch.allclose(got, torch.sigmoid(a) * torch.sigmoid(b), rtol=1e-4, atol=1e-9)
    # tiny probabilities must not underflow to a zero-gradient constant
    assert torch.isfinite(ctcvr_logit(torch.tensor([-40.0]), torch.tensor([-40.0]))).all()


def test_esmm_loss_is_bce_on_ctcvr():
    loss_fn = EntireSpaceLoss(LossConfig())
    a, c = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 2.0])
    out = ModelOutput(click_logit=a, purchase_logit=ctcvr_logit(a, c))
    b = _batch([1, 1], [0, 1])
    loss, parts = loss_fn(out, b)
    p = torch.sigmoid(a) * torch.sigmoid(c)
    want_cvr = F.binary_cross_entropy(p, b.purchase)
    want_ctr = F.binary_cross_entropy(torch.sigmoid(a), b.click)
    assert torch.allclose(parts["cvr"], want_cvr, rtol=1e-5)
    assert torch.allclose(loss, want_ctr + want_cvr, rtol=1e-5)
