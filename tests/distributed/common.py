"""What the multi-rank tests share: the tiny model, each rank's setup, the seed-0 reference that 1-
and 2-rank runs both start from, the fixed global batches they are fed, and the graph-mining worker.

The workers run in ranks started by :func:`cstwa_dist.distributed.spawn.spawn_ranks`, which calls
them as ``fn(rank, world, *args)`` in a fresh interpreter: everything here is importable at module
level and imports torch-heavy modules inside the functions, so that a rank pays only for what it runs.

The spots that name a model's own settings (``TINY``'s Info Layer, :data:`NO_SM`, and
:func:`reference_model` / :func:`structure_tables`, which build from a config) are kept here and in
``test_dmp.MODEL_OVERRIDES`` so that a change in where those settings live is made in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cstwa_dist.config import RunConfig
    from cstwa_dist.data.batch import Batch
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import DistEnv

WORLD = 2
#: small towers and no dropout: fast ranks, and 1- and 2-rank runs that can agree to rounding
TINY = [
    "model.ctr_tower=[16, 8]",
    "model.cvr_tower=[16, 8]",
    "model.dropout=[0.0, 0.0]",
    "models.cstwa.info_layer=[8]",
]
#: CSTWA without the Structure Migrator (a run that needs no mined graphs)
NO_SM = "models.cstwa.structure_migrator=false"
#: a short ``train`` on the tiny data set: two epochs, one Ray CPU per rank
SHORT_TRAIN = ["train.epochs=2", "data.ray_num_cpus=1"]


def tiny_config(dataset: str | Path, *overrides: str) -> RunConfig:
    """The defaults with :data:`TINY`, the data set and ``overrides`` (later ones win)."""
    from cstwa_dist.registry import load_config

    return load_config(None, [*TINY, f"data.dataset={dataset}", *overrides])


def rank_setup(dataset: str | Path, *overrides: str) -> tuple[RunConfig, DistEnv, DatasetSpec]:
    """What a worker starts with: its config, its (already joined) group and the data set's spec."""
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import init_distributed

    cfg = tiny_config(dataset, *overrides)
    return cfg, init_distributed(), DatasetSpec.load(dataset)


def reference_model(spec: DatasetSpec, cfg: RunConfig, model: str = "cstwa") -> Any:
    """The unsharded model and loss (``ModelTrain``) on CPU, seed 0: the weights every sharded run
    of a comparison starts from, so that 1- and 2-rank runs differ only in how they are distributed."""
    import torch

    from cstwa_dist.registry import get_model_spec
    from cstwa_dist.train.wrapper import ModelTrain

    mspec = get_model_spec(model)
    torch.manual_seed(0)
    own = mspec.settings_in(cfg)
    net = mspec.build(spec, cfg.model, torch.device("cpu"), structure=cfg.structure, settings=own)
    return ModelTrain(net, mspec.build_loss(cfg.loss, cfg.model, settings=own))


def structure_tables(cfg: RunConfig, model: str = "cstwa") -> list[Any]:
    """The tables the Structure Migrator owns in ``model`` under ``cfg``."""
    from cstwa_dist.registry import get_model_spec

    mspec = get_model_spec(model)
    return list(mspec.structure_tables(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)))


def load_reference(sharded: Any, ref_sd: dict[str, torch.Tensor]) -> None:
    """Every weight of the reference's state dict into the sharded model: tables through the sharded
    write path (each rank writes its own shards), dense parameters copied."""
    import torch

    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import write_full_table

    with torch.no_grad():
        for key, weight in ref_sd.items():
            name = key.removeprefix("model.")
            if ".embedding_bags." in name:
                path, table = name.removesuffix(".weight").split(".embedding_bags.")
                write_full_table(submodule(sharded.dmp, path), table, weight)
        for name, p in sharded.dmp.module.model.named_parameters():
            if "embedding_bags" not in name:
                p.copy_(ref_sd[f"model.{name}"])


def fixed_global_batch(spec: DatasetSpec, n: int, seed: int = 123, mask: torch.Tensor | None = None) -> Any:
    """A seeded global batch of ``n`` rows; returns ``part(lo, hi)``, its rows ``[lo, hi)`` as a
    ``Batch``: a rank feeds its slice, one process the whole, and both see the same rows."""
    import torch

    from cstwa_dist.data.batch import Batch, make_kjt

    g = torch.Generator().manual_seed(seed)
    cols = {f.name: torch.randint(0, f.vocab_size, (n,), generator=g) for f in spec.fields}
    click = (torch.rand(n, generator=g) < 0.3).float()
    purchase = click * (torch.rand(n, generator=g) < 0.3).float()
    real = torch.ones(n, dtype=torch.bool) if mask is None else mask

    def part(lo: int, hi: int) -> Batch:
        return Batch(
            features=make_kjt({k: v[lo:hi] for k, v in cols.items()}, spec.names),
            click=click[lo:hi],
            purchase=purchase[lo:hi],
            mask=real[lo:hi],
        )

    return part


def mine_worker(rank: int, world: int, dataset: str, graph_dir: str, knn: str) -> None:
    """Pre-training model at the seed-0 reference weights → ``mine_structure`` on this group: user and
    item graphs (``k = 4``) and representations under ``graph_dir``; rank 0 writes the report."""
    from cstwa_dist.fs import atomic_write_json
    from cstwa_dist.registry import PRETRAIN_MODEL, get_model_spec
    from cstwa_dist.structure.migrator import mine_structure
    from cstwa_dist.train.trainer import build_sharded

    cfg, env, spec = rank_setup(
        dataset,
        f"structure.graph_dir={graph_dir}",
        f"structure.knn={knn}",
        "structure.k=4",
        "structure.recall_queries=64",
    )
    sharded = build_sharded(cfg, PRETRAIN_MODEL, env, spec)
    load_reference(sharded, reference_model(spec, cfg, PRETRAIN_MODEL).state_dict())
    source = get_model_spec(PRETRAIN_MODEL).representation_source
    report = mine_structure(sharded.dmp, source, spec, dataset, cfg.structure, env)
    if rank == 0:
        atomic_write_json(Path(graph_dir) / "report.json", report)
