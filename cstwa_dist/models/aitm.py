"""AITM (Xi et al., KDD 2021): click → purchase information transfer by attention, with a calibrator.

One shared embedding layer feeds a click tower and a purchase tower (the paper shares the embeddings
across tasks). The Adaptive Information Transfer (AIT) module lets the purchase task decide, per
sample, how much to take from the click task: the click tower's output is passed through a transfer
MLP and fused with the purchase tower's output by self-attention over the two vectors. The purchase
layer then predicts the end-to-end conversion ``P(z=1 | x)`` directly over the entire impression
space (no product with ``p_ctr``); the behavioural calibrator that keeps ``p_purchase ≤ p_click`` is
part of the loss (``losses/constrained.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SharedBottom
from cstwa_dist.models.outputs import ModelOutput
from cstwa_dist.models.settings import AITMSettings


class AttentionInfoTransfer(nn.Module):
    """The AIT module: ``z = Σ_u w_u · h1(u)`` over ``u ∈ {p, q}`` (transferred info, own tower output).

    ``w_u = softmax_u(⟨h2(u), h3(u)⟩ / √k)``: each of the two vectors scores itself with its own query
    and key (the paper's self-attention over the two inputs), so the weights say how much of the fused
    vector comes from the click task for this sample. ``h1``/``h2``/``h3`` (values, queries, keys) are
    single linear projections to width ``k = ait_dim`` shared by both inputs, hence both inputs must
    have the same width.
    """

    def __init__(self, in_dim: int, ait_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.values = nn.Linear(in_dim, ait_dim, device=device)  # h1
        self.queries = nn.Linear(in_dim, ait_dim, device=device)  # h2
        self.keys = nn.Linear(in_dim, ait_dim, device=device)  # h3
        self.scale = 1.0 / math.sqrt(ait_dim)
        self.out_dim = ait_dim

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H]``, ``[B, H]`` → fused ``[B, k]`` and attention weights ``[B, 2]`` (rows sum to 1)."""
        u = torch.stack([transferred, own], dim=1)  # [B, 2, H]
        scores = (self.queries(u) * self.keys(u)).sum(dim=-1) * self.scale  # [B, 2]
        weights = torch.softmax(scores, dim=1)  # [B, 2]
        fused = (weights.unsqueeze(-1) * self.values(u)).sum(dim=1)  # [B, k]
        return fused, weights


class AITM(SharedBottom):
    """Shared embeddings → click tower, purchase tower; AIT fuses transferred click info into purchase.

    ``settings``: AITM's own (``models.aitm``: the AIT width ``k``).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        settings: AITMSettings | None = None,
    ) -> None:
        settings = settings or AITMSettings()
        super().__init__(spec, cfg, device, conversion_layer=False)
        # Transfer MLP: maps the click tower's output into the purchase tower's space (same width), so
        # the AIT projections can be shared by both inputs. Gradients flow back into the click tower:
        # the paper trains the transfer end to end, which is how purchase signal shapes the click task.
        self.info_transfer = nn.Sequential(
            nn.Linear(self.click_tower.out_dim, self.conversion_tower.out_dim, device=device), nn.ReLU()
        )
        self.ait = AttentionInfoTransfer(self.conversion_tower.out_dim, settings.ait_dim, device)
        self.conversion_layer = nn.Linear(self.ait.out_dim, 1, device=device)

    def attention(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """AIT weights ``[B, 2]`` (transferred click info, own purchase tower): a diagnostic view."""
        return self._forward(features)[1]

    def _forward(self, features: KeyedJaggedTensor) -> tuple[ModelOutput, torch.Tensor]:
        x = self.inputs(features)  # [B, (M_u + M_i)·D + D]
        q_click = self.click_tower(x)  # [B, H_ctr]
        click_logit = self.click_layer(q_click).squeeze(-1)
        q_purchase = self.conversion_tower(x)  # [B, H_cvr]
        fused, weights = self.ait(self.info_transfer(q_click), q_purchase)
        purchase_logit = self.conversion_layer(fused).squeeze(-1)  # end-to-end P(z=1 | x)
        return ModelOutput(click_logit=click_logit, purchase_logit=purchase_logit), weights

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self._forward(features)[0]
