"""The Structure Migrator's variants on real gloo ranks through DistributedModelParallel: reading (b)'s
``P = Â^L R`` on row shards equals the dense single-process computation from the full live tables and
is left alone by the fused optimizer; ``sm_init=pretrained`` writes the representation rows; a short
``train`` with reading (b) runs end to end (docs/method.md §2, "Two readings of the Structure Migrator")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import (
    SHORT_TRAIN,
    WORLD,
    fixed_global_batch,
    load_reference,
    rank_setup,
    reference_model,
    structure_tables,
)

LAYERS, BETA = 2, 0.4
RECOMPUTED = ["structure.sm_reading=recomputed", f"structure.layers={LAYERS}", f"structure.beta={BETA}"]


def _sharded(dataset: str, overrides: list[str]):
    from cstwa_dist.structure.migrator import StructureMigrator
    from cstwa_dist.train.trainer import build_sharded

    cfg, env, spec = rank_setup(dataset, *overrides)
    sharded = build_sharded(cfg, "cstwa", env, spec)
    load_reference(sharded, reference_model(spec, cfg).state_dict())
    tables = structure_tables(cfg)
    migrator = StructureMigrator(sharded.dmp, tables, spec, dataset, cfg.structure, env)
    return sharded, migrator, tables, spec, env


def _full_tables(sharded, ebc_path: str, env) -> dict[str, torch.Tensor]:
    """Every table of the (sharded) EmbeddingBagCollection at ``ebc_path``, whole, on every rank."""
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import read_full_table

    ebc = submodule(sharded.dmp, ebc_path)
    names = sorted({k.split(".")[1] for k in ebc.state_dict() if k.startswith("embedding_bags.")})
    return {n: read_full_table(ebc, n, env.device) for n in names}


def _recomputed_worker(rank: int, world: int, dataset: str, graph_dir: str, out_dir: str) -> None:
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import local_rows

    sharded, migrator, tables, spec, env = _sharded(
        dataset, [f"structure.graph_dir={graph_dir}", *RECOMPUTED]
    )
    out: dict[str, torch.Tensor] = {}
    migrator.initialise()
    for t in tables:
        ranges, _ = local_rows(submodule(sharded.dmp, t.collection), t.table)
        out[f"ranges:{t.table}"] = torch.tensor(ranges)
    out |= {f"init:{k}": v for k, v in _full_tables(sharded, "structure_embeddings", env).items()}
    out |= {f"cvr0:{k}": v for k, v in _full_tables(sharded, "cvr_embeddings.ebc", env).items()}
    # two training steps: the fused optimizer (applied in backward) trains the CVR field tables, and
    # never the structure tables, whose lookup is detached
    rows = 64
    for step in range(2):
        batch = fixed_global_batch(spec, WORLD * rows, seed=500 + step)(rank * rows, (rank + 1) * rows)
        loss, _ = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
    out |= {f"step:{k}": v for k, v in _full_tables(sharded, "structure_embeddings", env).items()}
    out |= {f"cvr1:{k}": v for k, v in _full_tables(sharded, "cvr_embeddings.ebc", env).items()}
    migrator.epoch_boundary(1)
    out |= {f"after:{k}": v for k, v in _full_tables(sharded, "structure_embeddings", env).items()}
    # the fused optimizer's state: the trained field tables have some, the never-trained P none
    state = sharded.dmp.fused_optimizer.state_dict()["state"]
    for table in ("sm__user", "sm__item", f"cvr__{spec.user_id}"):
        keys = [k for k in state if table in k and state[k]]
        out[f"opt_state:{table}"] = torch.tensor(len(keys))
    if rank == 0:
        torch.save(out, Path(out_dir) / "recomputed.pt")


def _dense_p(dataset: Path, spec, side: str, cvr: dict[str, torch.Tensor], graph_dir: Path) -> torch.Tensor:
    """``Â^L R`` on one process: ``R`` from the full CVR field tables and every entity's profile."""
    from cstwa_dist.data.entities import read_entity_rows
    from cstwa_dist.structure.propagate import propagate
    from cstwa_dist.structure.sharded_graph import load_graph_rows

    n = spec.num_users if side == "user" else spec.num_items
    prof, _ = read_entity_rows(dataset, spec, side, 0, n)
    r = torch.cat([cvr[f"cvr__{f.name}"][prof[:, j]] for j, f in enumerate(spec.side_fields(side))], dim=1)
    g = load_graph_rows(graph_dir, side, 0, n)
    return propagate(torch.sparse_csr_tensor(g.crow, g.col, g.val, size=(n, n)), r, LAYERS)


