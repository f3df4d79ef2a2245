"""The MLP, OMoE, MMoE and PLE baselines, unsharded on CPU: shapes, gradients, losses, structure."""

from __future__ import annotations

import math

import pytest
import torch

from cstwa_dist.config import LossConfig, ModelConfig
from cstwa_dist.data.batch import Batch
from cstwa_dist.losses.bce import ClickedSpaceLoss, EntireSpaceLoss
from cstwa_dist.models.experts import SoftmaxGate
from cstwa_dist.models.mlp import SingleTaskMLPs
from cstwa_dist.models.moe import PLE, MMoE, OMoE
from cstwa_dist.models.outputs import ModelOutput
from cstwa_dist.models.settings import ModelSettings, MoESettings, PLESettings
from cstwa_dist.registry import get_model_spec
from cstwa_dist.train.wrapper import ModelTrain
from tests.unit.model_fixtures import SPEC, loss_trajectory, random_batch

NAMES = ("mlp", "omoe", "mmoe", "ple")
CLASSES = {"mlp": SingleTaskMLPs, "omoe": OMoE, "mmoe": MMoE, "ple": PLE}


def _cfg() -> ModelConfig:
    return ModelConfig(ctr_tower=[16, 8], cvr_tower=[16, 8], dropout=[0.0, 0.0])


def _own(name: str, **kw: object) -> ModelSettings | None:
    """Small experts for each model's own settings (``models.<name>``); the MLP has none."""
    if name == "ple":
        return PLESettings(**{"expert_widths": [16, 8], **kw})  # type: ignore[arg-type]
    if name in ("omoe", "mmoe"):
        return MoESettings(**{"expert_widths": [16, 8], "num_experts": 3, **kw})  # type: ignore[arg-type]
    return None


def _model(name: str, device: str = "cpu", **kw: object) -> torch.nn.Module:
    """The model class itself (not through the registry), with its own small settings."""
    own = _own(name, **kw)
    extra = {"settings": own} if own is not None else {}
    return CLASSES[name](SPEC, _cfg(), torch.device(device), **extra)


def _batch(n: int = 32, seed: int = 0) -> Batch:
    return random_batch(n, seed)


def _train_module(name: str) -> ModelTrain:
    spec, cfg, own = get_model_spec(name), _cfg(), _own(name)
    return ModelTrain(
        spec.build(SPEC, cfg, torch.device("cpu"), settings=own),
        spec.build_loss(LossConfig(), cfg, None, settings=own),
    )


@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_the_baseline_with_its_loss(name: str) -> None:
    spec = get_model_spec(name)
    module = _train_module(name)
    assert spec.predicts_purchase
    assert type(module.model) is CLASSES[name]
    assert isinstance(module.loss, ClickedSpaceLoss if name == "mlp" else EntireSpaceLoss)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_gradient_for_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    module = _train_module(name)
    loss, out = module(_batch())
    parts, click, purchase = out.parts, out.click_logit, out.purchase_logit
    assert click.shape == (32,) and purchase is not None and purchase.shape == (32,)
    assert torch.isfinite(loss) and set(parts) == {"ctr", "cvr"}
    loss.backward()
    bad = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"no finite gradient for {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    module = _train_module(name)
    losses = loss_trajectory(module, _batch(64), lr=2e-2)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta(name: str) -> None:
    model = CLASSES[name](SPEC, ModelConfig(), torch.device("meta"))  # every default
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_clicked_space_loss_by_hand_and_ignores_unclicked_rows() -> None:
    # rows: clicked+bought, unclicked, clicked+not bought
    click = torch.tensor([1.0, 0.0, 1.0])
    purchase = torch.tensor([1.0, 0.0, 0.0])
    batch = Batch(features=None, click=click, purchase=purchase, mask=torch.ones(3, dtype=torch.bool))  # type: ignore[arg-type]
    click_logit = torch.tensor([0.5, -1.0, 2.0])
    loss_fn = ClickedSpaceLoss(LossConfig())
    loss, parts = loss_fn(ModelOutput(click_logit, torch.tensor([0.3, 4.0, -0.7])), batch)
    # BCE(x, 1) = softplus(−x), BCE(x, 0) = softplus(x)
    l_ctr = (_softplus(-0.5) + _softplus(-1.0) + _softplus(-2.0)) / 3
    l_cvr = (_softplus(-0.3) + _softplus(-0.7)) / 2  # only the two clicked rows
    assert parts["ctr"].item() == pytest.approx(l_ctr, rel=1e-6)
    assert parts["cvr"].item() == pytest.approx(l_cvr, rel=1e-6)
    assert loss.item() == pytest.approx(l_ctr + l_cvr, rel=1e-6)
    # the unclicked row's purchase logit neither changes the loss nor receives a gradient
    logit = torch.tensor([0.3, -25.0, -0.7], requires_grad=True)
    other, _ = loss_fn(ModelOutput(click_logit, logit), batch)
    assert other.item() == pytest.approx(loss.item(), rel=1e-6)
    other.backward()
    assert logit.grad is not None and logit.grad[1].item() == 0.0 and logit.grad[0].item() != 0.0


