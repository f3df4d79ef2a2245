"""Fixtures the end-to-end tests share: a tiny ESMM trained and exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_cli import BIN, _config, _run


@pytest.fixture(scope="session")
def model_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ESMM, one epoch on the tiny data set, exported with ``cstwa-dist export`` (``score`` and
    ``bench score`` read it; neither writes into it)."""
    tmp = tmp_path_factory.mktemp("score_model")
    cfg = _config(tmp, tiny_dataset, train={"epochs": 1, "run_dir": str(tmp / "runs"), "tensorboard": False})
    _run([str(BIN / "cstwa-dist"), "train", "--config", str(cfg), "--model", "esmm"])
    out = tmp / "model"
    _run([str(BIN / "cstwa-dist"), "export", "--run-dir", str(tmp / "runs" / "esmm"), "--out", str(out)])
    return out
