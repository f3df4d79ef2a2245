"""Building blocks shared by the models: MLP towers, the Info Layer, embedding collections.

Everything here is a pure ``nn.Module`` that accepts a ``device`` so models can be built on ``meta``
and materialised by DistributedModelParallel (no process-group or rank logic in ``models/``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextvars import ContextVar
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cstwa_dist.config import ContextPooling
from cstwa_dist.data.spec import DatasetSpec, FieldSpec


class _Draws:
    """The keys of one forward pass and how many keyed dropout layers have drawn so far."""

    def __init__(self, keys: tuple[int, ...]) -> None:
        self.keys = keys
        self.calls = 0


_DRAWS: ContextVar[_Draws | None] = ContextVar("cstwa_dropout_draws", default=None)
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: consecutive slots give well-spread seeds


def set_dropout_keys(keys: Sequence[int] | None) -> None:
    """The keys the next forward pass's :class:`KeyedDropout` layers draw from (None: torch's stream).

    Set by the training wrapper from the batch before every forward (``train/wrapper.py``)."""
    _DRAWS.set(None if keys is None else _Draws(tuple(int(k) for k in keys)))


class KeyedDropout(nn.Module):
    """Dropout whose mask for a chunk of rows is drawn from that chunk's key, not from the rank's stream.

    Why: the reader cuts a training step's global batch into shares, each with a key hashed from
    ``(seed, epoch, step, share)`` (``data/shares.dropout_key``), and a rank's batch is its shares'
    rows in share order. Drawing each share's mask from ``(key, layer)`` gives every row the same mask
    whichever rank holds it, so one process and N ranks train the same model with dropout on (with
    ``torch.nn.Dropout`` every rank draws from its own stream and the masks depend on the world size).
    The ``i``-th keyed layer called in a forward pass is its layer number; a model's call order is fixed.
    Without keys (hand-built batches) it is ``torch.nn.functional.dropout``. Identity in eval mode.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        draws = _DRAWS.get()
        if draws is None:
            return F.dropout(x, self.p, training=True)
        chunks = len(draws.keys)
        if x.shape[0] % chunks:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be cut into {chunks} equal keyed chunks")
        slot = draws.calls
        draws.calls += 1
        n = x.shape[0] // chunks
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for j, key in enumerate(draws.keys):
            gen = torch.Generator(device=x.device)
            gen.manual_seed((key * _GOLDEN + slot) % (1 << 63))
            u = torch.rand((n, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
            keep[j * n : (j + 1) * n] = u >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class MLPTower(nn.Module):
    """Linear → ReLU → Dropout per layer (the paper's towers); output is the last hidden layer.

    The dropout is :class:`KeyedDropout`: masks follow the rows, not the rank."""

    def __init__(
        self, in_dim: int, widths: list[int], dropout: list[float], device: torch.device | None = None
    ) -> None:
        super().__init__()
        if len(dropout) != len(widths):
            raise ValueError("one dropout rate per layer")
        layers: list[nn.Module] = []
        prev = in_dim
        for w, p in zip(widths, dropout, strict=True):
            layers += [nn.Linear(prev, w, device=device), nn.ReLU()]
            if p > 0:
                layers.append(KeyedDropout(p))
            prev = w
        self.net = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, out]
        return self.net(x)


def ctcvr_logit(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> torch.Tensor:
    """logit(σ(a)·σ(b)) computed in log space (ESMM's ``p_ctcvr = p_ctr · p_cvr`` as a logit).

    With ``log p = logσ(a) + logσ(b)``, ``logit p = log p − log(1 − p)`` and ``log(1 − p) =
    log(−expm1(log p))``, so BCEWithLogits on the result is the CTCVR BCE without underflow when
    both probabilities are tiny (purchase rates of 0.02 % make that the normal case).
    """
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_p = torch.clamp(log_p, max=-1e-7)  # p < 1 strictly, so log(1 − p) stays finite
    return log_p - torch.log(-torch.expm1(log_p))


def tower_with_logit(
    in_dim: int, widths: list[int], dropout: list[float], device: torch.device | None
) -> tuple[MLPTower, nn.Linear]:
    """A task tower and the Linear layer that turns its last hidden state into the task's logit.

    Every two-task model here has one per task (Click Tower + Click Layer, Conversion Tower +
    Conversion Layer); the model keeps both as attributes because some read the hidden state.
    """
    tower = MLPTower(in_dim, widths, dropout, device)
    return tower, nn.Linear(tower.out_dim, 1, device=device)


class InfoLayer(nn.Module):
    """Click Perceptron's Info Layer (Eq. 12–14): ``2 · sigmoid(MLP(h_ctr))`` gates the CVR input.

    The factor 2 keeps the gate's mean near 1 so CP starts close to the identity on ``x_cvr``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: list[int], device: torch.device | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for w in hidden:
            layers += [nn.Linear(prev, w, device=device), nn.ReLU()]
            prev = w
        layers.append(nn.Linear(prev, out_dim, device=device))
        self.net = nn.Sequential(*layers)

    def forward(self, h_ctr: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, dim x_cvr]
        return 2.0 * torch.sigmoid(self.net(h_ctr))


def init_bounds(init_std: float) -> dict[str, float]:
    """``EmbeddingBagConfig`` init bounds for a table drawn with standard deviation ``init_std``.

    ``0`` keeps TorchRec's default, uniform on ``±√(1/N)`` per table: about ±0.02 for an id table of a
    few thousand rows but ±0.5 for a 4-value field, so small fields start loud and id tables nearly
    silent. ``> 0`` gives every table the same spread, the small-normal start of the baselines'
    reference implementations; it is drawn uniformly on ``±√3·init_std`` (the same standard deviation)
    because FBGEMM's fused kernels initialise their rows uniformly between two bounds.
    """
    if init_std <= 0:
        return {}
    bound = math.sqrt(3.0) * init_std
    return {"weight_init_min": -bound, "weight_init_max": bound}


def field_tables(
    fields: list[FieldSpec], prefix: str, dim: int, init_std: float = 0.0
) -> list[EmbeddingBagConfig]:
    """One table per field, named ``<prefix>__<field>``, looked up by the feature of that field."""
    return [
        EmbeddingBagConfig(
            name=f"{prefix}__{f.name}",
            embedding_dim=dim,
            num_embeddings=f.vocab_size,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
            **init_bounds(init_std),
        )
        for f in fields
    ]


def embedding_collection(
    tables: list[EmbeddingBagConfig], device: torch.device | None
) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=tables, device=device)


def concat_by_keys(kt: KeyedTensor, keys: list[str]) -> torch.Tensor:
    """Concatenates pooled embeddings in an explicit key order.

    A sharded EBC's ``values()`` are ordered by the sharding plan, not by the tables (docs/platform-notes.md),
    so positional slicing would silently mix fields across ranks: always go through keys.
    """
    d = kt.to_dict()
    return torch.cat([d[k] for k in keys], dim=1)


def mean_by_keys(kt: KeyedTensor, keys: list[str]) -> torch.Tensor:
    d = kt.to_dict()
    return torch.stack([d[k] for k in keys], dim=0).mean(dim=0)


class FieldEmbeddings(nn.Module):
    """One embedding table per field of a spec, with the side views the models need.

    ``forward`` returns ``(r_u, r_i, ctx)``: user-side and item-side concatenations (docs/method.md Eq. 2)
    and the context embeddings pooled by ``context_pooling``: their mean (Eq. 7, ``[B, D]``) or their
    concatenation (``[B, M_ctx·D]``). ``fields`` restricts the collection to some of the spec's fields
    (default all): a view whose fields are absent is ``[B, 0]``, and no table exists (or is looked up)
    for a field nobody reads.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        prefix: str,
        dim: int,
        device: torch.device | None,
        fields: list[str] | None = None,
        context_pooling: ContextPooling = "mean",
        init_std: float = 0.0,
    ) -> None:
        super().__init__()
        if context_pooling not in get_args(ContextPooling):
            raise ValueError(
                f"context_pooling must be one of {get_args(ContextPooling)}, got {context_pooling!r}"
            )
        self.context_pooling = context_pooling
        keep = set(spec.names if fields is None else fields)
        unknown = keep - set(spec.names)
        if unknown:
            raise ValueError(f"fields {sorted(unknown)} are not in the dataset spec")
        self.user_keys = [f.name for f in spec.user_fields if f.name in keep]
        self.item_keys = [f.name for f in spec.item_fields if f.name in keep]
        self.context_keys = [f.name for f in spec.context_fields if f.name in keep]
        self.dim = dim
        tables = field_tables([f for f in spec.fields if f.name in keep], prefix, dim, init_std)
        self.ebc = embedding_collection(tables, device)

    @property
    def user_dim(self) -> int:
        return len(self.user_keys) * self.dim

    @property
    def item_dim(self) -> int:
        return len(self.item_keys) * self.dim

    @property
    def context_dim(self) -> int:
        if not self.context_keys:
            return 0
        return self.dim if self.context_pooling == "mean" else len(self.context_keys) * self.dim

    @property
    def out_dim(self) -> int:
        """Width of ``r_u ‖ r_i ‖ ctx``, the input every tower built on these embeddings takes."""
        return self.user_dim + self.item_dim + self.context_dim

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kt = self.ebc(features)
        empty = kt.values().new_zeros((kt.values().shape[0], 0))
        return (
            concat_by_keys(kt, self.user_keys) if self.user_keys else empty,  # [B, M_u·D]
            concat_by_keys(kt, self.item_keys) if self.item_keys else empty,  # [B, M_i·D]
            self._context(kt) if self.context_keys else empty,  # [B, D] or [B, M_ctx·D]
        )

    def _context(self, kt: KeyedTensor) -> torch.Tensor:
        if self.context_pooling == "mean":
            return mean_by_keys(kt, self.context_keys)
        return concat_by_keys(kt, self.context_keys)
