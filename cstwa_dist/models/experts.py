"""Mixture-of-experts blocks for the OMoE, MMoE and PLE baselines: experts, softmax gates, CGC levels.

Every parameter lives in ``nn.Linear`` layers (through ``MLPTower``), so the blocks build on ``meta``
and are materialised by DistributedModelParallel like the rest of the dense part.
"""

from __future__ import annotations

import torch
from torch import nn

from cstwa_dist.models.blocks import MLPTower


def make_experts(n: int, in_dim: int, widths: list[int], device: torch.device | None) -> nn.ModuleList:
    """``n`` independent expert MLPs (Linear → ReLU per layer).

    Experts carry no dropout: the paper leaves expert sizes and regularisation unstated, and the
    towers on top already carry the configured per-layer dropout.
    """
    return nn.ModuleList([MLPTower(in_dim, widths, [0.0] * len(widths), device) for _ in range(n)])


def run_experts(experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Stacks expert outputs: ``[B, in] -> [B, E, H]``."""
    return torch.stack([e(x) for e in experts], dim=1)


class SoftmaxGate(nn.Module):
    """A gate (Ma et al., 2018): ``softmax(W x)`` over the experts it mixes, then their weighted sum."""

    def __init__(self, in_dim: int, num_experts: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(in_dim, num_experts, device=device)

    def weights(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, E], rows sum to 1
        return torch.softmax(self.proj(x), dim=-1)

    def forward(self, x: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
        """``x``: the gate's input ``[B, in]``; ``expert_out``: ``[B, E, H]`` → mixture ``[B, H]``."""
        # torch._assert, not `if ...: raise`: TorchRec's train pipeline traces the model with torch.fx,
        # which cannot branch on a traced shape
        torch._assert(expert_out.shape[1] == self.num_experts, "gate got the wrong number of experts")
        return torch.einsum("be,beh->bh", self.weights(x), expert_out)


class CGCLevel(nn.Module):
    """One Customized Gate Control level of PLE (Tang et al., 2020).

    Each task has ``task_experts`` own experts and a gate over (own + shared) experts; the shared
    branch has ``shared_experts`` experts and, on every level but the last, a gate over *all* experts
    whose output feeds the next level's shared experts. The final level drops the shared gate, since
    only the task representations go on to the towers (and an unused gate would get no gradient).
    """

    def __init__(
        self,
        tasks: tuple[str, ...],
        in_dim: int,
        widths: list[int],
        task_experts: int,
        shared_experts: int,
        final: bool,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.task_experts = nn.ModuleDict(
            {t: make_experts(task_experts, in_dim, widths, device) for t in tasks}
        )
        self.shared_experts = make_experts(shared_experts, in_dim, widths, device)
        self.task_gates = nn.ModuleDict(
            {t: SoftmaxGate(in_dim, task_experts + shared_experts, device) for t in tasks}
        )
        self.shared_gate = (
            None if final else SoftmaxGate(in_dim, len(tasks) * task_experts + shared_experts, device)
        )
        self.out_dim = widths[-1]

    def forward(
        self, task_inputs: dict[str, torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Task inputs ``{task: [B, in]}`` and the shared input ``[B, in]`` → the same, width ``H``.

        The shared output is ``None`` on the final level.
        """
        shared = run_experts(self.shared_experts, shared_input)  # [B, S, H]
        own = {t: run_experts(self.task_experts[t], task_inputs[t]) for t in self.tasks}  # [B, T, H]
        outputs = {
            t: self.task_gates[t](task_inputs[t], torch.cat([own[t], shared], dim=1)) for t in self.tasks
        }
        shared_out = None
        if self.shared_gate is not None:
            every = torch.cat([own[t] for t in self.tasks] + [shared], dim=1)  # [B, n·T + S, H]
            shared_out = self.shared_gate(shared_input, every)
        return outputs, shared_out
