"""Every launcher answers ``--help`` (and ``-h``) with its usage and starts nothing.

The launchers ``cd`` to the folder above their own, so each runs from a copy in an empty folder: a
launcher that started its job would create ``data/`` or ``runs/`` there (or hang past the timeout).
``ray_runtime.sh`` and ``torchrun.sh`` are tested with the runtime they start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCHERS = Path(__file__).resolve().parents[2] / "launchers"


def _copy(tmp_path: Path, name: str) -> Path:
    (tmp_path / "launchers").mkdir()
    script = tmp_path / "launchers" / name
    shutil.copy(LAUNCHERS / name, script)
    return script


@pytest.mark.parametrize("name", ["run_demo.sh", "experiments_fair.sh", "retrain_days.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_starts_nothing(tmp_path: Path, name: str, flag: str) -> None:
    script = _copy(tmp_path, name)
    out = subprocess.run(["bash", str(script), flag], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: launchers/{name}")
    assert "NPROC" in out.stdout  # the environment it reads is documented
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launchers"]  # no data/, no runs/


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("run_demo.sh", ["extra"], "takes no arguments"),
        ("retrain_days.sh", ["7"], "takes no arguments"),
        ("experiments_fair.sh", ["none", "--hlep"], "unknown conflict level '--hlep'"),
    ],
)
def test_a_bad_argument_fails_before_anything_starts(
    tmp_path: Path, name: str, args: list[str], message: str
) -> None:
    script = _copy(tmp_path, name)
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2
    assert message in out.stderr and "--help" in out.stderr and len(out.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launchers"]


@pytest.mark.parametrize("env", [{"NNODES": "2"}, {"NNODES": "2", "MASTER_ADDR": "", "RDZV_ENDPOINT": ""}])
def test_torchrun_several_nodes_without_an_address_fails_before_anything_starts(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """NNODES > 1 with neither MASTER_ADDR nor RDZV_ENDPOINT: one line, exit 2, nothing started (the
    copy has no ray_runtime.sh next to it, so getting past the check would fail differently)."""
    script = _copy(tmp_path, "torchrun.sh")
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "MASTER_ADDR", "RDZV_ENDPOINT")}
    out = subprocess.run(
        ["bash", str(script), "2", "train"], capture_output=True, text=True, timeout=10, env={**base, **env}
    )
    assert out.returncode == 2, out.stderr
    assert "NNODES=2 needs MASTER_ADDR or RDZV_ENDPOINT" in out.stderr and "--help" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launchers"]
