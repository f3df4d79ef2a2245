"""A training command checks its data set before it starts anything expensive.

``pretrain``, ``train`` and ``experiment`` used to find a missing file only after the process group
and Ray had started (and ``pretrain`` only after pre-training); now
:func:`cstwa_dist.data.preflight.check_dataset` runs first. Each case here is one log line naming the
path, what is wrong and the command that fixes it, exit code 2, and no runtime started (the runtime is
replaced by one that fails the test).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from cstwa_dist import cli
from cstwa_dist.config import RunConfig
from cstwa_dist.data.preflight import PRETRAIN_READS_ENTITIES, check_dataset, entity_tables_reader
from cstwa_dist.registry import get_model_spec, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting the process group or Ray is the expensive step these errors must come before; the
    CLI's logging set-up is skipped so that pytest's log capture keeps its handler."""
    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)

    @contextmanager
    def refuse(*_args: object, **_kwargs: object):
        raise AssertionError("command_runtime started before the data set was checked")
        yield

    monkeypatch.setattr("cstwa_dist.distributed.env.command_runtime", refuse)


@pytest.fixture
def no_entities(tmp_path: Path, tiny_dataset: Path) -> Path:
    """The tiny data set as a version before entity tables wrote it."""
    data = tmp_path / "old"
    shutil.copytree(tiny_dataset, data)
    shutil.rmtree(data / "entities")
    return data


def _config(tmp_path: Path, dataset: Path, **models: dict) -> Path:
    cfg = {
        "data": {"dataset": str(dataset), "ray_num_cpus": 1},
        "structure": {"graph_dir": str(tmp_path / "structure")},
        "train": {"run_dir": str(tmp_path / "runs")},
        "models": models,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fails(argv: list[str], caplog: pytest.LogCaptureFixture, *words: str) -> str:
    """Runs the CLI in this process; it must return 2 with one error line holding every word."""
    caplog.clear()
    assert cli.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "command",
    [["pretrain"], ["train", "--model", "esmm"], ["experiment", "--models", "esmm", "--seeds", "1"]],
)
def test_a_missing_data_set_fails_before_the_runtime(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: list[str]
) -> None:
    cfg = _config(tmp_path, tmp_path / "nowhere")
    out = ["--out", str(tmp_path / "exp")] if command[0] == "experiment" else []
    _fails(
        [*command, "--config", str(cfg), *out],
        caplog,
        "nowhere: no such data set folder",
        "cstwa-dist synth",
    )


def test_missing_spec_and_split_name_the_file_and_the_fix(
    tmp_path: Path, tiny_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "half"
    shutil.copytree(tiny_dataset, data)
    (data / "spec.yaml").unlink()
    cfg = _config(tmp_path, data)
    _fails(["pretrain", "--config", str(cfg)], caplog, f"{data / 'spec.yaml'} not found", "cstwa-dist synth")
    shutil.copy(tiny_dataset / "spec.yaml", data / "spec.yaml")
    shutil.rmtree(data / "val")
    _fails(["train", "--config", str(cfg), "--model", "esmm"], caplog, f"{data / 'val'}: no Parquet files")
    shutil.copytree(tiny_dataset / "val", data / "val")
    next((data / "test").glob("*.parquet")).write_bytes(b"not parquet")
    _fails(["train", "--config", str(cfg), "--model", "esmm"], caplog, "not a readable Parquet file")


def test_pretrain_needs_entity_tables_and_says_how_to_write_them(
    tmp_path: Path, no_entities: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, no_entities)
    fix = f"cstwa-dist entities --dataset {no_entities}"
    where = str(no_entities / "entities" / "user.parquet")
    _fails(["pretrain", "--config", str(cfg)], caplog, where, "pretrain mines", fix)
    _fails(["train", "--config", str(cfg), "--model", "cstwa"], caplog, where, "model cstwa starts U/I", fix)
    _fails(
        [
            "experiment",
            "--config",
            str(cfg),
            "--models",
            "esmm,cstwa",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "e"),
        ],
        caplog,
        where,
        fix,
    )


def test_only_models_that_read_entity_tables_need_them(tmp_path: Path, no_entities: Path) -> None:
    """ESMM and the other baselines read impressions only; CSTWA reads profiles through its
    Structure Migrator unless it is switched off or starts from the pre-trained representations."""

    def reader(cfg: RunConfig, model: str) -> str | None:
        mspec = get_model_spec(model)
        migrates = bool(mspec.structure_tables(cfg.model, cfg.structure, settings=mspec.settings_in(cfg)))
        return entity_tables_reader(model, migrates, cfg.structure)

    cfg = load_config(_config(tmp_path, no_entities))
    for model in ("esmm", "mlp", "mmoe", "ple", "aitm", "escm2_ips"):
        assert reader(cfg, model) is None, model
        check_dataset(no_entities, entities_for=reader(cfg, model))  # trains without them
    assert "sm_init=fields" in (reader(cfg, "cstwa") or "")
    off = load_config(_config(tmp_path, no_entities, cstwa={"structure_migrator": False}))
    assert reader(off, "cstwa") is None
    pre = load_config(_config(tmp_path, no_entities), ["structure.sm_init=pretrained"])
    assert reader(pre, "cstwa") is None
    rec = load_config(_config(tmp_path, no_entities), ["structure.sm_reading=recomputed"])
    assert "sm_reading=recomputed" in (reader(rec, "cstwa") or "")
    with pytest.raises(FileNotFoundError, match="cstwa-dist entities --dataset"):
        check_dataset(no_entities, entities_for=PRETRAIN_READS_ENTITIES)


def test_entity_tables_of_another_spec_are_refused(tmp_path: Path, tiny_dataset: Path) -> None:
    data = tmp_path / "changed"
    shutil.copytree(tiny_dataset, data)
    spec = yaml.safe_load((data / "spec.yaml").read_text())
    user_id = next(f for f in spec["fields"] if f["name"] == spec["user_id"])
    user_id["vocab_size"] += 1
    (data / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        ValueError, match=r"100 rows, but spec.yaml has 101 user ids; rewrite them with `cstwa-dist entities"
    ):
        check_dataset(data, entities_for=PRETRAIN_READS_ENTITIES)


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "nowhere")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "cstwa-dist"), "pretrain", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "ray" not in proc.stderr.lower()
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no such data set folder" in errors[0], proc.stderr


def test_esmm_gets_past_the_check_without_entity_tables(tmp_path: Path, no_entities: Path) -> None:
    """The check lets a job that reads no profiles through: it reaches the runtime (refused here)."""
    cfg = _config(tmp_path, no_entities)
    with pytest.raises(AssertionError, match="command_runtime started"):
        cli.main(["train", "--config", str(cfg), "--model", "esmm"])
    experiment = ["experiment", "--config", str(cfg), "--models", "esmm,mmoe", "--seeds", "1"]
    with pytest.raises(AssertionError, match="command_runtime started"):
        cli.main([*experiment, "--out", str(tmp_path / "e")])
