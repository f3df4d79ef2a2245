"""Warm start (``train.init_from``, docs/retrain.md) on real gloo ranks: yesterday's rows carried exactly.

Day 1 is the tiny synthetic data set; day 2 is the generator's next day of the same world
(``synth --day 2``: every day-1 id is the same entity, new users and items appended, new impressions; its
identity vocabulary extends day 1's, so old row ``r`` is new row ``r``). ESMM trains one epoch on
day 1 on 2 ranks; day 2 then starts from it on 1 process and on 2 ranks, and right after the warm start,
before any step, every carried row equals the day-1 checkpoint's row bit for bit, the new rows keep a
fresh (non-zero) start and every dense tensor equals day 1's. CSTWA's row-wise sharded structure tables
(``sm__user``/``sm__item``, keyed by the id fields) are checked the same way from a checkpoint of an
older version (no ``vocab.json``: identity over its rows). Refusals: a vocabulary that does not extend
day 1's, another model, another tower.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import NO_SM, WORLD, rank_setup, tiny_config

ONE_EPOCH = ["train.epochs=1", "data.ray_num_cpus=1", "data.batch_size=512", "train.tensorboard=false"]


def _grown_copy(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    """``src`` with the vocabularies ``sizes`` in its spec (and identity ``vocab/``)."""
    shutil.copytree(src, dst)
    spec = yaml.safe_load((dst / "spec.yaml").read_text())
    for f in spec["fields"]:
        f["vocab_size"] = sizes.get(f["name"], f["vocab_size"])
    (dst / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if (dst / "vocab").exists():  # the generator's identity vocabulary, at the new sizes
        from cstwa_dist.data.spec import DatasetSpec
        from cstwa_dist.data.vocab import Vocabulary

        shutil.rmtree(dst / "vocab")
        Vocabulary.identity(DatasetSpec.load(dst)).save(dst / "vocab")
    shutil.rmtree(dst / "entities", ignore_errors=True)  # dense by id: would no longer match the spec
    return dst


def _train_worker(rank: int, world: int, dataset: str, run_dir: str, model: str) -> None:
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import train

    cfg, _, _ = rank_setup(dataset, *ONE_EPOCH, NO_SM, "train.validate_every_epoch=false")
    with RayRuntime(num_cpus=1):
        train(cfg, model, run_dir=run_dir, evaluate=False)


def _full_tables(dmp) -> dict[str, object]:
    """Every table of ``dmp`` whole (collective; tiny tables only) and every dense tensor, on the CPU."""
    import torch

    from cstwa_dist.distributed.sharding import submodule
    from cstwa_dist.distributed.tables import read_full_table, table_name

    out = {}
    for key in sorted(dmp.state_dict()):
        name = key.removeprefix("model.")
        table = table_name(name)
        if table is not None:
            path = name.removesuffix(f".embedding_bags.{table}.weight")
            out[name] = read_full_table(submodule(dmp, path), table, torch.device("cpu"))
    for name, p in dmp.module.model.named_parameters():
        if table_name(name) is None:
            out[name] = p.detach().cpu().clone()
    return out


def _compare_with_checkpoint(tensors: dict[str, object], source: str) -> dict[str, tuple[int, int]]:
    """Asserts carried rows and dense tensors equal ``source``'s checkpoint exactly and new rows are a
    fresh start; returns ``{table tensor: (old rows, new rows)}``."""
    import torch

    from cstwa_dist.train.sources import CheckpointTensors

    ct = CheckpointTensors(source)
    dense = ct.dense_state()
    assert set(dense) | {t.name for t in ct.tables().values()} == set(tensors)
    rows = {}
    for name, t in tensors.items():
        if name in dense:
            assert torch.equal(t, dense[name]), name
            continue
        old = ct.read_rows(name)
        n = old.shape[0]
        assert torch.equal(t[:n], old), f"{name}: a carried row differs from the checkpoint"
        if t.shape[0] > n:
            assert t[n:].abs().sum() > 0, f"{name}: new rows are all zero, not a fresh start"
        rows[name] = (n, int(t.shape[0]))
    return rows


def _day2_worker(rank: int, world: int, dataset: str, day1: str, run_dir: str, fit: bool) -> dict:
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import Trainer

    overrides = (*ONE_EPOCH, NO_SM, "train.validate_every_epoch=false", f"train.init_from={day1}")
    cfg, _, _ = rank_setup(dataset, *overrides)
    with RayRuntime(num_cpus=1):
        trainer = Trainer(cfg, "esmm", run_dir=run_dir)
        try:
            rows = _compare_with_checkpoint(_full_tables(trainer.dmp), day1)
            assert trainer.init_from is not None and trainer.init_from["optimizer_state"] == "fresh"
            if fit:
                trainer.fit(evaluate=False)
        finally:
            trainer.close()
        if fit:  # restarted with --resume auto: its own checkpoint wins, the record stays
            again = Trainer(tiny_config(dataset, *overrides, "train.resume=auto"), "esmm", run_dir=run_dir)
            try:
                assert again.position == (1, 0) and again.global_step == trainer.global_step
                assert (
                    again.init_from is not None and again.init_from["tables"] == trainer.init_from["tables"]
                )
            finally:
                again.close()
    return rows


@pytest.fixture(scope="module")
def day1_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ESMM trained one epoch on the tiny data set (day 1) on 2 ranks."""
    run = tmp_path_factory.mktemp("warm") / "day1"
    spawn_ranks(_train_worker, WORLD, str(tiny_dataset), str(run), "esmm", timeout_s=600)
    return run


