"""``cstwa-dist export`` and its loader: every registered model, trained one epoch on the tiny data
set with ``train.write_predictions``, exported from its checkpoint and loaded with ``load_model``,
scores the test split exactly as the training job did; the loader refuses tampered and planted files;
the program loads without TorchRec, FBGEMM or this package.

(A checkpoint written by 2 ranks with row-wise sharded tables: tests/distributed/test_export_dist.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cstwa_dist.export.artifact import MANIFEST, PROGRAM, ExportError, load_model
from cstwa_dist.fs import sha256_file
from cstwa_dist.registry import MODELS, PRETRAIN_MODEL

ROOT = Path(__file__).resolve().parents[2]
#: small towers, one epoch, dropout on (the export must switch it off), predictions written
SETTINGS = [
    "model.ctr_tower=[16, 8]",
    "model.cvr_tower=[16, 8]",
    "model.dropout=[0.1, 0.1]",
    "models.cstwa.info_layer=[8]",
    "models.ple.levels=1",
    "train.epochs=1",
    "structure.pretrain_epochs=1",
    "structure.k=4",
    "data.batch_size=1000",
    "data.eval_batch_size=1000",
    "data.ray_num_cpus=1",
    "train.tensorboard=false",
    "train.write_predictions=true",
]


def _train_all(rank: int, world: int, dataset: str, out: str) -> None:
    """Pre-training (the CTR MLP's run, then graphs for CSTWA), then one epoch of every trainable model."""
    from cstwa_dist.registry import load_config, trainable_models
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.pretrain import pretrain_structure
    from cstwa_dist.train.trainer import train

    cfg = load_config(
        None,
        [
            *SETTINGS,
            f"data.dataset={dataset}",
            f"structure.graph_dir={out}/structure",
            f"train.run_dir={out}",
        ],
    )
    with RayRuntime(num_cpus=1):
        pretrain_structure(cfg)
        for name in trainable_models():
            train(cfg, name, run_dir=Path(out) / name)


def run_dir_of(runs: Path, name: str) -> Path:
    from cstwa_dist.train.pretrain import PRETRAIN_RUN

    return runs / "structure" / PRETRAIN_RUN if name == PRETRAIN_MODEL else runs / name


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cstwa_dist.distributed.spawn import spawn_ranks

    out = tmp_path_factory.mktemp("export_runs")
    spawn_ranks(_train_all, 1, str(tiny_dataset), str(out), threads=2, timeout_s=900)
    return out


def job_predictions(run: Path, split: str = "test") -> dict[str, np.ndarray]:
    """Every rank's part of the predictions the job wrote, concatenated, with its manifest checked."""
    folder = run / "predictions" / split
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = sorted(folder.glob("part-rank-*.parquet"))
    assert len(parts) == manifest["world_size"]
    tables = [pq.read_table(p).to_pydict() for p in parts]
    cols = {k: np.concatenate([np.asarray(t[k]) for t in tables]) for k in tables[0]}
    assert len(cols["click"]) == manifest["rows"]
    return cols


def split_ids(dataset: Path, fields: list[str], split: str = "test") -> np.ndarray:
    """The split's rows as ``[N, F]`` int64 ids, in the spec's field order."""
    table = pq.ParquetDataset(sorted((dataset / split).glob("*.parquet"))).read(columns=fields)
    return np.stack([table.column(f).to_numpy().astype(np.int64) for f in fields], axis=1)


def by_rows(ids: np.ndarray) -> np.ndarray:
    """Row order sorting ``ids`` lexicographically (identical rows: identical predictions)."""
    return np.lexsort(ids.T[::-1])


def check_against_job(model_dir: Path, run: Path, dataset: Path) -> None:
    """The exported model scores the test split's rows as the job did, to 1e-5 per row."""
    m = load_model(model_dir)
    fields = m.spec.names
    job = job_predictions(run)
    job_ids = np.stack([job[f] for f in fields], axis=1)
    ids = split_ids(dataset, fields)
    a, b = by_rows(job_ids), by_rows(ids)
    np.testing.assert_array_equal(job_ids[a], ids[b])  # the job scored every test row once
    pred = m.predict(torch.from_numpy(ids[b])).numpy()
    out = {k: pred[:, i] for i, k in enumerate(m.outputs)}
    np.testing.assert_allclose(out["p_ctr"], job["p_ctr"][a], atol=1e-5, rtol=0)
    if "p_ctcvr" in out:
        np.testing.assert_allclose(out["p_ctcvr"], job["p_ctcvr"][a], atol=1e-5, rtol=0)
        assert ((out["p_cvr"] >= 0) & (out["p_cvr"] <= 1)).all()


def export(run: Path, out: Path, *extra: str) -> int:
    """``cstwa-dist export`` in this process (its logging set-up left to pytest's capture)."""
    from cstwa_dist import cli

    return cli.main(["export", "--run-dir", str(run), "--out", str(out), *extra])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_scores_like_the_training_job(runs: Path, tiny_dataset: Path, tmp_path: Path, name: str):
    from cstwa_dist.export.exporter import export_model

    run = run_dir_of(runs, name)
    out = export_model(run, tmp_path / "model")
    manifest = json.loads((out / MANIFEST).read_text())
    two_task = MODELS[name].predicts_purchase
    assert manifest["model"] == name
    assert manifest["outputs"] == (["p_ctr", "p_cvr", "p_ctcvr"] if two_task else ["p_ctr"])
    assert manifest["source"]["epoch"] == 1 and manifest["source"]["world_size"] == 1
    record = json.loads((run / "metrics.json").read_text())
    assert manifest["test_metrics"]["click_auc"] == record["history"][-1]["test"]["click_auc"]
    assert set(manifest["files"]) >= {PROGRAM, "spec.yaml", "vocab/vocab.json"}
    check_against_job(out, run, tiny_dataset)
    # the planner's figure, from the spec alone, is what the export holds
    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.export.exporter import run_config
    from cstwa_dist.export.weight import export_weights

    weights = export_weights(name, run_config(record["config"]), DatasetSpec.load(tiny_dataset))
    assert weights.tables == manifest["table_bytes"] and weights.line().startswith("export: ")


def test_product_form_p_cvr_and_unknown_ids(runs: Path, tmp_path: Path):
    """ESMM: ``p_ctr · p_cvr = p_ctcvr``; an id outside the table (``-1``, too large) reads zeros."""
    from cstwa_dist.export.exporter import export_model

    m = load_model(export_model(runs / "esmm", tmp_path / "model"))
    rows = m.manifest["table_rows"]
    ids = torch.tensor([[0] * len(m.spec.names), [3] * len(m.spec.names)])
    p = m.predict(ids)
    torch.testing.assert_close(p[:, 0] * p[:, 1], p[:, 2], atol=1e-6, rtol=1e-5)
    unseen = torch.full((1, len(m.spec.names)), -1)
    too_large = torch.tensor([[rows[f] for f in m.spec.names]])
    torch.testing.assert_close(m.predict(unseen), m.predict(too_large), atol=0, rtol=0)
    assert m.predict(torch.zeros(0, len(m.spec.names), dtype=torch.int64)).shape == (0, 3)
    with pytest.raises(ExportError, match="ids must be"):
        m.predict(torch.zeros(2, 3, dtype=torch.int64))


def test_cli_refuses_an_existing_folder_and_force_replaces_it(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from cstwa_dist import cli

    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)
    caplog.set_level("INFO", logger="cstwa_dist")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert export(runs / "esmm", out) == 2
    assert "already exists" in caplog.text
    caplog.clear()
    assert export(runs / "esmm", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / MANIFEST).is_file()
    assert "embedding_bags.shared__item_id" in caplog.text  # progress: a line per table
    assert not list(tmp_path.glob("model.*"))  # no staging folder left behind
    ckpt = sorted((runs / "esmm" / "checkpoints").glob("step-*"))[-1]
    assert export(runs / "esmm", tmp_path / "m2", "--checkpoint", str(ckpt)) == 0
    caplog.clear()
    assert export(tmp_path / "nothing", tmp_path / "m3") == 2
    assert "metrics.json" in caplog.text and not (tmp_path / "m3").exists()


def test_the_program_loads_without_torchrec_fbgemm_or_this_package(runs: Path, tmp_path: Path):
    from cstwa_dist.export.exporter import export_model

    out = export_model(runs / "cstwa", tmp_path / "model")
    expected = load_model(out).predict(torch.arange(12).reshape(1, 12) % 3).tolist()
    code = (
        "import sys\n"
        "sys.modules['torchrec'] = None; sys.modules['fbgemm_gpu'] = None; sys.modules['cstwa_dist'] = None\n"
        "import torch\n"
        f"m = torch.export.load({str(out / PROGRAM)!r}).module()\n"
        "print(m(torch.arange(12).reshape(1, 12) % 3).tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]), expected, atol=1e-6)


@pytest.fixture
def exported(runs: Path, tmp_path: Path) -> Path:
    from cstwa_dist.export.exporter import export_model

    return export_model(runs / "esmm", tmp_path / "model")


def test_a_changed_file_fails_its_hash(exported: Path):
    spec = exported / "spec.yaml"
    spec.write_text(spec.read_text() + "\n# edited\n")
    with pytest.raises(ExportError, match="sha256 differs"):
        load_model(exported)


class _Boom:
    def __reduce__(self):  # noqa: ANN204 - what a planted pickle does
        return (eval, ("__import__('pathlib').Path('/tmp/cstwa-export-pwned').touch()",))


def _rewrite_program(model_dir: Path, change) -> None:  # noqa: ANN001
    """Rewrites program.pt2 member by member through ``change(name, bytes) -> {name: bytes}`` and
    re-hashes it in the manifest (an attacker who can write the folder can write the manifest too)."""
    path = model_dir / PROGRAM
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            for name, new in change(n, data).items():
                zf.writestr(name, new)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["files"][PROGRAM] = sha256_file(path)
    (model_dir / MANIFEST).write_text(json.dumps(manifest))


def test_a_pickled_weight_payload_is_refused_unread(exported: Path):
    import pickle

    Path("/tmp/cstwa-export-pwned").unlink(missing_ok=True)

    def plant(name: str, data: bytes) -> dict[str, bytes]:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            fqn = next(iter(config["config"]))
            config["config"][fqn]["use_pickle"] = True
            return {name: json.dumps(config).encode()}
        if name.endswith("data/weights/weight_0"):
            return {name: pickle.dumps(_Boom())}
        return {name: data}

    _rewrite_program(exported, plant)
    with pytest.raises(ExportError, match="pickled payload"):
        load_model(exported)
    assert not Path("/tmp/cstwa-export-pwned").exists()


def test_unexpected_members_and_unsafe_sample_inputs_are_refused(exported: Path):
    import pickle

    def add_object(name: str, data: bytes) -> dict[str, bytes]:
        out = {name: data}
        if name.endswith("archive_format"):
            out[name.replace("archive_format", "data/constants/opaque_obj_0")] = pickle.dumps(_Boom())
        return out

    _rewrite_program(exported, add_object)
    with pytest.raises(ExportError, match="members a plain exported program does not"):
        load_model(exported)

    def drop_object(name: str, data: bytes) -> dict[str, bytes]:
        if "opaque_obj" in name:
            return {}
        if name.endswith("data/sample_inputs/model.pt"):
            return {name: pickle.dumps(_Boom())}  # torch.export.load would retry it with full pickle
        return {name: data}

    _rewrite_program(exported, drop_object)
    with pytest.raises(ExportError, match="does not load as plain tensors"):
        load_model(exported)
    assert not Path("/tmp/cstwa-export-pwned").exists()