def test_recomputed_p_equals_the_dense_computation_and_is_never_trained(tiny_dataset, exact_graphs, tmp_path):
    from cstwa_dist.data.spec import DatasetSpec

    spawn_ranks(_recomputed_worker, WORLD, str(tiny_dataset), str(exact_graphs), str(tmp_path))
    res = torch.load(tmp_path / "recomputed.pt", weights_only=True)
    spec = DatasetSpec.load(tiny_dataset)
    # P is never trained, so its tables carry no optimizer state (stateless SGD); the field tables do
    assert int(res[f"opt_state:cvr__{spec.user_id}"]) > 0
    assert int(res["opt_state:sm__user"]) == 0 and int(res["opt_state:sm__item"]) == 0
    cvr0 = {k.removeprefix("cvr0:"): v for k, v in res.items() if k.startswith("cvr0:")}
    cvr1 = {k.removeprefix("cvr1:"): v for k, v in res.items() if k.startswith("cvr1:")}
    for side, table in (("user", "sm__user"), ("item", "sm__item")):
        n = spec.num_users if side == "user" else spec.num_items
        assert len(res[f"ranges:{table}"]) == 2 and 0 < int(res[f"ranges:{table}"][0][1]) < n
        p0 = _dense_p(tiny_dataset, spec, side, cvr0, exact_graphs)
        assert torch.allclose(res[f"init:{table}"], p0, rtol=1e-5, atol=1e-6), f"{table}: initial P differs"
        # the steps left P exactly as it was; the CVR field tables of the side did train
        assert torch.equal(res[f"step:{table}"], res[f"init:{table}"]), f"{table}: the optimizer moved P"
        id_table = f"cvr__{spec.user_id if side == 'user' else spec.item_id}"
        assert not torch.equal(cvr1[id_table], cvr0[id_table]), f"{id_table} did not train"
        # the boundary recomputed P from the live (trained) tables, not from the old ones
        p1 = _dense_p(tiny_dataset, spec, side, cvr1, exact_graphs)
        assert torch.allclose(res[f"after:{table}"], p1, rtol=1e-5, atol=1e-6), (
            f"{table}: P at epoch 1 differs"
        )
        assert not torch.allclose(p1, p0)


def _pretrained_worker(rank: int, world: int, dataset: str, graph_dir: str, out_dir: str) -> None:
    sharded, migrator, _, _, env = _sharded(
        dataset, [f"structure.graph_dir={graph_dir}", "structure.sm_init=pretrained"]
    )
    before = _full_tables(sharded, "structure_embeddings", env)
    migrator.initialise()
    after = _full_tables(sharded, "structure_embeddings", env)
    if rank == 0:
        torch.save({"before": before, "after": after}, Path(out_dir) / "pretrained.pt")


def test_pretrained_start_writes_the_representation_rows(tiny_dataset, exact_graphs, tmp_path):
    from cstwa_dist.structure.representations import representation_rows, representation_shape

    spawn_ranks(_pretrained_worker, WORLD, str(tiny_dataset), str(exact_graphs), str(tmp_path))
    res = torch.load(tmp_path / "pretrained.pt", weights_only=True)
    for side, table in (("user", "sm__user"), ("item", "sm__item")):
        n, _ = representation_shape(exact_graphs, side)  # the 2 mining ranks' parts, read whole
        want = torch.from_numpy(representation_rows(exact_graphs, side, 0, n))
        assert torch.equal(res["after"][table], want), f"{table}: not the pre-trained rows"
        assert not torch.equal(res["before"][table], want)


def _train_worker(rank: int, world: int, dataset: str, graph_dir: str, run_dir: str) -> None:
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import train

    cfg, _, _ = rank_setup(
        dataset,
        *RECOMPUTED,
        *SHORT_TRAIN,
        f"structure.graph_dir={graph_dir}",
        f"train.run_dir={run_dir}",
        "data.batch_size=1024",
        "train.tensorboard=false",
    )
    with RayRuntime(num_cpus=1):
        train(cfg, "cstwa", run_dir=run_dir)


def test_train_with_the_recomputed_reading_end_to_end(tiny_dataset, exact_graphs, tmp_path):
    run_dir = tmp_path / "run"
    spawn_ranks(_train_worker, WORLD, str(tiny_dataset), str(exact_graphs), str(run_dir))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["config"]["structure"]["sm_reading"] == "recomputed"
    assert m["structure_seconds"] > 0 and len(m["history"]) == 2
    for key in ("click_auc", "purchase_auc"):
        assert m[key] is not None and math.isfinite(m[key]) and 0.0 < m[key] < 1.0