def test_clicked_space_loss_skips_padding_rows() -> None:
    click = torch.tensor([1.0, 1.0])
    batch = Batch(
        features=None, click=click, purchase=torch.tensor([1.0, 0.0]), mask=torch.tensor([True, False])
    )  # type: ignore[arg-type]
    cfg = LossConfig(ctr_weight=1.0, cvr_weight=2.0)
    loss, parts = ClickedSpaceLoss(cfg)(
        ModelOutput(torch.tensor([0.0, 9.0]), torch.tensor([1.0, 9.0])), batch
    )
    assert parts["cvr"].item() == pytest.approx(_softplus(-1.0), rel=1e-6)
    assert loss.item() == pytest.approx(_softplus(0.0) + 2 * _softplus(-1.0), rel=1e-6)


def _gates(model: torch.nn.Module) -> list[SoftmaxGate]:
    return [m for m in model.modules() if isinstance(m, SoftmaxGate)]


def test_omoe_has_one_gate_and_mmoe_one_per_task() -> None:
    omoe, mmoe = _model("omoe", num_experts=5), _model("mmoe", num_experts=5)
    assert isinstance(omoe, OMoE) and isinstance(mmoe, MMoE)
    assert len(_gates(omoe)) == 1 and len(omoe.experts) == 5
    assert len(_gates(mmoe)) == 2 and set(mmoe.gates) == {"ctr", "cvr"} and len(mmoe.experts) == 5
    assert mmoe.gates["ctr"] is not mmoe.gates["cvr"]
    assert all(g.num_experts == 5 for g in _gates(omoe) + _gates(mmoe))
    # OMoE's towers see one and the same mixture; MMoE's per-task gates give different ones
    x = torch.randn(4, omoe.in_dim)
    h_ctr, h_cvr = omoe.task_representations(x)
    assert torch.equal(h_ctr, h_cvr)
    m_ctr, m_cvr = mmoe.task_representations(x)
    assert not torch.allclose(m_ctr, m_cvr)


def test_gate_mixes_with_softmax_weights() -> None:
    gate = SoftmaxGate(3, 2)
    x = torch.randn(5, 3)
    w = gate.weights(x)
    assert torch.allclose(w.sum(-1), torch.ones(5))
    experts = torch.randn(5, 2, 4)
    expected = w[:, :1] * experts[:, 0] + w[:, 1:] * experts[:, 1]
    assert torch.allclose(gate(x, experts), expected, atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2])
def test_ple_levels_and_expert_counts(levels: int) -> None:
    model = _model("ple", levels=levels, shared_experts=2, task_experts=3)
    assert isinstance(model, PLE)
    assert len(model.levels) == levels
    for i, level in enumerate(model.levels):
        final = i == levels - 1
        assert len(level.shared_experts) == 2
        assert {t: len(e) for t, e in level.task_experts.items()} == {"ctr": 3, "cvr": 3}
        assert all(g.num_experts == 3 + 2 for g in level.task_gates.values())
        assert (level.shared_gate is None) == final
        if not final:
            assert level.shared_gate.num_experts == 2 * 3 + 2
    assert len(_gates(model)) == 2 * levels + (levels - 1)
    out = model(_batch(8).features)
    assert (
        out.click_logit.shape == (8,) and out.purchase_logit is not None and out.purchase_logit.shape == (8,)
    )


@pytest.mark.parametrize("name", ["omoe", "mmoe", "ple"])
def test_moe_purchase_is_entire_space_ctcvr(name: str) -> None:
    """p_purchase = p_ctr · p_cvr ≤ p_ctr for every row (the ESMM decision in moe.py)."""
    torch.manual_seed(0)
    model = _model(name).eval()
    out = model(_batch(16).features)
    assert out.purchase_logit is not None
    assert (torch.sigmoid(out.purchase_logit) <= torch.sigmoid(out.click_logit) + 1e-6).all()
