"""The one registry of models: name → spec (builder, loss, what the model needs from the trainer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cstwa_dist.config import LossConfig, ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.cstwa import CSTWA
from cstwa_dist.models.ctr_mlp import CTRMLP
from cstwa_dist.models.esmm import ESMM
from cstwa_dist.train.losses import ClickLoss, CSTWALoss, EntireSpaceLoss, Gather


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
    )
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
