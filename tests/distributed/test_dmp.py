"""Two real gloo ranks (spawned like TorchRec's MultiProcessTestBase) running models through DMP."""

from __future__ import annotations

import math
import os
import shutil
import traceback
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

WORLD = 2
TINY = [
    "model.ctr_tower=[16, 8]",
    "model.cvr_tower=[16, 8]",
    "model.dropout=[0.0, 0.0]",
    "model.info_layer=[8]",
]


def _spawn(fn, *args, world: int = WORLD) -> None:
    port = free_port()
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, errq, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            errors.append(f"rank process {p.pid} hung (killed after 600 s)")
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _entry(fn, rank, world, port, errq, *args) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        from cstwa_dist.distributed.env import init_distributed, shutdown_distributed

        init_distributed()
        fn(rank, *args)
        shutdown_distributed()
    except Exception:
        errq.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


# --- 1. same loss on 1 and 2 ranks for identical weights and batch -----------------------------
def _fixed_global_batch(spec, n: int, seed: int = 123, mask=None):
    from cstwa_dist.data.batch import Batch, make_kjt

    g = torch.Generator().manual_seed(seed)
    cols = {f.name: torch.randint(0, f.vocab_size, (n,), generator=g) for f in spec.fields}
    click = (torch.rand(n, generator=g) < 0.3).float()
    purchase = click * (torch.rand(n, generator=g) < 0.3).float()
    mask = torch.ones(n, dtype=torch.bool) if mask is None else mask

    def part(lo: int, hi: int) -> Batch:
        return Batch(
            features=make_kjt({k: v[lo:hi] for k, v in cols.items()}, spec.names),
            click=click[lo:hi],
            purchase=purchase[lo:hi],
            mask=mask[lo:hi],
        )

    return part


def _reference_weights(spec, cfg, model: str = "cstwa"):
    """An unsharded model (CSTWA by default) on CPU with seed 0: the weights every sharded run starts from."""
    from cstwa_dist.registry import get_model_spec
    from cstwa_dist.train.wrapper import ModelTrain

    mspec = get_model_spec(model)
    torch.manual_seed(0)
    model = mspec.build(spec, cfg.model, torch.device("cpu"))
    return ModelTrain(model, mspec.build_loss(cfg.loss, cfg.model))


def _load_weights(sharded, ref_sd) -> None:
    """The reference's weights into a sharded model: tables through the sharded write path."""
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import write_full_table

    for key, weight in ref_sd.items():
        if ".embedding_bags." in key:
            path, table = key.removeprefix("model.").removesuffix(".weight").split(".embedding_bags.")
            write_full_table(submodule(sharded.dmp, path), table, weight)
    with torch.no_grad():
        for name, p in sharded.dmp.module.model.named_parameters():
            if "embedding_bags" not in name:
                p.copy_(ref_sd[f"model.{name}"])


