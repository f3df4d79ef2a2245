"""The serving form of a trained model: plain PyTorch modules that ``torch.export`` can trace.

A training model looks its embeddings up through TorchRec's ``EmbeddingBagCollection`` on a
``KeyedJaggedTensor`` (FBGEMM kernels, sharded by DistributedModelParallel). Nothing of that may
reach a serving process, so the exporter builds the registered model unsharded and swaps every
collection for a :class:`TableLookup`: the same tables, as plain tensors, looked up in a ``[B, F]``
int64 tensor of ids (one id per field and row, the spec's field order). Its output answers the two
calls the models make of a ``KeyedTensor`` (``values()`` and ``to_dict()``), so the model's own
forward runs unchanged: the towers, experts, attention and gates are the trained modules themselves.

With one id per field, a SUM-pooled bag is the row itself: the lookup is ``weight[id]``. An id
outside ``[0, rows)`` (``-1`` for a raw id the vocabulary has not seen) reads a zero vector, where
the training kernels would have failed or read garbage.

Memory: a :class:`TableLookup` holds its tables (``rows · dim · 4`` bytes each, float32); nothing
else is copied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

OUTPUTS_TWO_TASK = ("p_ctr", "p_cvr", "p_ctcvr")
OUTPUTS_CLICK_ONLY = ("p_ctr",)


class Pooled:
    """What a ``KeyedTensor`` answers, for one lookup: ``values()`` ([B, Σ dims], key order) and
    ``to_dict()`` (feature name → [B, dim])."""

    def __init__(self, keys: list[str], tensors: list[torch.Tensor]) -> None:
        self._keys, self._tensors = keys, tensors

    def keys(self) -> list[str]:
        return list(self._keys)

    def values(self) -> torch.Tensor:
        return torch.cat(self._tensors, dim=1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._keys, self._tensors, strict=True))


class _Table(nn.Module):
    """One table's weight, under the name a collection gives it (``embedding_bags.<table>.weight``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class TableLookup(nn.Module):
    """An ``EmbeddingBagCollection`` of single-id SUM bags as plain tensors.

    ``tables``: ``(table name, feature name, column of that feature in the ids tensor, weight)`` in the
    collection's table order (the order its ``KeyedTensor`` lists keys). State-dict names match the
    collection's, so a checkpoint's tensors land under the names they were saved with.
    """

    def __init__(self, tables: list[tuple[str, str, int, torch.Tensor]]) -> None:
        super().__init__()
        self.embedding_bags = nn.ModuleDict({name: _Table(w) for name, _, _, w in tables})
        self.table_names = [name for name, _, _, _ in tables]
        self.feature_names = [feat for _, feat, _, _ in tables]
        self.columns = [col for _, _, col, _ in tables]

    def forward(self, ids: torch.Tensor) -> Pooled:  # [B, F] int64 -> per feature [B, dim]
        out = []
        for name, col in zip(self.table_names, self.columns, strict=True):
            weight = self.embedding_bags[name].weight
            x = ids[:, col]
            known = (x >= 0) & (x < weight.shape[0])
            rows = F.embedding(torch.where(known, x, torch.zeros_like(x)), weight)
            out.append(rows * known.unsqueeze(1).to(rows.dtype))
        return Pooled(list(self.feature_names), out)


class Unused(nn.Module):
    """Stands in for a collection the model's forward never reads (CSTWA's side tables, read only to
    initialise the structure tables): no weights are exported for it."""

    def forward(self, ids: torch.Tensor) -> Pooled:
        raise RuntimeError("this embedding collection is not part of the exported forward")


class ScoringModule(nn.Module):
    """``ids [B, F] int64 → probabilities [B, k] float32``, ``k = len(outputs)``.

    ``p_ctr = σ(click_logit)``; ``p_ctcvr = σ(purchase_logit)`` (the model's entire-space purchase
    prediction, what training evaluates as Purchase AUC); ``p_cvr = p_ctcvr / p_ctr`` computed as
    ``exp(min(logσ(purchase) − logσ(click), 0))``: exact for the product-form models, where
    ``purchase_logit = logit(p_ctr · p_cvr)``, and clipped to ``[0, 1]`` for the others.
    """

    def __init__(self, model: nn.Module, two_task: bool) -> None:
        super().__init__()
        self.model = model
        self.two_task = two_task

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids)
        click = out.click_logit.float()
        p_ctr = torch.sigmoid(click)
        if not self.two_task:
            return p_ctr.unsqueeze(1)
        purchase = out.purchase_logit.float()
        log_cvr = torch.clamp(F.logsigmoid(purchase) - F.logsigmoid(click), max=0.0)
        return torch.stack([p_ctr, torch.exp(log_cvr), torch.sigmoid(purchase)], dim=1)


def collections_of(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """Every submodule of class ``kind`` by its dotted path (outermost only)."""
    found: dict[str, nn.Module] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, kind) and not any(path.startswith(p + ".") for p in found):
            found[path] = mod
    return found


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def table_layout(ebc: nn.Module, columns: Mapping[str, int]) -> list[tuple[str, str, int, int, int]]:
    """``(table, feature, column, rows, dim)`` of each table of a TorchRec collection, in its order."""
    out = []
    for cfg in ebc.embedding_bag_configs():
        if len(cfg.feature_names) != 1:
            raise ValueError(f"table {cfg.name} serves {cfg.feature_names}: one feature per table expected")
        feat = cfg.feature_names[0]
        out.append((cfg.name, feat, columns[feat], cfg.num_embeddings, cfg.embedding_dim))
    return out
