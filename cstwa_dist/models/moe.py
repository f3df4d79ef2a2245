"""Multi-gate mixture-of-experts baselines: OMoE, MMoE (Ma et al., 2018) and PLE (Tang et al., 2020).

All three share one embedding collection (``x = r_u ‖ r_i ‖ ctx``), mix expert MLPs of widths
``expert_widths`` through softmax gates, and put a click tower and a conversion tower (with the
configured dropout) on the per-task mixtures. The expert counts and widths are each model's own
settings (``models.omoe`` / ``models.mmoe``: ``MoESettings``; ``models.ple``: ``PLESettings``).

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

from cstwa_dist.config import ModelConfig
from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.models.base import SharedBottom
from cstwa_dist.models.experts import CGCLevel, SoftmaxGate, make_experts, run_experts
from cstwa_dist.models.settings import MoESettings, PLESettings

TASKS = ("ctr", "cvr")


class _EntireSpaceMultiTask(SharedBottom):
    """ESMM's shape with experts between ``x`` and the towers: subclasses mix ``x`` per task."""

    def __init__(
        self, spec: DatasetSpec, cfg: ModelConfig, device: torch.device | None, expert_widths: list[int]
    ) -> None:
        # every mixture is a weighted sum of expert outputs, so the towers see the last expert width
        super().__init__(spec, cfg, device, rep_dim=expert_widths[-1])

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, in]`` → (click tower input, conversion tower input), each ``[B, H]``."""
        raise NotImplementedError


class _SharedExperts(_EntireSpaceMultiTask):
    """OMoE and MMoE: ``num_experts`` shared experts over ``x``, then the subclass's gate(s) from
    ``build_gates`` (after the experts: creation order is initialisation order under
    DistributedModelParallel)."""

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        settings: MoESettings | None = None,
    ) -> None:
        s = settings or MoESettings()
        super().__init__(spec, cfg, device, s.expert_widths)
        self.experts = make_experts(s.num_experts, self.in_dim, s.expert_widths, device)
        self.build_gates(s.num_experts, device)

    def build_gates(self, num_experts: int, device: torch.device | None) -> None:
        raise NotImplementedError


class OMoE(_SharedExperts):
    """One-gate MoE: ``num_experts`` shared experts and ONE gate whose mixture feeds both towers.

    The two tasks differ only in their towers; this is the control that shows what per-task gates buy.
    """

    def build_gates(self, num_experts: int, device: torch.device | None) -> None:
        self.gate = SoftmaxGate(self.in_dim, num_experts, device)

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.gate(x, run_experts(self.experts, x))  # [B, H]
        return h, h


class MMoE(_SharedExperts):
    """Multi-gate MoE: ``num_experts`` shared experts, one gate per task (``gates["ctr"|"cvr"]``)."""

    def build_gates(self, num_experts: int, device: torch.device | None) -> None:
        self.gates = nn.ModuleDict({t: SoftmaxGate(self.in_dim, num_experts, device) for t in TASKS})

    def task_representations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = run_experts(self.experts, x)  # [B, E, H], computed once for both gates
        return self.gates["ctr"](x, e), self.gates["cvr"](x, e)


class PLE(_EntireSpaceMultiTask):
    """Progressive Layered Extraction: ``levels`` CGC levels stacked, then the towers.

    Level 1 sees ``x`` on every branch; level ``l > 1`` sees each task's (and the shared branch's)
    output of level ``l − 1``. Every level's experts use ``expert_widths``.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        settings: PLESettings | None = None,
    ) -> None:
        s = settings or PLESettings()
        super().__init__(spec, cfg, device, s.expert_widths)
        in_dim = self.in_dim
        levels = []
        for level in range(s.levels):
            levels.append(
                CGCLevel(
                    TASKS,
                    in_dim if level == 0 else s.expert_widths[-1],
                    s.expert_widths,
                    s.task_experts,
                    s.shared_experts,
                    final=level == s.levels - 1,
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