def _loss_worker(rank: int, dataset: str, graph_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from cstwa_dist.config import load_config
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.train.trainer import build_sharded

    cfg = load_config(None, [*TINY, f"data.dataset={dataset}", f"structure.graph_dir={graph_dir}"])
    env = init_distributed()
    spec = DatasetSpec.load(dataset)
    ref = _reference_weights(spec, cfg)
    ref_sd = ref.state_dict()
    sharded = build_sharded(cfg, "cstwa", env, spec)
    _load_weights(sharded, ref_sd)

    b = 64
    part = _fixed_global_batch(spec, WORLD * b)
    mine = part(rank * b, (rank + 1) * b)
    full = part(0, WORLD * b)
    for step in range(2):  # step 2 uses the CE window filled by step 1 (global on 2 ranks)
        loss, _ = sharded.dmp(mine)
        total = loss.detach().clone()
        dist.all_reduce(total)  # each rank's loss is its share of the global batch's mean
        ref_loss, _ = ref(full)
        assert math.isclose(total.item(), ref_loss.item(), rel_tol=1e-5, abs_tol=1e-6), (
            f"step {step}: 2-rank loss {total.item()} != 1-rank loss {ref_loss.item()}"
        )
    # the structure steps on 2 ranks: U is row-wise sharded (each rank a contiguous block, a live view),
    # Eq. 8's read-out covers the own block only, and a write into the block is what lookups return
    from cstwa_dist.data.entities import read_entity_rows
    from cstwa_dist.distributed.tables import local_rows, read_full_table
    from cstwa_dist.structure.readout import side_representations

    sm_ebc = submodule(sharded.dmp, "structure_embeddings")
    u_ref = ref_sd["model.structure_embeddings.embedding_bags.sm__user.weight"]
    assert "row_wise" in sharded.plan and "fused" in sharded.plan
    ranges, own = local_rows(sm_ebc, "sm__user")
    lo, hi = ranges[rank]
    assert ranges[0][0] == 0 and ranges[-1][1] == spec.num_users and 0 < hi - lo < spec.num_users
    assert torch.equal(own, u_ref[lo:hi])
    profiles, _ = read_entity_rows(dataset, spec, "user", lo, hi)
    reps = side_representations(
        submodule(sharded.dmp, "cvr_side_embeddings"), spec, "user", profiles, ranges, env, chunk=37
    )
    want = torch.cat(
        [
            ref_sd[f"model.cvr_side_embeddings.ebc.embedding_bags.cvr__{f.name}.weight"][profiles[:, j]]
            for j, f in enumerate(spec.user_fields)
            if j > 0  # the id slot has no CVR table with SM on
        ],
        dim=1,
    )
    assert torch.allclose(reps, want), "r_u read out of sharded tables differs from the reference"
    with torch.no_grad():
        own.mul_(0.5)  # the β write-back path: in place into the live block
    assert torch.allclose(read_full_table(sm_ebc, "sm__user", env.device), 0.5 * u_ref)
    ids = torch.arange(spec.num_users)
    cols = {f.name: torch.zeros(spec.num_users, dtype=torch.int64) for f in spec.fields}
    cols[spec.user_id] = ids
    from cstwa_dist.data.batch import make_kjt
    from cstwa_dist.models.blocks import concat_by_keys

    looked_up = concat_by_keys(sm_ebc(make_kjt(cols, spec.names)), [spec.user_id])
    assert torch.allclose(looked_up, 0.5 * u_ref), "a lookup after the write-back misses the update"
    if rank == 0:
        Path(out_dir, "loss_ok").write_text("ok")


def test_two_rank_loss_equals_one_rank(tiny_dataset, tmp_path):
    _spawn(_loss_worker, str(tiny_dataset), str(tmp_path / "g"), str(tmp_path))
    assert (tmp_path / "loss_ok").exists()


# --- 1b. N steps on W ranks leave the parameters one process leaves on the same global batches ---
STEPS = 3
ROWS = 64  # per rank per step; the global batch has WORLD * ROWS rows
LAST_REAL = (40, 10)  # real rows of rank 0 and rank 1 in the last, uneven step (the rest is padding)


def _global_mask(step: int) -> torch.Tensor:
    mask = torch.ones(WORLD * ROWS, dtype=torch.bool)
    if step == STEPS - 1:
        for r, real in enumerate(LAST_REAL):
            mask[r * ROWS + real : (r + 1) * ROWS] = False
    return mask


def _steps_worker(
    rank: int, dataset: str, out_dir: str, pipeline: bool = False, model_name: str = "cstwa"
) -> None:
    from cstwa_dist.config import load_config
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import read_full_table
    from cstwa_dist.train.trainer import build_sharded

    # CE on with a window smaller than the global batch: its thresholds must not depend on W either.
    # The embedding lr is pinned: the weight tolerance below is calibrated for 0.02 steps (rounding
    # differences grow with the step; a wrong normalisation moves weights ~5x more than the bound).
    overrides = ["loss.window=100", "loss.high_percentile=80", "optim.embedding_lr=0.02"]
    cfg = load_config(None, [*TINY, f"data.dataset={dataset}", *overrides])
    env = init_distributed()
    spec = DatasetSpec.load(dataset)
    sharded = build_sharded(cfg, model_name, env, spec)
    ref_sd = _reference_weights(spec, cfg, model_name).state_dict()
    _load_weights(sharded, ref_sd)
    share = WORLD * ROWS // env.world_size
    losses = []
    params: dict[str, torch.Tensor] = {}
    model = sharded.dmp.module.model
    batches = [
        _fixed_global_batch(spec, WORLD * ROWS, seed=1000 + step, mask=_global_mask(step))(
            env.rank * share, (env.rank + 1) * share
        )
        for step in range(STEPS)
    ]
    if pipeline:  # TorchRec's TrainPipelineSparseDist, as the trainer runs it
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipe = TrainPipelineSparseDist(sharded.dmp, sharded.optimizer, env.device, execute_all_batches=True)
        it = iter(batches)
        for _ in range(STEPS):
            out = pipe.progress(it)
            total = out.loss.clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item())
        with pytest.raises(StopIteration):
            pipe.progress(it)
        pipe.detach()
    for step, batch in enumerate([] if pipeline else batches):
        loss, out = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():  # dense gradients after DDP's reduction
            if "embedding_bags" not in name and p.grad is not None:
                params[f"grad{step}:{name}"] = p.grad.detach().clone()
        sharded.optimizer.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
        assert out.rows.item() == int(_global_mask(step).sum())
    params["losses"] = torch.tensor(losses)
    for key in ref_sd:
        if ".embedding_bags." in key:
            path, table = key.removeprefix("model.").removesuffix(".weight").split(".embedding_bags.")
            params[table] = read_full_table(submodule(sharded.dmp, path), table, env.device)
    for name, p in model.named_parameters():
        if "embedding_bags" not in name:
            params[name] = p.detach().clone()
    if rank == 0:
        suffix = ("_pipeline" if pipeline else "") + ("" if model_name == "cstwa" else f"_{model_name}")
        torch.save(params, Path(out_dir) / f"params_w{env.world_size}{suffix}.pt")


