"""Real gloo ranks (spawned by :func:`cstwa_dist.distributed.spawn.spawn_ranks`, like TorchRec's
MultiProcessTestBase) running models through DistributedModelParallel, against one process.

The 1-process-vs-2-rank training check runs every registered model (a pytest case each). Its ranks
start twice in all, not twice per model: one 1-process run and one 2-rank run each train every model
in turn (:func:`steps_runs`), since starting ranks (torch, TorchRec, a process group) costs more than
a model's few steps.
"""

from __future__ import annotations

import json
import math
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cstwa_dist.distributed.spawn import spawn_ranks
from cstwa_dist.registry import MODELS
from tests.distributed.common import (
    NO_SM,
    SHORT_TRAIN,
    WORLD,
    fixed_global_batch,
    load_reference,
    rank_setup,
    reference_model,
)

#: each model's own settings for the tiny runs, on top of common.TINY: small experts keep the
#: mixture-of-experts models quick
MODEL_OVERRIDES: dict[str, list[str]] = {
    "omoe": ["models.omoe.expert_widths=[8, 8]"],
    "mmoe": ["models.mmoe.expert_widths=[8, 8]"],
    "ple": ["models.ple.expert_widths=[8, 8]"],
}
#: the 1-vs-2-rank cases: case -> (model, overrides). Every registered model (the pre-training one
#: included: ``pretrain`` trains it on every rank), plus ESMM with concatenated context pooling, which
#: sends the context fields through the sharded collections by key rather than by position.
CASES: dict[str, tuple[str, list[str]]] = {
    **{name: (name, MODEL_OVERRIDES.get(name, [])) for name in MODELS},
    "esmm_concat": ("esmm", ["model.context_pooling=concat"]),
}


# --- 1. same loss on 1 and 2 ranks for identical weights and batch -----------------------------
def _loss_worker(rank: int, world: int, dataset: str, graph_dir: str) -> None:
    import torch.distributed as dist

    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.train.trainer import build_sharded

    cfg, env, spec = rank_setup(dataset, f"structure.graph_dir={graph_dir}")
    ref = reference_model(spec, cfg)
    ref_sd = ref.state_dict()
    sharded = build_sharded(cfg, "cstwa", env, spec)
    load_reference(sharded, ref_sd)

    b = 64
    part = fixed_global_batch(spec, WORLD * b)
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


def test_two_rank_loss_equals_one_rank(tiny_dataset, tmp_path):
    spawn_ranks(_loss_worker, WORLD, str(tiny_dataset), str(tmp_path / "g"))


# --- 1b. N steps on W ranks leave the parameters one process leaves on the same global batches ---
STEPS = 3
ROWS = 64  # per rank per step; the global batch has WORLD * ROWS rows
LAST_REAL = (40, 10)  # real rows of rank 0 and rank 1 in the last, uneven step (the rest is padding)
# CE on with a window smaller than the global batch: its thresholds must not depend on W either. The
# embedding lr is pinned: the weight tolerance below is calibrated for 0.02 steps (rounding
# differences grow with the step; a wrong normalisation moves weights ~5x more than the bound).
STEPS_OVERRIDES = ["loss.window=100", "loss.high_percentile=80", "optim.embedding_lr=0.02"]
Job = tuple[str, bool]  # (case, through TorchRec's train pipeline)


def _global_mask(step: int) -> torch.Tensor:
    mask = torch.ones(WORLD * ROWS, dtype=torch.bool)
    if step == STEPS - 1:
        for r, real in enumerate(LAST_REAL):
            mask[r * ROWS + real : (r + 1) * ROWS] = False
    return mask


def _train_steps(dataset: str, case: str, pipeline: bool) -> tuple[dict[str, torch.Tensor], float]:
    """``STEPS`` steps of ``case`` on this group from the seed-0 reference, each rank fed its share
    of the same global batches. Returns the losses, dense gradients (plain loop only), full tables and
    dense parameters, and how far the dense parameters moved from the start."""
    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import read_full_table
    from cstwa_dist.train.trainer import build_sharded

    model_name, overrides = CASES[case]
    cfg, env, spec = rank_setup(dataset, *STEPS_OVERRIDES, *overrides)
    sharded = build_sharded(cfg, model_name, env, spec)
    ref_sd = reference_model(spec, cfg, model_name).state_dict()
    load_reference(sharded, ref_sd)
    share = WORLD * ROWS // env.world_size
    losses = []
    params: dict[str, torch.Tensor] = {}
    model = sharded.dmp.module.model
    batches = [
        fixed_global_batch(spec, WORLD * ROWS, seed=1000 + step, mask=_global_mask(step))(
            env.rank * share, (env.rank + 1) * share
        )
        for step in range(STEPS)
    ]
    if pipeline:  # TorchRec's TrainPipelineSparseDist, as the trainer runs it (it traces the model)
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
    moved = 0.0
    for name, p in model.named_parameters():
        if "embedding_bags" not in name:
            params[name] = p.detach().clone()
            moved = max(moved, float((params[name] - ref_sd[f"model.{name}"]).abs().max()))
    return params, moved


