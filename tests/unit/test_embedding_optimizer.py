"""The fused table optimizer: ``optim.embedding=auto`` is the same algorithm, learning rate and epsilon
on CPU and GPU; fused Adam is an explicit, GPU-only choice; a run records what its kernel got.

The resolution is a pure function of the config and a ``torch.device`` (no GPU needed to resolve for
one); the train test runs one real rank (gloo, Ray Data, TorchRec, FBGEMM's CPU kernels) on the tiny
data set and reads the settings back from ``metrics.json`` and from the FBGEMM kernels themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cstwa_dist.config import ConfigError, OptimConfig
from cstwa_dist.distributed.sharding import (
    embedding_optimizer_name,
    prepare_tables,
    resolve_embedding_optimizer,
)
from cstwa_dist.registry import get_model_spec, load_config
from cstwa_dist.train.wrapper import ModelTrain

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_the_same_row_wise_adagrad_on_cpu_and_gpu():
    cfg = OptimConfig()
    cpu, gpu = resolve_embedding_optimizer(cfg, CPU), resolve_embedding_optimizer(cfg, CUDA)
    assert cpu == gpu  # algorithm, lr, eps: the GPU trains the model every CPU measurement trained
    assert (gpu.name, gpu.kernel, gpu.lr, gpu.eps) == ("rowwise_adagrad", "EXACT_ROWWISE_ADAGRAD", 0.1, 1e-8)
    assert gpu.lr != cfg.lr  # not the dense Adam's 1e-3, as the GPU path used to take
    assert embedding_optimizer_name(cfg, CUDA) == "rowwise_adagrad"
    explicit = OptimConfig(embedding="rowwise_adagrad", embedding_lr=0.02, embedding_eps=1e-6)
    assert resolve_embedding_optimizer(explicit, CUDA) == resolve_embedding_optimizer(explicit, CPU)
    assert resolve_embedding_optimizer(explicit, CUDA).kwargs() == {"lr": 0.02, "eps": 1e-6}


def test_adam_is_explicit_gpu_only_and_at_its_own_learning_rate():
    cfg = OptimConfig(embedding="adam", embedding_adam_lr=0.005)
    adam = resolve_embedding_optimizer(cfg, CUDA)
    assert (adam.name, adam.kernel, adam.lr, adam.eps, adam.betas) == (
        "adam",
        "ADAM",
        0.005,
        1e-8,
        (0.9, 0.999),
    )
    assert adam.to_dict()["betas"] == [0.9, 0.999] and adam.to_dict()["state"] == "2 x weights"
    with pytest.raises(
        ValueError, match=r"optim.embedding=adam runs on GPUs only, and this run's device is cpu"
    ):
        resolve_embedding_optimizer(cfg, CPU)
    with pytest.raises(ConfigError, match="optim.embedding=adam needs optim.embedding_adam_lr"):
        OptimConfig(embedding="adam")


def test_the_tables_get_the_resolved_optimizer_with_its_lr_and_eps():
    """What ``prepare_tables`` puts on the weights is what TorchRec hands FBGEMM (class and kwargs),
    here for a GPU run planned on this machine (the model on ``meta``)."""
    from cstwa_dist.planner.specs import synth_spec

    run = load_config(None)
    mspec = get_model_spec("esmm")
    spec = synth_spec("demo", 0.02)
    own = mspec.settings_in(run)
    model = mspec.build(spec, run.model, torch.device("meta"), structure=run.structure, settings=own)
    module = ModelTrain(model, mspec.build_loss(run.loss, run.model, settings=own))
    prepare_tables(module, run.optim, resolve_embedding_optimizer(run.optim, CUDA))
    weights = [p for n, p in module.named_parameters() if "embedding_bags" in n]
    assert weights
    for w in weights:
        assert w._optimizer_classes == [RowWiseAdagrad]  # type: ignore[attr-defined]
        assert w._optimizer_kwargs == [{"lr": 0.1, "eps": 1e-8}]  # type: ignore[attr-defined]


def _train_one_epoch(rank: int, world: int, dataset: str, out: str) -> dict[str, Any]:
    """One epoch of ESMM on one rank; returns what the FBGEMM kernels were built with."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import train

    cfg = load_config(
        None,
        [
            f"data.dataset={dataset}",
            f"train.run_dir={out}",
            "train.epochs=1",
            "train.tensorboard=false",
            "data.batch_size=1000",
            "data.eval_batch_size=1000",
            "data.ray_num_cpus=1",
            "model.ctr_tower=[8]",
            "model.cvr_tower=[8]",
            "model.dropout=[0.1]",
            "optim.embedding_lr=0.05",
            "optim.embedding_eps=1.0e-7",
        ],
    )
    with RayRuntime(num_cpus=1):
        res = train(cfg, "esmm", run_dir=Path(out) / "esmm", evaluate=False)
    # the sharded collections keep their lookups in a plain list, outside ``modules()``
    kernels = [
        kernel
        for sebc in res.sharded.dmp.modules()
        if isinstance(sebc, ShardedEmbeddingBagCollection)
        for lookup in sebc._lookups
        for m in lookup.modules()
        if isinstance(kernel := getattr(m, "_emb_module", None), SplitTableBatchedEmbeddingBagsCodegen)
    ]
    return {
        "kernels": [(str(k.optimizer.name), k.get_learning_rate(), k.optimizer_args.eps) for k in kernels],
    }


def test_a_cpu_run_records_the_optimizer_its_kernels_got(tiny_dataset: Path, tmp_path: Path):
    from cstwa_dist.distributed.spawn import spawn_ranks

    [got] = spawn_ranks(_train_one_epoch, 1, str(tiny_dataset), str(tmp_path), threads=2, timeout_s=600)
    metrics = json.loads((tmp_path / "esmm" / "metrics.json").read_text())
    assert metrics["embedding_optimizer"] == "rowwise_adagrad"
    assert metrics["embedding_optimizer_settings"] == {
        "name": "rowwise_adagrad",
        "kernel": "FBGEMM EXACT_ROWWISE_ADAGRAD",
        "lr": 0.05,
        "eps": 1e-7,
        "weight_decay": 0.0,
        "state": "one fp32 per row",
    }
    assert got["kernels"]
    for name, lr, eps in got["kernels"]:
        assert name == "EXACT_ROWWISE_ADAGRAD" and lr == pytest.approx(0.05) and eps == pytest.approx(1e-7)