def _assert_same_parameters(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    diffs = {k: float((one[k] - two[k]).abs().max()) for k in one}
    # Dense gradients (what DDP hands the optimizer) and losses agree to float rounding. Weights agree
    # to a looser bound: Adam and row-wise Adagrad divide each update by the gradient's own scale, so
    # rounding differences in sums of opposite-signed terms (the reductions run in another order on 2
    # ranks) grow to ~1e-5 of a 0.02 step; a wrong normalisation moves them by ~1e-3.
    bad = [
        k
        for k in one
        if not torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6 if k.startswith(("grad", "los")) else 2e-4)
    ]
    assert not bad, {k: diffs[k] for k in bad}


def test_esmm_on_two_ranks_trains_like_one_process(tiny_dataset, tmp_path):
    """The same for the shared-embedding family (ESMM: one collection, the entire-space loss)."""
    _spawn(_steps_worker, str(tiny_dataset), str(tmp_path), False, "esmm", world=1)
    _spawn(_steps_worker, str(tiny_dataset), str(tmp_path), False, "esmm", world=WORLD)
    one = torch.load(tmp_path / "params_w1_esmm.pt")
    _assert_same_parameters(one, torch.load(tmp_path / f"params_w{WORLD}_esmm.pt"))


def test_two_ranks_train_like_one_process_on_the_same_global_batches(tiny_dataset, tmp_path):
    """Parameters after N steps (uneven last batch, CE on, dense Adam + fused embedding optimizer)
    on 2 ranks equal those of 1 process fed the concatenated batches: losses are normalised by the
    global real-row count and dense gradients summed, like the embedding gradients."""
    _spawn(_steps_worker, str(tiny_dataset), str(tmp_path), world=1)
    _spawn(_steps_worker, str(tiny_dataset), str(tmp_path), world=WORLD)
    one = torch.load(tmp_path / "params_w1.pt")
    two = torch.load(tmp_path / f"params_w{WORLD}.pt")
    _assert_same_parameters(one, two)
    # TorchRec's train pipeline (input all-to-all of the next batch overlapping this one) leaves the
    # same parameters as the plain loop on the same ranks
    _spawn(_steps_worker, str(tiny_dataset), str(tmp_path), True, world=WORLD)
    piped = torch.load(tmp_path / f"params_w{WORLD}_pipeline.pt")
    for k, v in piped.items():
        assert torch.allclose(v, two[k], rtol=1e-6, atol=1e-7), (k, float((v - two[k]).abs().max()))
    # the weights moved (the comparison is not between two untouched copies)
    start = _reference_weights_state(tiny_dataset)
    assert not torch.allclose(start["model.click_layer.weight"], one["click_layer.weight"])


def _reference_weights_state(dataset: Path) -> dict[str, torch.Tensor]:
    from cstwa_dist.config import load_config
    from cstwa_dist.data.spec import DatasetSpec

    cfg = load_config(None, [*TINY, f"data.dataset={dataset}"])
    return _reference_weights(DatasetSpec.load(dataset), cfg).state_dict()


# --- 2. uneven files: equal steps, every row once; gathered AUC = sklearn's ---------------------
def _uneven_copy(src: Path, dst: Path) -> int:
    """The tiny dataset with train re-cut into deliberately uneven files (most rows in one file)."""
    shutil.copytree(src, dst)
    table = pq.read_table(sorted((src / "train").glob("*.parquet")))
    shutil.rmtree(dst / "train")
    (dst / "train").mkdir()
    n = table.num_rows
    cuts = [0, int(n * 0.8), int(n * 0.9), n - 7, n]
    for i, (a, c) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        pq.write_table(table.slice(a, c - a), dst / "train" / f"part-{i:05d}.parquet")
    return n