def _steps_worker(rank: int, world: int, dataset: str, jobs: list[Job]) -> dict[Job, Any]:
    """Every job in turn on this group. Rank 0 returns each job's ``_train_steps`` result, the other
    ranks ``None``; a job that raised returns its traceback instead, and the next job still runs
    (a case fails alone). An error that strikes one rank only can leave the others waiting in a
    collective; then the whole run times out and every case reports that."""
    done: dict[Job, Any] = {}
    for case, pipeline in jobs:
        try:
            result = _train_steps(dataset, case, pipeline)
            done[(case, pipeline)] = result if rank == 0 else None
        except Exception:
            done[(case, pipeline)] = traceback.format_exc()
    return done


@pytest.fixture(scope="module")
def steps_runs(tiny_dataset) -> dict[tuple[int, str, bool], Any]:
    """Every case on 1 process, and on 2 ranks both with the plain loop and through the pipeline:
    ``(world, case, pipeline)`` -> ``(params, moved)``, or the failing ranks' tracebacks."""
    plain = [(case, False) for case in CASES]
    runs: dict[tuple[int, str, bool], Any] = {}
    for world, jobs in ((1, plain), (WORLD, plain + [(case, True) for case in CASES])):
        per_rank = spawn_ranks(_steps_worker, world, str(tiny_dataset), jobs, timeout_s=1200)
        for job in jobs:
            errors = [
                f"rank {r}:\n{done[job]}" for r, done in enumerate(per_rank) if isinstance(done[job], str)
            ]
            runs[(world, *job)] = "\n".join(errors) if errors else per_rank[0][job]
    return runs


def _params(runs: dict[tuple[int, str, bool], Any], world: int, case: str, pipeline: bool = False):
    got = runs[(world, case, pipeline)]
    if isinstance(got, str):
        how = " through the train pipeline" if pipeline else ""
        pytest.fail(f"{case} on {world} rank(s){how} raised:\n{got}", pytrace=False)
    return got


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


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process_on_the_same_global_batches(steps_runs, case):
    """Parameters after N steps (uneven last batch, CE on, dense Adam + fused embedding optimizer)
    on 2 ranks equal those of 1 process fed the concatenated batches: losses are normalised by the
    global real-row count and dense gradients summed, like the embedding gradients."""
    one, moved = _params(steps_runs, 1, case)
    two, _ = _params(steps_runs, WORLD, case)
    _assert_same_parameters(one, two)
    assert moved > 0, "the weights did not move: the comparison is between two untouched copies"


@pytest.mark.parametrize("case", list(CASES))
def test_the_train_pipeline_leaves_the_parameters_of_the_plain_loop(steps_runs, case):
    """TorchRec's train pipeline (it traces the model with fx, and overlaps the next batch's input
    all-to-all with this step) leaves the parameters the plain loop leaves on the same ranks."""
    piped, _ = _params(steps_runs, WORLD, case, pipeline=True)
    two, _ = _params(steps_runs, WORLD, case)
    assert piped.keys() == {k for k in two if not k.startswith("grad")}
    for k, v in piped.items():
        assert torch.allclose(v, two[k], rtol=1e-6, atol=1e-7), (k, float((v - two[k]).abs().max()))


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


def _train_worker(rank: int, world: int, dataset: str, run_dir: str) -> None:
    from sklearn.metrics import roc_auc_score

    from cstwa_dist.data.reader import SplitReader
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import predict, train

    cfg, env, _ = rank_setup(
        dataset,
        *SHORT_TRAIN,
        NO_SM,
        f"train.run_dir={run_dir}",
        "data.batch_size=512",
        "train.select_epoch=last",  # the metrics of the final model, which `predict` below reads
    )
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
    data = tmp_path / "uneven"
    n = _uneven_copy(tiny_dataset, data)
    run_dir = tmp_path / "run"
    spawn_ranks(_train_worker, WORLD, str(data), str(run_dir))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["train_samples"] == 2 * n  # 2 epochs, every real row exactly once per epoch
    # rank 0 gathered every test row; rank 1 kept none
    assert np.load(run_dir / "pred_rank0.npy").size > 0
    assert not (run_dir / "pred_rank1.npy").exists()