@pytest.fixture(scope="module")
def day2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set's world one day later (the ``tiny_dataset`` fixture's preset, scale and seed)."""
    from cstwa_dist.data.synth import generate

    out = tmp_path_factory.mktemp("warm") / "day2"
    generate("demo", 0.02, 7, out, progress=False, day=2)
    return out


def _ids(dataset: Path) -> tuple[int, int]:
    from cstwa_dist.data.spec import DatasetSpec

    spec = DatasetSpec.load(dataset)
    return spec.num_users, spec.num_items


def test_day1_run_records_its_vocabulary(day1_run):
    vocab = json.loads((day1_run / "vocab.json").read_text())
    assert vocab["fields"]["user_id"] == {"kind": "identity", "size": 100}
    assert vocab["fields"]["item_id"] == {"kind": "identity", "size": 50}


@pytest.mark.parametrize("world", [1, WORLD])
def test_warm_start_carries_rows_exactly_and_new_rows_start_fresh(day1_run, day2, tmp_path, world):
    run = tmp_path / "day2"
    fit = world == WORLD  # one of the two also trains its epoch: metrics.json records the source
    per_rank = spawn_ranks(_day2_worker, world, str(day2), str(day1_run), str(run), fit, timeout_s=600)
    rows = per_rank[0]
    assert all(r == rows for r in per_rank)
    users, items = _ids(day2)
    assert users > 100 and items > 50  # day 2 has new users and items
    table = "embeddings.ebc.embedding_bags.shared__{}.weight"
    assert rows[table.format("user_id")] == (100, users)
    assert rows[table.format("item_id")] == (50, items)
    assert rows[table.format("ctx_hour")] == (24, 24)
    if fit:
        m = json.loads((run / "metrics.json").read_text())
        init = m["init_from"]
        assert init["source"] == str(day1_run) and init["optimizer_state"] == "fresh"
        assert init["tables"]["shared__user_id"] == {"rows_carried": 100, "rows_new": users - 100}
        assert init["tables"]["shared__item_id"] == {"rows_carried": 50, "rows_new": items - 50}
        assert init["step"] > 0 and init["world_size"] == WORLD
        assert json.loads((run / "vocab.json").read_text())["fields"]["user_id"]["size"] == users


def _cstwa_worker(rank: int, world: int, day1: str, day2: str, ckpt_root: str) -> dict:
    """CSTWA with the Structure Migrator's tables (row-wise sharded: each rank copies its block) from a
    checkpoint without vocab.json (an older version's run)."""
    from cstwa_dist.train.checkpoint import Checkpointer, TrainState
    from cstwa_dist.train.trainer import build_sharded
    from cstwa_dist.train.warmstart import warm_start

    cfg1, env, spec1 = rank_setup(day1)
    old = build_sharded(cfg1, "cstwa", env, spec1)
    Checkpointer(ckpt_root, env, keep=1).save(old.dmp, old.optimizer, TrainState(epoch_end=True))
    cfg2, _, spec2 = rank_setup(day2, "train.seed=1")
    from cstwa_dist.data.vocab import Vocabulary

    new = build_sharded(cfg2, "cstwa", env, spec2)
    report = warm_start(new.dmp, "cstwa", spec2, Vocabulary.load(day2, spec2), ckpt_root)
    assert report["vocab"].startswith("identity")
    rows = _compare_with_checkpoint(_full_tables(new.dmp), ckpt_root)
    return {"rows": rows, "report": report["tables"]}


def test_structure_tables_follow_their_id_fields_on_row_wise_shards(tiny_dataset, day2, tmp_path):
    per_rank = spawn_ranks(_cstwa_worker, WORLD, str(tiny_dataset), str(day2), str(tmp_path / "ck"))
    rows = per_rank[0]["rows"]
    users, items = _ids(day2)
    assert rows["structure_embeddings.embedding_bags.sm__user.weight"] == (100, users)
    assert rows["structure_embeddings.embedding_bags.sm__item.weight"] == (50, items)
    assert per_rank[1]["report"]["sm__user"] == {"rows_carried": 100, "rows_new": users - 100}


def _refusal_worker(rank: int, world: int, day1: str, not_extending: str, day2: str) -> list[str]:
    from cstwa_dist.data.vocab import Vocabulary
    from cstwa_dist.train.trainer import build_sharded
    from cstwa_dist.train.warmstart import WarmStartError, warm_start

    messages = []
    for dataset, model, extra in (
        (not_extending, "esmm", []),
        (day2, "ctr_mlp", []),
        (day2, "esmm", ["model.ctr_tower=[12, 8]"]),
    ):
        cfg, env, spec = rank_setup(dataset, NO_SM, *extra)
        sharded = build_sharded(cfg, model, env, spec)
        with pytest.raises(WarmStartError) as e:
            warm_start(sharded.dmp, model, spec, Vocabulary.load(dataset, spec), day1, dataset=dataset)
        messages.append(str(e.value))
    return messages


def test_refuses_another_vocabulary_model_or_tower(day1_run, day2, tiny_dataset, tmp_path):
    import numpy as np

    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.data.vocab import Vocabulary, table_field

    # a day 2 whose user ids were renumbered (a table vocabulary, not day 1's identity rows)
    other = _grown_copy(tiny_dataset, tmp_path / "renumbered", {})
    spec = DatasetSpec.load(other)
    vocab = Vocabulary.identity(spec)
    fv, id_rows = table_field("user_id", np.arange(100, dtype=np.int64)[::-1] + 1000, None)
    Vocabulary({**vocab.fields, "user_id": fv}, {"user_id": id_rows}).save(other / "vocab")
    vocab_msg, model_msg, tower_msg = spawn_ranks(_refusal_worker, 1, str(day1_run), str(other), str(day2))[0]
    assert "does not extend" in vocab_msg and "user_id" in vocab_msg and "--vocab-from" in vocab_msg
    assert "'esmm'" in model_msg and "'ctr_mlp'" in model_msg
    assert "dense tensor click_tower.net.0." in tower_msg and "(16" in tower_msg and "(12" in tower_msg


def test_cli_refuses_a_missing_source_before_anything_starts(tiny_dataset, tmp_path, capsys):
    from cstwa_dist.cli import main

    base = [
        "train",
        "--model",
        "esmm",
        "--set",
        f"data.dataset={tiny_dataset}",
        "--set",
        f"train.run_dir={tmp_path}",
    ]
    assert main([*base, "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    exported = tmp_path / "model"  # an exported model whose training checkpoint was deleted
    exported.mkdir()
    (exported / "manifest.json").write_text(
        json.dumps({"format": 1, "source": {"checkpoint": str(tmp_path / "gone")}})
    )
    assert main([*base, "--init-from", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "source checkpoint" in err and "no longer exists" in err


def _pretrain_worker(rank: int, world: int, day1: str, day2: str, out: str) -> dict:
    """Day 1's structure, then day 2's warm-started from it (``pretrain --init-from``); the config's
    ``train.init_from`` names a run that does not exist: pre-training must not read it."""
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.pretrain import pretrain_structure

    mining = [
        "structure.knn=exact",
        "structure.k=4",
        "structure.pretrain_epochs=1",
        "structure.recall_queries=64",
    ]
    with RayRuntime(num_cpus=1):
        cfg1, _, _ = rank_setup(day1, *ONE_EPOCH, *mining, f"structure.graph_dir={out}/day1")
        pretrain_structure(cfg1)
        cfg2, _, _ = rank_setup(
            day2, *ONE_EPOCH, *mining, f"structure.graph_dir={out}/day2", f"train.init_from={out}/no-such-run"
        )
        report = pretrain_structure(cfg2, init_from=f"{out}/day1")
    return report["pretrain"]["init_from"]


def test_pretrain_starts_from_the_previous_pretraining(tiny_dataset, day2, tmp_path):
    init = spawn_ranks(_pretrain_worker, 1, str(tiny_dataset), str(day2), str(tmp_path), timeout_s=600)[0]
    users, items = _ids(day2)
    assert init["model"] == "ctr_mlp" and init["checkpoint"].startswith(str(tmp_path / "day1" / "pretrain"))
    assert init["tables"]["ctr__user_id"] == {"rows_carried": 100, "rows_new": users - 100}
    assert init["tables"]["ctr__item_id"] == {"rows_carried": 50, "rows_new": items - 50}
    assert json.loads((tmp_path / "day2" / "structure.json").read_text())["graphs"]  # mined anew
    assert (tmp_path / "day2" / "pretrain" / "vocab.json").is_file()