def _train_worker(rank: int, dataset: str, run_dir: str) -> None:
    from sklearn.metrics import roc_auc_score

    from cstwa_dist.config import load_config
    from cstwa_dist.data.reader import SplitReader
    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import predict, train

    cfg = load_config(
        None,
        [
            *TINY,
            f"data.dataset={dataset}",
            f"train.run_dir={run_dir}",
            "train.epochs=2",
            "data.batch_size=512",
            "model.structure_migrator=false",
            "data.ray_num_cpus=1",
            "train.select_epoch=last",  # the metrics of the final model, which `predict` below reads
        ],
    )
    env = init_distributed()
    with RayRuntime(num_cpus=1):
        res = train(cfg, "cstwa", run_dir=run_dir)
        reader = SplitReader(
            dataset,
            "test",
            res.spec,
            rank=env.rank,
            world_size=env.world_size,
            batch_size=300,
            seed=0,
            shuffle=False,
        )
        pred = predict(res.sharded.dmp, reader, env)
    if rank != 0:  # predictions are gathered on rank 0 only (no O(rows) on the other ranks)
        assert pred == {}
        return
    # gathered from both ranks: the whole test split, and the project's AUC equals sklearn's on it
    test_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(dataset, "test").glob("*.parquet"))
    assert pred["click"].size == test_rows
    for label, score, key in (("click", "p_click", "click_auc"), ("purchase", "p_purchase", "purchase_auc")):
        want = roc_auc_score(pred[label], pred[score])
        assert math.isclose(res.metrics[key], want, abs_tol=1e-9), (key, res.metrics[key], want)
    np.save(Path(run_dir) / "pred_rank0.npy", pred["p_click"])


def test_uneven_files_equal_steps_and_gathered_auc(tiny_dataset, tmp_path):
    import json

    data = tmp_path / "uneven"
    n = _uneven_copy(tiny_dataset, data)
    run_dir = tmp_path / "run"
    _spawn(_train_worker, str(data), str(run_dir))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["train_samples"] == 2 * n  # 2 epochs, every real row exactly once per epoch
    # rank 0 gathered every test row; rank 1 kept none
    assert np.load(run_dir / "pred_rank0.npy").size > 0
    assert not (run_dir / "pred_rank1.npy").exists()


# --- 3. every registered model trains through TorchRec's pipeline (it traces the model with fx) ----
def _pipeline_worker(rank: int, dataset: str, out_dir: str) -> None:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from cstwa_dist.config import load_config
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.distributed.env import init_distributed
    from cstwa_dist.registry import MODELS
    from cstwa_dist.train.trainer import build_sharded

    env = init_distributed()
    spec = DatasetSpec.load(dataset)
    ok = []
    for name, mspec in MODELS.items():
        if mspec.needs_graphs(load_config(None, TINY).model):
            overrides = [*TINY, f"data.dataset={dataset}", "model.structure_migrator=false"]
        else:
            overrides = [*TINY, f"data.dataset={dataset}", "model.expert_widths=[8, 8]"]
        sharded = build_sharded(load_config(None, overrides), name, env, spec)
        pipe = TrainPipelineSparseDist(sharded.dmp, sharded.optimizer, env.device, execute_all_batches=True)
        batches = iter([_fixed_global_batch(spec, 32, seed=s)(0, 32) for s in range(3)])
        outs = [pipe.progress(batches) for _ in range(3)]
        assert all(torch.isfinite(o.loss) for o in outs), name
        ok.append(name)
    # concatenated context pooling goes through the sharded collections (keys, not positions) too
    overrides = [*TINY, f"data.dataset={dataset}", "model.context_pooling=concat"]
    sharded = build_sharded(load_config(None, overrides), "esmm", env, spec)
    pipe = TrainPipelineSparseDist(sharded.dmp, sharded.optimizer, env.device, execute_all_batches=True)
    batches = iter([_fixed_global_batch(spec, 32, seed=s)(0, 32) for s in range(2)])
    assert all(torch.isfinite(pipe.progress(batches).loss) for _ in range(2))
    if rank == 0:
        Path(out_dir, "pipeline_ok").write_text(",".join(ok))


def test_every_model_trains_through_the_train_pipeline(tiny_dataset, tmp_path):
    from cstwa_dist.registry import MODELS

    _spawn(_pipeline_worker, str(tiny_dataset), str(tmp_path), world=1)
    assert (tmp_path / "pipeline_ok").read_text().split(",") == list(MODELS)


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
