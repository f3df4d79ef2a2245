"""Multi-gate mixture-of-experts baselines: OMoE, MMoE (Ma et al., 2018) and PLE (Tang et al., 2020).

All three share one embedding collection (``x = r_u ‖ r_i ‖ ctx``), mix expert MLPs of widths
``model.expert_widths`` through softmax gates, and put a click tower and a conversion tower (with the
configured dropout) on the per-task mixtures.

**Decision (purchase head):** like ESMM, the purchase prediction is entire-space,
``purchase_logit = ctcvr_logit(click_logit, cvr_logit)`` (the logit of ``p_ctr · p_cvr``), trained with
``EntireSpaceLoss`` (``L_ctr + L_ctcvr`` over all impressions). This is the protocol of the AITM paper,
which the CSTWA paper follows on Ali-CCP when it compares these baselines with ESMM and AITM, so the
only difference between them and ESMM is how the two towers' inputs are produced. Training the CVR
head on clicked rows only would instead reproduce the sample-selection bias ESMM exists to remove.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import RecModel
from cstwa_dist.models.blocks import FieldEmbeddings, tower_with_logit
from cstwa_dist.models.esmm import ctcvr_logit
from cstwa_dist.models.experts import CGCLevel, SoftmaxGate, make_experts, run_experts
from cstwa_dist.models.outputs import ModelOutput

TASKS = ("ctr", "cvr")


class _EntireSpaceMultiTask(RecModel):
    """Shared embeddings and the two towers; subclasses turn ``x`` into one representation per task."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None) -> None:
        super().__init__()
        self.embeddings = FieldEmbeddings(spec, "shared", cfg.embedding_dim, device)
        # width of x = r_u ‖ r_i ‖ ctx, the input of the first expert layer and of its gates
        self.in_dim = self.embeddings.out_dim
        rep_dim = cfg.expert_widths[-1]  # every mixture is a weighted sum of expert outputs
        self.click_tower, self.click_layer = tower_with_logit(rep_dim, cfg.ctr_tower, cfg.dropout, device)
        self.conversion_tower, self.conversion_layer = tower_with_logit(
            rep_dim, cfg.cvr_tower, cfg.dropout, device
        )

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, in]`` → (click tower input, conversion tower input), each ``[B, H]``."""
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        r_u, r_i, ctx = self.embeddings(features)
        x = torch.cat([r_u, r_i, ctx], dim=1)  # [B, (M_u + M_i)·D + D]
        h_ctr, h_cvr = self.task_representations(x)
        click_logit = self.click_layer(self.click_tower(h_ctr)).squeeze(-1)
        cvr_logit = self.conversion_layer(self.conversion_tower(h_cvr)).squeeze(-1)
        return ModelOutput(click_logit=click_logit, purchase_logit=ctcvr_logit(click_logit, cvr_logit))


class OMoE(_EntireSpaceMultiTask):
    """One-gate MoE: ``num_experts`` shared experts and ONE gate whose mixture feeds both towers.

    The two tasks differ only in their towers; this is the control that shows what per-task gates buy.
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__(spec, cfg, device)
        in_dim = self.in_dim
        self.experts = make_experts(cfg.num_experts, in_dim, cfg.expert_widths, device)
        self.gate = SoftmaxGate(in_dim, cfg.num_experts, device)

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.gate(x, run_experts(self.experts, x))  # [B, H]
        return h, h


class MMoE(_EntireSpaceMultiTask):
    """Multi-gate MoE: ``num_experts`` shared experts, one gate per task (``gates["ctr"|"cvr"]``)."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__(spec, cfg, device)
        in_dim = self.in_dim
        self.experts = make_experts(cfg.num_experts, in_dim, cfg.expert_widths, device)
        self.gates = nn.ModuleDict({t: SoftmaxGate(in_dim, cfg.num_experts, device) for t in TASKS})

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = run_experts(self.experts, x)  # [B, E, H], computed once for both gates
        return self.gates["ctr"](x, e), self.gates["cvr"](x, e)


class PLE(_EntireSpaceMultiTask):
    """Progressive Layered Extraction: ``ple_levels`` CGC levels stacked, then the towers.

    Level 1 sees ``x`` on every branch; level ``l > 1`` sees each task's (and the shared branch's)
    output of level ``l − 1``. Every level's experts use ``expert_widths``.
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__(spec, cfg, device)
        in_dim = self.in_dim
        levels = []
        for level in range(cfg.ple_levels):
            levels.append(
                CGCLevel(
                    TASKS,
                    in_dim if level == 0 else cfg.expert_widths[-1],
                    cfg.expert_widths,
                    cfg.ple_task_experts,
                    cfg.ple_shared_experts,
                    final=level == cfg.ple_levels - 1,
                    device=device,
                )
            )
        self.levels = nn.ModuleList(levels)

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        task_in: dict[str, torch.Tensor] = {t: x for t in TASKS}
        shared_in: torch.Tensor | None = x
        for level in self.levels:
            assert shared_in is not None  # only the final level returns no shared output
            task_in, shared_in = level(task_in, shared_in)
        return task_in["ctr"], task_in["cvr"]
