"""The one registry of models: name → spec (builder, loss, what the model needs from the trainer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cstwa_dist.config import LossConfig, ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.aitm import AITM
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.cstwa import CSTWA
from cstwa_dist.models.ctr_mlp import CTRMLP
from cstwa_dist.models.escm2 import ESCM2
from cstwa_dist.models.esmm import ESMM
from cstwa_dist.models.mlp import SingleTaskMLPs
from cstwa_dist.models.moe import PLE, MMoE, OMoE
from cstwa_dist.train.losses import ClickLoss, CSTWALoss, EntireSpaceLoss, Gather
from cstwa_dist.train.losses_baselines import ClickedSpaceLoss
from cstwa_dist.train.losses_counterfactual import AITMLoss, ESCM2Loss


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the trainer may know about a model: how to build it and its loss, and its needs."""

    name: str
    description: str
    build: Callable[[DatasetSpec, ModelConfig, torch.device | None], RecModel]
    build_loss: Callable[[LossConfig, ModelConfig, Gather | None], nn.Module]
    predicts_purchase: bool = True


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="cstwa",
            description="CSTWA: Structure Migrator + Click Perceptron + Curse Escaper (each switchable)",
            build=CSTWA,
            build_loss=lambda lc, mc, g: CSTWALoss(lc, mc.curse_escaper, g),
        ),
        ModelSpec(
            name="esmm",
            description="ESMM: shared embeddings, p_ctcvr = p_ctr * p_cvr over the entire space",
            build=ESMM,
            build_loss=lambda lc, mc, g: EntireSpaceLoss(lc),
        ),
        ModelSpec(
            name="ctr_mlp",
            description="plain CTR MLP pre-trained to mine user/item structure (click only)",
            build=CTRMLP,
            build_loss=lambda lc, mc, g: ClickLoss(),
            predicts_purchase=False,
        ),
        ModelSpec(
            name="mlp",
            description="two independent single-task MLPs; purchase tower trained on clicked rows only",
            build=SingleTaskMLPs,
            build_loss=lambda lc, mc, g: ClickedSpaceLoss(lc),
        ),
        ModelSpec(
            name="omoe",
            description="OMoE: shared experts, one gate for both tasks; purchase = p_ctr * p_cvr",
            build=OMoE,
            build_loss=lambda lc, mc, g: EntireSpaceLoss(lc),
        ),
        ModelSpec(
            name="mmoe",
            description="MMoE: shared experts, one gate per task; purchase = p_ctr * p_cvr",
            build=MMoE,
            build_loss=lambda lc, mc, g: EntireSpaceLoss(lc),
        ),
        ModelSpec(
            name="ple",
            description="PLE: CGC levels of shared + task experts; purchase = p_ctr * p_cvr",
            build=PLE,
            build_loss=lambda lc, mc, g: EntireSpaceLoss(lc),
        ),
        ModelSpec(
            name="aitm",
            description="AITM: click info transferred to the purchase tower by attention (AIT); calibrator",
            build=AITM,
            build_loss=lambda lc, mc, g: AITMLoss(lc),
        ),
        ModelSpec(
            name="escm2_ips",
            description="ESCM2-IPS: ESMM + IPS counterfactual CVR risk on clicks, p_ctr as propensity",
            build=lambda s, mc, d: ESCM2(s, mc, d, doubly_robust=False),
            build_loss=lambda lc, mc, g: ESCM2Loss(lc, "ips"),
        ),
        ModelSpec(
            name="escm2_dr",
            description="ESCM2-DR: ESMM + doubly robust counterfactual CVR risk with an imputation tower",
            build=lambda s, mc, d: ESCM2(s, mc, d, doubly_robust=True),
            build_loss=lambda lc, mc, g: ESCM2Loss(lc, "dr"),
        ),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
