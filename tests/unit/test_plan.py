"""The sharding dry run: plans without a process group or data, bytes that add up, structure formulas.

Fast (a few seconds: the 30M-user model is built on ``meta``); nothing here allocates a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cstwa_dist import cli
from cstwa_dist.config import load_config, with_overrides
from cstwa_dist.data.spec import DatasetSpec, FieldSpec, SpecError
from cstwa_dist.distributed.plan import (
    DryRun,
    StructureSide,
    dry_run,
    mining_structure_estimate,
    resolve_spec,
    synth_spec,
    train_structure_estimate,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
INDUSTRIAL = ROOT / "configs" / "industrial.yaml"


def _model_tables(d: DryRun) -> list[str]:
    return [t.name for t in d.tables]


def _check_bytes_add_up(d: DryRun) -> None:
    names = _model_tables(d)
    assert len(names) == len(set(names)), "a table appears twice"
    assert sum(r.embedding_bytes for r in d.ranks) == d.total_embedding_bytes
    for t in d.tables:
        assert sum(t.bytes_per_rank.values()) == t.bytes
        assert set(t.bytes_per_rank) == set(t.ranks)
        assert all(0 <= r < d.world_size for r in t.ranks)
        assert t.sharding_type == "table_wise" and len(t.ranks) == 1
    for r in d.ranks:
        assert sorted(r.tables) == sorted(t.name for t in d.tables if r.rank in t.ranks)


def test_synth_spec_is_the_generators_spec():
    from cstwa_dist.data.synth import build_world, dataset_spec

    for scale in (1.0, 0.5):
        assert synth_spec("demo", scale) == dataset_spec(build_world("demo", scale, 0))


def test_resolve_spec(tmp_path: Path):
    spec, source = resolve_spec(None, str(tmp_path / "industrial-like"))
    assert spec.num_users == 30_000_000 and spec.num_items == 280_000
    assert "industrial-like" in source and "does not exist" in source
    spec, _ = resolve_spec(None, str(tmp_path / "aliccp-like-0.01"))
    assert spec == synth_spec("aliccp-like", 0.01)
    assert resolve_spec("synth:demo:0.5", "ignored")[0] == synth_spec("demo", 0.5)
    synth_spec("demo").save(tmp_path / "mine" / "spec.yaml")
    assert resolve_spec(str(tmp_path / "mine"), "ignored")[0] == synth_spec("demo")
    assert resolve_spec(None, str(tmp_path / "mine"))[0] == synth_spec("demo")  # the data set's own spec
    with pytest.raises(SpecError, match="--spec"):
        resolve_spec(None, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown synth preset"):
        resolve_spec("synth:nope", "ignored")


def test_demo_plans_on_two_cpu_ranks():
    d = dry_run(load_config(DEMO), synth_spec("demo"), world_size=2)
    assert d.compute_device == "cpu" and d.embedding_optimizer == "rowwise_adagrad"
    assert len(d.tables) == 2 * 12 + 2  # CTR + CVR field tables, U and I
    _check_bytes_add_up(d)
    for t in d.tables:  # fp32 weights + one fp32 per row (exact row-wise Adagrad)
        assert t.bytes == t.rows * t.dim * 4 + t.rows * 4
    for r in d.ranks:  # the planner's storage covers our weights + state (plus its I/O buffers)
        assert r.plan_ddr >= r.embedding_bytes and r.plan_hbm == 0
        assert r.host_total == r.plan_ddr + r.dense_bytes + r.structure_host
    assert d.structure.phase == "train" and d.mining.phase == "pretrain"


def test_industrial_plans_on_64_cuda_ranks():
    """CUDA topologies plan on a CPU-only machine: the planner only does arithmetic."""
    cfg = load_config(INDUSTRIAL)
    d = dry_run(cfg, synth_spec("industrial-like"), world_size=64, gpus_per_node=8, hbm_gb=80)
    assert d.compute_device == "cuda" and d.local_world_size == 8 and d.embedding_optimizer == "adam"
    _check_bytes_add_up(d)
    by_name = {t.name: t for t in d.tables}
    u = by_name["sm__user"]
    assert (u.rows, u.dim) == (30_000_000, 40)
    assert u.bytes == 3 * 30_000_000 * 40 * 4  # weights + Adam's two moments
    assert all(t.compute_kernel == "fused" for t in d.tables)  # everything fits HBM at 80 GiB
    assert all(r.device_total <= d.hbm_cap for r in d.ranks)
    # the structure step: whole U per rank dominates, and every rank pays it
    assert d.structure.dominant.startswith("β update user")
    assert {r.structure_host for r in d.ranks} == {d.structure.host_rank0}
    assert d.structure.host_rank0 > 25 * 1024**3
    assert d.mining.host_rank0 > d.mining.host_other


def test_structure_formulas_match_a_hand_computation():
    spec = DatasetSpec(
        fields=(
            FieldSpec(name="uid", side="user", vocab_size=10),
            FieldSpec(name="uage", side="user", vocab_size=3),
            FieldSpec(name="iid", side="item", vocab_size=5),
            FieldSpec(name="hour", side="context", vocab_size=4),
        ),
        user_id="uid",
        item_id="iid",
    )
    cfg = with_overrides(load_config(DEMO), ["structure.k=3"])  # D = 8: w_user = 2·8, w_item = 1·8
    d = dry_run(cfg, spec, world_size=2)
    # training: Â_U (10+1)·8 + 10·3·12 = 448, Â_I 6·8 + 5·3·12 = 228, profiles 10·2·8 = 160 and 5·1·8 = 40,
    # β update 5 · (10·16·4 = 640) = 3200 → 4076 on every rank; device 2·640 = 1280
    s = d.structure
    assert (s.host_rank0, s.host_other, s.device) == (4076, 4076, 1280)
    assert s.dominant.startswith("β update user")
    # mining, rank 0, user side: profiles 160 + max(24·160, 12·160 + 12·30, 4·160 + 66·30) = 160 + 3840
    # other ranks: max(160 + 640, 40 + 160) = 800
    m = d.mining
    assert (m.host_rank0, m.host_other, m.device) == (4000, 800, 1280)
    assert m.dominant.startswith("L2 normalisation user")
    assert d.exact_knn_madds == 10**2 * 16
    assert [r.structure_host for r in d.ranks] == [4076, 4076]


def test_structure_estimates_pick_the_graph_build_when_k_is_large():
    side = StructureSide(side="user", entities=1000, fields=1, width=4, k=64)
    m = mining_structure_estimate([side])
    assert m.dominant.startswith("graph build user")
    assert m.host_rank0 == 1000 * 8 + 4 * 1000 * 4 + 66 * 1000 * 64
    t = train_structure_estimate([side])
    assert t.dominant == "graph Â_user" and t.terms["graph Â_user"] == 1001 * 8 + 1000 * 64 * 12
    assert train_structure_estimate([]).phase == "none"


def test_a_model_without_graphs_has_no_structure_step():
    d = dry_run(load_config(DEMO), synth_spec("demo"), model_name="esmm", world_size=2)
    assert d.structure.phase == "none" and d.mining.phase == "none"
    assert all(r.structure_host == 0 for r in d.ranks)
    assert "no structure step" in d.render()


def _run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> int:
    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)  # keep pytest's log capture
    with caplog.at_level(logging.INFO, logger="cstwa_dist"):
        return cli.main(argv)


def test_cli_plan_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch, caplog):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", str(DEMO), "--world-size", "2", "--spec", "synth:demo", "--json", str(out)]
    assert _run_cli(argv, monkeypatch, caplog) == 0
    text = capsys.readouterr().out
    for needle in ("sm__user", "5,000 x 40", "table_wise", "per rank", "dominant term"):
        assert needle in text, needle
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    assert sum(r["embedding_bytes"] for r in report["ranks"]) == report["total_embedding_bytes"]


def test_cli_plan_rejects_a_topology_that_does_not_divide(monkeypatch, caplog):
    argv = ["plan", "--config", str(DEMO), "--world-size", "6", "--gpus-per-node", "4"]
    argv += ["--spec", "synth:demo"]
    assert _run_cli(argv, monkeypatch, caplog) == 2
    assert any("multiple of --gpus-per-node" in r.getMessage() for r in caplog.records)
