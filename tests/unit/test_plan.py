"""The sharding dry run: plans without a process group or data, bytes that add up, structure formulas.

Fast (a few seconds: the 30M-user model is built on ``meta``); nothing here allocates a table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cstwa_dist import cli
from cstwa_dist.config import StructureConfig
from cstwa_dist.data import synth
from cstwa_dist.data.spec import DatasetSpec, FieldSpec, SpecError
from cstwa_dist.distributed.ranking import evaluation_bytes_per_rank
from cstwa_dist.planner import dry_run as dry_run_from_package
from cstwa_dist.planner import resolve_spec as resolve_spec_from_package
from cstwa_dist.planner.dryrun import DryRun, dry_run
from cstwa_dist.planner.render import GIB, render_no_plan
from cstwa_dist.planner.specs import resolve_spec, synth_spec
from cstwa_dist.planner.verdict import NoPlan, Verdict, judge, smallest_fitting_world_size
from cstwa_dist.registry import PRETRAIN_MODEL, load_config, with_overrides
from cstwa_dist.structure.estimate import (
    StructureSide,
    knn_madds_per_rank,
    mining_structure_estimate,
    train_structure_estimate,
)
from cstwa_dist.structure.faiss_memory import FAISS_GPU_TEMP_BYTES
from cstwa_dist.structure.ivf import auto_nlist, knn_memory, resolve_cells, ring_madds
from cstwa_dist.structure.memory import total_bytes
from cstwa_dist.structure.migrator import ivf_params
from cstwa_dist.structure.readout import readout_memory
from cstwa_dist.structure.sharded_graph import migrate_memory, propagator_memory, shard_build_memory

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
INDUSTRIAL = ROOT / "configs" / "industrial.yaml"
STRUCTURE_TABLES = {"sm__user", "sm__item"}


def _model_tables(d: DryRun) -> list[str]:
    return [t.name for t in d.tables]


def _check_bytes_add_up(d: DryRun, row_wise: set[str] = STRUCTURE_TABLES) -> None:
    names = _model_tables(d)
    assert len(names) == len(set(names)), "a table appears twice"
    assert row_wise <= set(names)
    assert sum(r.embedding_bytes for r in d.ranks) == d.total_embedding_bytes
    for t in d.tables:
        assert sum(t.bytes_per_rank.values()) == t.bytes
        assert set(t.bytes_per_rank) == set(t.ranks)
        assert all(0 <= r < d.world_size for r in t.ranks)
        if t.name in row_wise:  # U/I: one row block on every rank, on the FUSED kernel
            assert t.sharding_type == "row_wise" and t.compute_kernel == "fused"
            assert t.ranks == list(range(d.world_size))
            per_row = t.bytes // t.rows  # weights + optimizer state of one row
            assert max(t.bytes_per_rank.values()) == math.ceil(t.rows / d.world_size) * per_row
        else:
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


def test_the_plan_builds_the_model_with_its_own_settings():
    """``models.cstwa.structure_migrator=false`` must reach the planned model: no U/I tables and no
    structure step (a planner that built with the settings' defaults would plan both)."""
    spec = synth_spec("demo")
    on = dry_run(load_config(DEMO), spec, world_size=2)
    off = dry_run(load_config(DEMO, ["models.cstwa.structure_migrator=false"]), spec, world_size=2)
    assert on.structure.phase != "none" and off.structure.phase == "none"
    from cstwa_dist.models.cstwa import SM_ITEM_TABLE, SM_USER_TABLE

    assert {SM_USER_TABLE, SM_ITEM_TABLE} <= {t.name for t in on.tables}
    assert not {SM_USER_TABLE, SM_ITEM_TABLE} & {t.name for t in off.tables}


def test_demo_plans_on_two_cpu_ranks():
    spec = synth_spec("demo")
    d = dry_run(load_config(DEMO), spec, world_size=2)
    assert d.compute_device == "cpu" and d.embedding_optimizer == "rowwise_adagrad"
    # CTR: every field; CVR: the context fields (SM stands in for the sides); the CVR side tables of the
    # non-id side fields (Eq. 8's initialisation); U and I
    side_fields = len(spec.user_fields) - 1 + len(spec.item_fields) - 1
    assert len(d.tables) == len(spec.names) + len(spec.context_fields) + side_fields + 2
    _check_bytes_add_up(d)
    for t in d.tables:  # fp32 weights + one fp32 per row (exact row-wise Adagrad)
        assert t.bytes == t.rows * t.dim * 4 + t.rows * 4
    for r in d.ranks:  # the planner's storage covers our weights + state (plus its I/O buffers)
        assert r.plan_ddr >= r.embedding_bytes and r.plan_hbm == 0
        assert r.host_total == r.plan_ddr + r.dense_bytes + r.structure_host + r.evaluation_bytes
        assert set(r.tables) >= STRUCTURE_TABLES
    assert d.structure.phase == "train" and d.mining.phase == "pretrain"
    assert d.structure.device == 0 and all(t.where == "host" for t in d.structure.terms)  # CPU ranks


def test_industrial_plans_on_64_cuda_ranks():
    """CUDA topologies plan on a CPU-only machine: the planner only does arithmetic."""
    cfg = load_config(INDUSTRIAL)
    d = dry_run(cfg, synth_spec("industrial-like"), world_size=64, gpus_per_node=8, hbm_gb=80)
    # optim.embedding=auto is row-wise Adagrad on GPUs too: the model every CPU measurement trained
    assert (
        d.compute_device == "cuda" and d.local_world_size == 8 and d.embedding_optimizer == "rowwise_adagrad"
    )
    _check_bytes_add_up(d)
    by_name = {t.name: t for t in d.tables}
    u = by_name["sm__user"]
    assert (u.rows, u.dim) == (30_000_000, 40)  # 5 user fields x D = 8
    assert u.bytes == 30_000_000 * (40 * 4 + 4)  # weights + row-wise Adagrad's fp32 per row
    assert set(u.bytes_per_rank.values()) == {468_750 * (40 * 4 + 4)}  # 30M / 64 rows on every rank
    assert all(t.compute_kernel == "fused" for t in d.tables)  # everything fits HBM at 80 GiB
    assert all(r.device_total <= d.hbm_cap for r in d.ranks)
    # training, per rank: n_r = 468,750 users (w = 40), 4,375 items (w = 32), k = 8,
    # f_r = n_r·k = 3,750,000 and 35,000 foreign rows
    s = d.structure
    resident = (3_750_000 * 12 + 468_751 * 8 + 16 * 3_750_000) + (35_000 * 12 + 4_376 * 8 + 16 * 35_000)
    # L = 1: fetched + served foreign rows, the window's own rows and one layer output (propagating
    # outweighs mixing's four own-row blocks)
    boundary = 2 * 3_750_000 * 40 * 4 + 2 * 468_750 * 40 * 4
    assert s.device == resident + boundary
    assert s.host_rank0 == s.host_other == 468_750 * 6 * 8 + 468_750 * 40 * 4
    assert s.dominant.startswith("device: fetched foreign rows user")
    assert {r.structure_device for r in d.ranks} == {s.device} and s.device < 1.5 * 1024**3
    assert {r.structure_host for r in d.ranks} == {s.host_rank0}
    # mining: rank 0 also holds the quantizer's sample, nlist = round(4·√30M) = 21,909 cells x 39 rows,
    # gathered: every rank's part and their concatenation, plus its own part and its padded copy
    m = d.mining
    assert auto_nlist(30_000_000) == 21_909
    sample = 21_909 * 39
    own = math.ceil(sample * 468_750 / 30_000_000)
    assert m.host_rank0 - m.host_other == (2 * sample + 2 * own) * 40 * 4
    assert m.host_other < 1024**3
    assert d.knn_madds_per_rank < d.exact_knn_madds_per_rank == 30_000_000 * 468_750 * 40


def test_structure_bytes_per_rank_shrink_as_one_over_w():
    cfg = load_config(INDUSTRIAL)
    spec = synth_spec("industrial-like")
    plans = {w: dry_run(cfg, spec, world_size=w, gpus_per_node=8, hbm_gb=80) for w in (8, 64)}
    small, large = plans[8].structure, plans[64].structure
    assert large.host_rank0 * 8 == pytest.approx(small.host_rank0, rel=1e-4)  # SM init: n_r·(...) only
    # the device peak shrinks a little less than 8x: at W = 8 the foreign rows hit their N − n_r bound
    assert small.device / 8 < large.device < small.device / 6
    # mining too, a little less than 8x: the query-block terms do not shrink (b is fixed), and f_r
    # hits its bound at W = 8 as above
    mine_small, mine_large = plans[8].mining.host_other, plans[64].mining.host_other
    assert mine_small / 8 < mine_large < mine_small / 6
    # in the n_r·k < N − n_r regime every training term is linear in n_r = ceil(N/W)
    side = StructureSide(side="user", entities=30_000_000, fields=5, width=40, k=8)
    at = {w: train_structure_estimate([side], w).device for w in (64, 128, 256)}
    assert at[128] * 2 == pytest.approx(at[64], rel=1e-5) and at[256] * 4 == pytest.approx(at[64], rel=1e-5)


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
    d = dry_run(cfg, spec, world_size=2)  # CPU ranks: everything on the host
    # training, user: n_r = 5, f_r = min(5·3, 10 − 5) = 5; item: n_r = 3, f_r = min(9, 2) = 2
    #   resident: CSR 5·3·12 + 6·8 = 228 and 3·3·12 + 4·8 = 140, fetch ids 16·5 = 80 and 16·2 = 32 → 480
    #   boundary (L = 1), user: propagating = fetched + served 2·5·16·4 + window + one layer output
    #   2·5·16·4 = 1280, mixing = 4·5·16·4 = 1280; item: 320 and 384 → 1280
    #   init: user 5·3·8 + 5·16·4 = 440 < 1280
    s = d.structure
    assert (s.host_rank0, s.host_other, s.device) == (1760, 1760, 0)
    assert s.dominant.startswith("host: fetched foreign rows user")
    # mining, user (the larger side): nlist = 1, nprobe = 1, b = 5; profiles 5·3·8 = 120, reps 320;
    #   kNN: normalised copy 5·16·4 = 320, index 5·(64 + 8) + 1·16·4 = 424, query block
    #   5·(64 + 12) = 380, result blocks 2·5·3·12 = 360, own top-k 5·3·12 + 5·3·52 = 960;
    #   Â's rows: triplets 5·3·20 = 300, normalisation 5·3·41 = 615, degrees 16·5 + 32·5 = 240 → 4039;
    #   rank 0: sample s = min(39, 10) = 10 rows, (2·10 + 2·5)·16·4 = 1920
    m = d.mining
    assert (m.host_rank0, m.host_other, m.device) == (5959, 4039, 0)
    assert m.dominant.startswith("host: IVF training sample user")
    # kNN work per rank: N·n_r·w·nprobe/nlist + n_r·nlist·w = 800 + 80; exact through the ring 800
    assert (d.knn_madds_per_rank, d.exact_knn_madds_per_rank) == (880, 800)
    assert [r.structure_host for r in d.ranks] == [1760, 1760]
    # the same job on GPU ranks: resident + boundary on the device, the SM initialisation on the host
    side_u = StructureSide(side="user", entities=10, fields=2, width=16, k=3)
    side_i = StructureSide(side="item", entities=5, fields=1, width=8, k=3)
    g = train_structure_estimate([side_u, side_i], 2, on_device=True)
    assert (g.device, g.host_rank0) == (480 + 1280, 440)
    # on one rank nothing is fetched: mixing's four own-row blocks set the boundary, 4·10·16·4
    one = train_structure_estimate([side_u], 1, on_device=True)
    assert one.device == (10 * 3 * 12 + 11 * 8) + 4 * 10 * 16 * 4


def test_mining_estimate_follows_the_knn_settings():
    side = StructureSide(side="user", entities=1_000_000, fields=5, width=40, k=8)
    flat = mining_structure_estimate([side], 4, StructureConfig())
    pq = mining_structure_estimate([side], 4, StructureConfig(pq_m=8))
    exact = mining_structure_estimate([side], 4, StructureConfig(knn="exact"))
    n_r, nlist = 250_000, auto_nlist(1_000_000)
    index = {t.name: t.bytes for t in flat.terms}["IVF-flat index user (+ centroids)"]
    assert index == n_r * (40 * 4 + 8) + nlist * 40 * 4
    assert {t.name: t.bytes for t in pq.terms}["IVF-PQ index user (+ centroids)"] == n_r * (
        8 + 8
    ) + nlist * 40 * 4
    assert flat.host_other - pq.host_other == n_r * (40 * 4 - 8)
    # exact: no index, no quantizer sample (rank 0 = the others), a query block without coarse lists
    assert exact.host_rank0 == exact.host_other
    assert flat.host_other - exact.host_other == index + 65_536 * 16 * 12
    sample = nlist * 39
    assert flat.host_rank0 - flat.host_other == (2 * sample + 2 * sample * n_r // 1_000_000) * 40 * 4
    cfg = StructureConfig(nlist=100, nprobe=4)
    assert knn_madds_per_rank(side, 4, cfg) == (
        1_000_000 * n_r * 40 * 4 // 100 + n_r * 100 * 40,
        10**6 * n_r * 40,
    )
    assert (
        train_structure_estimate([], 4).phase == "none" and mining_structure_estimate([], 4).phase == "none"
    )


def _steps_sum(cfg, spec: DatasetSpec, world_size: int, on_device: bool) -> dict[str, int]:
    """The structure figures straight from the steps' own memory functions, sized from the spec and
    the config (not from the dry run's sides): what the dry run must report."""
    k, dim, layers = cfg.structure.k, cfg.model.embedding_dim, cfg.structure.layers
    resident = boundary = init = mine0 = mine = 0
    largest = (0, 0, 0, 0)
    for side in ("user", "item"):
        n = spec.num_users if side == "user" else spec.num_items
        m = len(spec.side_fields(side))
        w = m * dim  # U/I rows and the read-out are the side's fields x D for cstwa
        n_r = math.ceil(n / world_size)
        f_r = min(n_r * k, n - n_r)
        resident += total_bytes(propagator_memory(n_r, k, f_r))
        boundary = max(boundary, total_bytes(migrate_memory(n_r, f_r, w, layers)))
        init = max(init, total_bytes(readout_memory(n_r, m, w)))
        knn = knn_memory(ivf_params(cfg.structure), n, n_r, w, min(k, n), rank0=True)
        rest = [*readout_memory(n_r, m, w), *shard_build_memory(n_r, min(k, n), f_r)]
        mine0 = max(mine0, total_bytes([*knn, *rest]))
        mine = max(mine, total_bytes([*knn, *rest], rank0=False))
        largest = max(largest, (n, n_r, w, side == "user"))
    n, n_r, w, _ = largest
    nlist, nprobe = resolve_cells(ivf_params(cfg.structure), n)
    out = {"mining_rank0": mine0, "mining_other": mine}
    out["madds"] = ring_madds(n, n_r, w, nlist=nlist, nprobe=nprobe)
    out["exact_madds"] = ring_madds(n, n_r, w, nlist=0, nprobe=0)
    if on_device:
        out |= {"device": resident + boundary, "host": init}
    else:
        out |= {"device": 0, "host": resident + max(boundary, init)}
    return out


@pytest.mark.parametrize(
    ("preset", "world_size", "gpus", "overrides"),
    [
        ("demo", 2, 0, []),  # IVF-flat, CPU ranks
        ("demo", 3, 0, ["structure.knn=exact", "structure.layers=2", "structure.k=5"]),
        ("aliccp-like:0.01", 8, 4, ["structure.pq_m=8", "structure.nlist=64", "structure.nprobe=4"]),
    ],
)
def test_structure_figures_are_the_sums_of_the_steps_own_functions(preset, world_size, gpus, overrides):
    """One source per formula: the dry run's structure figures are the steps' functions added up
    (readout, ivf, sharded_graph, propagate), nothing the planner derives on its own."""
    cfg = with_overrides(load_config(DEMO), overrides)
    name, _, scale = preset.partition(":")
    spec = synth_spec(name, float(scale or 1))
    d = dry_run(cfg, spec, world_size=world_size, gpus_per_node=gpus)
    want = _steps_sum(cfg, spec, world_size, on_device=gpus > 0)
    s, m = d.structure, d.mining
    assert (s.device, s.host_rank0, s.host_other) == (want["device"], want["host"], want["host"])
    assert (m.host_rank0, m.host_other) == (want["mining_rank0"], want["mining_other"])
    assert (d.knn_madds_per_rank, d.exact_knn_madds_per_rank) == (want["madds"], want["exact_madds"])
    # and the reported terms are those items: they add up to the peaks they are listed under
    assert sum(t.bytes for t in m.terms) == m.host_rank0
    assert sum(t.bytes for t in s.terms if t.where == "host") == s.host_rank0
    assert sum(t.bytes for t in s.terms if t.where == "device") == s.device


def test_the_package_names_the_entry_points():
    """The CLI imports ``dry_run`` and ``resolve_spec`` from the package; ``planner.dryrun`` still
    names both (``resolve_spec`` lives in ``specs``)."""
    import cstwa_dist.planner.dryrun as dryrun_module

    assert dry_run_from_package is dry_run and resolve_spec_from_package is resolve_spec
    assert dryrun_module.resolve_spec is resolve_spec


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
    for needle in (
        "sm__user",
        "5,000 x 40",
        "table_wise",
        "row_wise",
        "per rank",
        "n_r=2,500",
        "dominant term",
    ):
        assert needle in text, needle
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    assert sum(r["embedding_bytes"] for r in report["ranks"]) == report["total_embedding_bytes"]


def test_cli_plan_rejects_a_topology_that_does_not_divide(monkeypatch, caplog):
    argv = ["plan", "--config", str(DEMO), "--world-size", "6", "--gpus-per-node", "4"]
    argv += ["--spec", "synth:demo"]
    assert _run_cli(argv, monkeypatch, caplog) == 2
    assert any("multiple of --gpus-per-node" in r.getMessage() for r in caplog.records)
    argv = ["plan", "--config", str(DEMO), "--world-size", "2", "--hbm-gb", "0.5", "--spec", "synth:demo"]
    assert _run_cli(argv, monkeypatch, caplog) == 2  # CPU ranks: the HBM cap would be ignored
    assert any("--hbm-gb 0.5 applies to GPU ranks" in r.getMessage() for r in caplog.records)


def test_recomputed_reading_plans_no_optimizer_state_for_p():
    """Reading (b)'s P is never trained: its rows cost their weights only (stateless SGD)."""
    spec = synth_spec("demo")
    cfg = load_config(DEMO)
    free = {t.name: t for t in dry_run(cfg, spec, world_size=2).tables}
    recomputed = dry_run(with_overrides(cfg, ["structure.sm_reading=recomputed"]), spec, world_size=2)
    _check_bytes_add_up(recomputed)
    by_name = {t.name: t for t in recomputed.tables}
    for name in STRUCTURE_TABLES:
        t = by_name[name]
        assert t.bytes == t.rows * t.dim * 4  # fp32 weights, nothing else
        assert free[name].bytes == t.bytes + t.rows * 4  # reading (a): row-wise Adagrad's fp32 per row


def test_smallest_fitting_world_size_doubles_then_bisects():
    tried: list[int] = []

    def from_37(w: int) -> bool:
        tried.append(w)
        return w >= 37

    assert smallest_fitting_world_size(from_37, 1, 1, limit=4096) == 37
    assert len(tried) <= 2 * math.ceil(math.log2(64)) and max(tried) == 64  # doubling stopped at 64
    assert smallest_fitting_world_size(lambda w: w >= 100, 8, 8) == 104  # multiples of the GPUs per node
    assert smallest_fitting_world_size(lambda w: False, 8, 8, limit=100) is None
    assert smallest_fitting_world_size(lambda w: w >= 96, 8, 8, limit=100) == 96  # the bound, aligned


#: fused Adam on the tables (GPU only): three times row-wise Adagrad's bytes, so that the demo's tables
#: press on a few MiB of HBM
ADAM = ["optim.embedding=adam", "optim.embedding_adam_lr=0.001"]


def _verdict_at(
    world_size: int, limit: int = 64, overrides: Sequence[str] = (), **topology: Any
) -> tuple[DryRun | NoPlan, Verdict]:
    cfg, spec = load_config(DEMO, list(overrides)), synth_spec("demo")
    try:
        result: DryRun | NoPlan = dry_run(cfg, spec, world_size=world_size, **topology)
    except NoPlan as e:
        result = e
    return result, judge(result, lambda w: dry_run(cfg, spec, world_size=w, **topology), limit=limit)


def test_verdict_fits_within_the_caps():
    _, v = _verdict_at(2)
    assert v.fits and v.smallest_world_size is None and not v.over_host
    assert v.line.startswith("verdict: fits 2 CPU ranks; every rank within its caps")


def test_verdict_names_the_ranks_and_tables_over_the_cap_and_the_world_size_that_fits():
    """1 CPU rank with 5 MiB, planned without the steps' reserves: the planner places every table, but
    the rank's total (tables, dense state and the structure step) is over the cap; 2 ranks fit."""
    result, v = _verdict_at(1, ddr_gb=0.005, reserve_steps=False)
    assert isinstance(result, DryRun) and not v.fits
    assert v.over_host == [0] and v.tables[0] == "sm__user" and v.smallest_world_size == 2
    assert v.line.startswith(
        "verdict: does NOT fit 1 CPU rank: 1 of 1 rank over the host cap (largest: rank 0"
    )
    assert "largest tables on those ranks: sm__user" in v.line
    assert v.line.endswith("smallest world size that fits: 2 CPU ranks")


def test_verdict_explains_a_plan_torchrec_refused():
    """No plan at all (TorchRec's PlannerError): the verdict says which table no rank can hold; a
    table-wise one fits at no world size, so nothing is searched."""
    result, v = _verdict_at(2, ddr_gb=0.0001)
    assert isinstance(result, NoPlan) and "\n" not in str(result)
    assert not v.fits and "ctr__user_id" in v.tables and v.searched_up_to == 0
    assert "TorchRec finds no plan (insufficient storage): sm__user (row_wise" in v.line
    assert v.line.endswith("no world size fits: ctr__user_id is table-wise (one rank holds all 175.8 KiB)")
    # GPUs with a small HBM: the row-wise tables and the reserves spread over more ranks, and 2 nodes
    # of 2 fit
    result, v = _verdict_at(2, overrides=ADAM, gpus_per_node=2, hbm_gb=0.008)
    assert isinstance(result, NoPlan) and not v.fits
    assert v.line.endswith("smallest world size that fits: 4 ranks (2 nodes x 2 GPUs)")
    _, v = _verdict_at(2, limit=16, overrides=ADAM, gpus_per_node=2, hbm_gb=0.004)
    assert v.line.endswith("no world size up to 16 fits (raise the caps or shrink the tables)")
    _, v = _verdict_at(2, limit=2, overrides=ADAM, gpus_per_node=2, hbm_gb=0.008)
    assert v.line.endswith("larger world sizes not searched (--search-up-to is not above 2)")


def test_cli_plan_ends_with_the_verdict_and_fails_when_nothing_fits(tmp_path, capsys, monkeypatch, caplog):
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        "--config",
        str(DEMO),
        "--world-size",
        "2",
        "--spec",
        "synth:demo",
        "--gpus-per-node",
        "2",
    ]
    argv += [a for o in ADAM for a in ("--set", o)]
    argv += ["--hbm-gb", "0.008", "--search-up-to", "16", "--json", str(out)]
    assert _run_cli(argv, monkeypatch, caplog) == 1
    text = capsys.readouterr().out
    assert "sharding dry run: no plan (insufficient storage)" in text and "Traceback" not in text
    last = text.splitlines()[-1]
    assert last.startswith("verdict: does NOT fit 2 ranks (1 node x 2 GPUs): TorchRec finds no plan")
    assert not any(r.levelname == "ERROR" and r.name.startswith("cstwa_dist") for r in caplog.records)
    report = json.loads(out.read_text())
    assert report["verdict"]["fits"] is False and report["verdict"]["smallest_world_size"] == 4
    argv = ["plan", "--config", str(DEMO), "--world-size", "2", "--spec", "synth:demo"]
    assert _run_cli(argv, monkeypatch, caplog) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verdict: fits 2 CPU ranks")


# --- reserves: what the job's steps need beside the tables, kept from the planner ----------------------
def test_the_reserves_are_the_steps_own_figures_and_shrink_the_planners_capacity():
    """One home per formula: each reserve equals the step's own function (SM window, graph mining with
    Faiss on the GPU, evaluation), and the capacity the planner offers the tables is smaller by exactly
    the reserves' sum."""
    spec = synth_spec("demo")
    rows = synth.PRESETS["demo"].sizes(1.0)
    eval_rows = max(rows["val"], rows["test"])  # validate_every_epoch + eval_split=test
    cfg = load_config(DEMO)
    for world_size, gpus in ((2, 0), (4, 2)):
        cuda = gpus > 0
        d = dry_run(cfg, spec, world_size=world_size, gpus_per_node=gpus)
        want = _steps_sum(cfg, spec, world_size, on_device=cuda)
        by_name = {r.name: r for r in d.reserves}
        assert set(by_name) == {"structure migrator (epoch window)", "evaluation"}
        sm, ev = by_name["structure migrator (epoch window)"], by_name["evaluation"]
        assert (sm.hbm, sm.ddr, sm.ddr_rank0) == (want["device"], want["host"], want["host"])
        assert ev.hbm == 0 and ev.ddr == ev.ddr_rank0 == evaluation_bytes_per_rank(eval_rows, world_size)
        bare = dry_run(cfg, spec, world_size=world_size, gpus_per_node=gpus, reserve_steps=False)
        assert bare.reserves == []
        for with_r, without in zip(d.ranks, bare.ranks, strict=True):
            taken = sum(r.hbm if cuda else r.host(with_r.rank) for r in d.reserves)
            assert without.table_capacity - with_r.table_capacity == taken
    # the job that mines (pre-training) on GPU ranks: Faiss's lists and temporary memory on the device
    d = dry_run(cfg, spec, model_name=PRETRAIN_MODEL, world_size=4, gpus_per_node=2)
    mine = {r.name: r for r in d.reserves}["graph mining (Faiss index + temp)"]
    want = _steps_sum(cfg, spec, 4, on_device=True)
    assert (mine.ddr_rank0, mine.ddr) == (want["mining_rank0"], want["mining_other"])
    device = 0
    for n, m in ((spec.num_users, len(spec.user_fields)), (spec.num_items, len(spec.item_fields))):
        w, n_r = m * cfg.model.embedding_dim, math.ceil(n / 4)
        knn = {
            i.key: i.bytes for i in knn_memory(ivf_params(cfg.structure), n, n_r, w, min(cfg.structure.k, n))
        }
        device = max(device, knn["index"] + FAISS_GPU_TEMP_BYTES)
    assert mine.hbm == device


def test_tables_that_fit_only_without_the_reserves_get_a_refusal_naming_them():
    spec = synth_spec("demo")
    # GPU ranks: fused Adam's tables fit 2 GPUs of 8 MB, but not beside the SM window and evaluation
    cfg = load_config(DEMO, ADAM)
    topo = {"world_size": 2, "gpus_per_node": 2, "hbm_gb": 0.008}
    assert dry_run(cfg, spec, reserve_steps=False, **topo).ranks  # a plan, without the reserves
    with pytest.raises(NoPlan) as caught:
        dry_run(cfg, spec, **topo)
    e = caught.value
    assert "\n" not in str(
        e
    ) and "reserved per rank beside the tables (HBM): structure migrator (epoch window)" in str(e)
    assert "reserve: structure migrator (epoch window): device" in render_no_plan(e)
    # one CPU rank whose host memory holds the tables with half the reserves to spare
    cfg = load_config(DEMO)
    big = dry_run(cfg, spec, world_size=1, ddr_gb=1.0, reserve_steps=False)
    overhead = big.ddr_cap - big.ranks[0].table_capacity  # dense state and input buffers
    reserved = sum(r.host(0) for r in dry_run(cfg, spec, world_size=1, ddr_gb=1.0).reserves)
    cap = big.ranks[0].plan_ddr + overhead + reserved // 2
    assert dry_run(cfg, spec, world_size=1, ddr_gb=cap / GIB, reserve_steps=False).ranks
    with pytest.raises(NoPlan, match=r"reserved per rank beside the tables \(host\): structure migrator"):
        dry_run(cfg, spec, world_size=1, ddr_gb=cap / GIB)


def test_cli_plan_prints_a_line_per_reserve(capsys, monkeypatch, caplog):
    argv = ["plan", "--config", str(DEMO), "--world-size", "2", "--spec", "synth:demo"]
    assert _run_cli(argv, monkeypatch, caplog) == 0
    lines = capsys.readouterr().out.splitlines()
    reserve = [line for line in lines if line.startswith("  reserve: ")]
    assert len(reserve) == 2 and "reserves kept from the planner on every rank (2):" in lines
    assert reserve[0].startswith("  reserve: structure migrator (epoch window): host ")
    assert reserve[1].startswith("  reserve: evaluation: host ")
    assert "[distributed.ranking.evaluation_bytes_per_rank]" in reserve[1]
    assert lines[2].startswith(
        "embedding optimizer: fused rowwise_adagrad (FBGEMM EXACT_ROWWISE_ADAGRAD, lr 0.1, eps 1e-08; "
    )


@pytest.mark.parametrize("name", ["cstwa", PRETRAIN_MODEL, "esmm"])
def test_training_plans_with_the_dry_runs_reserves(name):
    """``job_reserves`` (what ``shard_model(reserves=...)`` takes in training) is the dry run's list."""
    import torch

    from cstwa_dist.planner.specs import split_rows
    from cstwa_dist.registry import get_model_spec
    from cstwa_dist.train.reserves import job_reserves

    cfg, spec = load_config(DEMO), synth_spec("demo")
    m = get_model_spec(name)
    model = m.build(
        spec, cfg.model, torch.device("meta"), structure=cfg.structure, settings=m.settings_in(cfg)
    )
    for world_size, gpus in ((2, 0), (4, 2)):
        device = "cuda" if gpus else "cpu"
        want = dry_run(cfg, spec, model_name=name, world_size=world_size, gpus_per_node=gpus).reserves
        rows = split_rows(spec, cfg.data.dataset)  # the preset's sizes: the data set need not exist
        got = job_reserves(
            cfg, name, spec, model, world_size=world_size, compute_device=device, rows_per_split=rows
        )
        assert got == want
        assert want[-1].name == "evaluation"
