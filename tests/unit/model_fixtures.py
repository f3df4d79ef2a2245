"""The tiny dataset spec and random batch shared by the model unit tests."""

import torch

from cstwa_dist.data.batch import Batch, make_kjt
from cstwa_dist.data.spec import DatasetSpec, FieldSpec

SPEC = DatasetSpec(
    fields=(
        FieldSpec(name="user_id", side="user", vocab_size=30),
        FieldSpec(name="age", side="user", vocab_size=4),
        FieldSpec(name="item_id", side="item", vocab_size=20),
        FieldSpec(name="cat", side="item", vocab_size=5),
        FieldSpec(name="hour", side="context", vocab_size=24),
        FieldSpec(name="pos", side="context", vocab_size=3),
    ),
    user_id="user_id",
    item_id="item_id",
)


def random_batch(n: int = 32, seed: int = 0) -> Batch:
    """``n`` rows of random ids; half clicked, half of the clicks purchased (z=1 implies y=1)."""
    g = torch.Generator().manual_seed(seed)
    cols = {f.name: torch.randint(0, f.vocab_size, (n,), generator=g) for f in SPEC.fields}
    click = (torch.rand(n, generator=g) < 0.5).float()
    purchase = click * (torch.rand(n, generator=g) < 0.5).float()
    return Batch(
        features=make_kjt(cols, SPEC.names),
        click=click,
        purchase=purchase,
        mask=torch.ones(n, dtype=torch.bool),
    )


def loss_trajectory(
    module: torch.nn.Module, batch: Batch, *, steps: int = 30, lr: float = 1e-2
) -> list[float]:
    """Losses of ``steps`` Adam steps on one fixed batch (a model that can learn must drive it down)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
