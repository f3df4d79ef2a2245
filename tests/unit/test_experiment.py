"""Experiment grid planning, resumable cell ids, report aggregation and sweep plots."""

import json
from pathlib import Path

import pytest

from cstwa_dist.config import RunConfig
from cstwa_dist.experiments.grid import (
    Cell,
    build_report,
    cell_config,
    parse_sweep,
    plan_cells,
    stale_settings,
    write_reports,
)
from cstwa_dist.registry import with_overrides
from cstwa_dist.train.pretrain import mining_settings, structure_mismatch


def test_parse_sweep():
    assert parse_sweep("beta=0.1,0.3") == ("beta", "structure.beta", [0.1, 0.3])
    assert parse_sweep("k=4,8") == ("k", "structure.k", [4, 8])
    assert parse_sweep("loss.gamma=2,3")[1] == "loss.gamma"
    for bad in ("beta", "beta=x", "nosuch=1"):
        with pytest.raises(ValueError):
            parse_sweep(bad)


def test_plan_cells_table2_ablation_sweep():
    cells = plan_cells(["mlp", "cstwa"], [0, 1], ablation=True, sweeps=["gamma=2,4"])
    groups = {c.group for c in cells}
    assert groups == {"table2", "ablation", "sweep:gamma"}
    abl = [c for c in cells if c.group == "ablation"]
    assert [c.label for c in abl[::2]] == ["MLP", "SM", "CP", "CE", "SM+CP", "SM+CE", "CP+CE", "SM+CP+CE"]
    # the full model of the ablation is the Table 2 cstwa cell with explicit switches: different overrides,
    # so different ids; an identical cell planned twice shares one id
    full = next(c for c in abl if c.label == "SM+CP+CE" and c.seed == 0)
    assert "models.cstwa.structure_migrator=true" in full.overrides
    cp_only = next(c for c in abl if c.label == "CP" and c.seed == 0)
    assert cp_only.overrides == (
        "models.cstwa.structure_migrator=false",
        "models.cstwa.click_perceptron=true",
        "models.cstwa.curse_escaper=false",
    )
    # every ablation row's overrides are valid settings of CSTWA, switching what the row names
    for c in abl:
        if c.model == "cstwa":
            own = cell_config(RunConfig(), c, Path("unused")).models["cstwa"]
            on = {"SM": own.structure_migrator, "CP": own.click_perceptron, "CE": own.curse_escaper}
            assert {k for k, v in on.items() if v} == set(c.label.split("+"))
    assert Cell("a", "x", "mlp", 0, ()).cell_id == Cell("b", "y", "mlp", 0, ()).cell_id
    assert Cell("a", "x", "mlp", 0, ()).cell_id != Cell("a", "x", "mlp", 1, ()).cell_id
    with pytest.raises(ValueError, match="registered"):
        plan_cells(["nosuch"], [0], False, [])


def test_report_mean_std_gain_and_plot(tmp_path):
    cells = [Cell("table2", "mlp", "mlp", s, ()) for s in (0, 1)]
    cells += [Cell("table2", "cstwa", "cstwa", s, ("loss.gamma=2",)) for s in (0, 1)]  # --model-set
    cells += [Cell("sweep:beta", str(b), "cstwa", 0, (f"structure.beta={b}",)) for b in (0.1, 0.5)]
    aucs = {("mlp", 0): 0.60, ("mlp", 1): 0.62, ("cstwa", 0): 0.66, ("cstwa", 1): 0.64}
    for c in cells:
        d = tmp_path / "cells" / c.cell_id
        d.mkdir(parents=True, exist_ok=True)
        p = aucs.get((c.model, c.seed), 0.7 if "0.5" in c.label else 0.68)
        d.joinpath("metrics.json").write_text(
            json.dumps(
                {
                    "click_auc": 0.7,
                    "purchase_auc": p,
                    "samples_per_s": 1.0,
                    "world_size": 1,
                    "epochs": 2,
                    "embedding_optimizer": "rowwise_adagrad",
                    "train_rows_per_epoch": 10,
                    "eval_rows": 5,
                    "config": {"data": {"dataset": "d"}},
                }
            )
        )
    report = build_report(cells, tmp_path, ["cstwa:loss.gamma=2"])
    rows = {(r["group"], r["label"]): r for r in report["rows"]}
    mlp, cstwa = rows[("table2", "mlp")], rows[("table2", "cstwa")]
    assert mlp["purchase_mean"] == pytest.approx(0.61) and mlp["purchase_std"] == pytest.approx(
        0.0141421, 1e-4
    )
    assert cstwa["purchase_gain_pct"] == pytest.approx(100 * (0.65 - 0.61) / 0.61)
    write_reports(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Table 2" in md and "0.6500 ± 0.0141" in md and "sweep_beta.png" in md
    assert report["model_settings"] == {"cstwa": ["loss.gamma=2"]}
    assert "every cell of that model, every table): cstwa: `loss.gamma=2`." in md
    assert (tmp_path / "sweep_beta.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["rows"]


def test_variants_are_named_rows_with_their_overrides():
    from cstwa_dist.experiments.grid import parse_variant

    cells = plan_cells(
        None,
        [0, 1],
        False,
        [],
        [
            "SM reading (b)=cstwa:structure.sm_reading=recomputed",
            "wide=esmm:model.ctr_tower=[8, 4];model.cvr_tower=[8, 4]",
        ],
    )
    assert [(c.group, c.label, c.model, c.seed) for c in cells] == [
        ("variants", "SM reading (b)", "cstwa", 0),
        ("variants", "SM reading (b)", "cstwa", 1),
        ("variants", "wide", "esmm", 0),
        ("variants", "wide", "esmm", 1),
    ]
    assert cells[2].overrides == ("model.ctr_tower=[8, 4]", "model.cvr_tower=[8, 4]")
    # the same model and overrides as a Table 2 cell ⇒ the same cell, run once
    assert (
        plan_cells(None, [0], False, [], ["x=cstwa:models.cstwa.curse_escaper=true"])[0].cell_id
        != cells[0].cell_id
    )
    for bad in ("no-model", "x=cstwa", "x=cstwa:", "x=cstwa:beta", "x=nosuch:model.dropout=[0]"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_cells_share_structure_unless_they_change_how_it_is_mined(tmp_path):
    base = RunConfig()

    def gdir(*ov: str, seed: int = 0) -> str:
        return cell_config(base, Cell("v", "x", "cstwa", seed, ov), tmp_path).structure.graph_dir

    plain = gdir()
    assert plain.endswith("structure/k8-seed0") and gdir(seed=1).endswith("k8-seed1")
    # settings that only read the graphs share them
    for ov in (
        "structure.beta=0.5",
        "models.cstwa.click_perceptron=false",
        "structure.sm_reading=recomputed",
    ):
        assert gdir(ov) == plain
    assert gdir("structure.k=4").endswith("k4-seed0")
    # settings that change the mined graphs get their own directory, one per setting
    longer, wider = gdir("structure.pretrain_epochs=3"), gdir("model.embedding_dim=16")
    assert len({plain, longer, wider}) == 3 and longer.startswith(plain + "-")
    assert gdir("structure.pretrain_epochs=3", seed=1).startswith(gdir(seed=1) + "-")


def test_structure_reused_only_for_the_settings_it_was_mined_with(tmp_path, caplog):
    cfg = RunConfig()
    (tmp_path / "structure.json").write_text(json.dumps({"settings": mining_settings(cfg), "graphs": {}}))
    assert structure_mismatch(tmp_path, cfg) is None
    # β only reads the graphs; pre-training epochs change them
    assert structure_mismatch(tmp_path, with_overrides(cfg, ["structure.beta=0.9"])) is None
    why = structure_mismatch(tmp_path, with_overrides(cfg, ["structure.pretrain_epochs=3"]))
    assert why is not None and "structure.pretrain_epochs: 1 → 3" in why and str(tmp_path) in why
    # written before settings were recorded: reused, with a warning naming the directory
    (tmp_path / "structure.json").write_text(json.dumps({"graphs": {}}))
    assert structure_mismatch(tmp_path, with_overrides(cfg, ["structure.pretrain_epochs=3"])) is None
    assert "records no mining settings" in caplog.text


def test_finished_cell_with_another_config_is_reported_stale(tmp_path):
    cfg = cell_config(RunConfig(), Cell("table2", "esmm", "esmm", 0, ()), tmp_path)
    run = tmp_path / "cell"
    run.mkdir()
    recorded = cfg.to_dict()
    (run / "metrics.json").write_text(json.dumps({"config": recorded}))
    assert stale_settings(run, cfg) == []
    # paths, logging and checkpoint cadence do not change results
    assert stale_settings(run, with_overrides(cfg, ["train.log_every=7", "train.run_dir=elsewhere"])) == []
    assert stale_settings(run, with_overrides(cfg, ["train.epochs=5"])) == ["train.epochs: 3 → 5"]
    # a key the cell did not record (older version) counts as its default
    del recorded["model"]["shared_tables"]
    (run / "metrics.json").write_text(json.dumps({"config": recorded}))
    assert stale_settings(run, cfg) == []
    assert stale_settings(run, with_overrides(cfg, ["model.shared_tables=true"])) == [
        "model.shared_tables: False → True"
    ]


def test_stale_settings_compare_the_cells_own_model_settings(tmp_path):
    cfg = cell_config(RunConfig(), Cell("table2", "ple", "ple", 0, ()), tmp_path)
    run = tmp_path / "cell"
    run.mkdir()
    recorded = json.loads(json.dumps(cfg.to_dict()))
    (run / "metrics.json").write_text(json.dumps({"config": recorded}))
    assert stale_settings(run, cfg, "ple") == []
    assert stale_settings(run, with_overrides(cfg, ["models.ple.levels=3"]), "ple") == [
        "models.ple.levels: 2 → 3"
    ]
    # another model's own settings cannot change this cell's results
    assert stale_settings(run, with_overrides(cfg, ["models.cstwa.curse_escaper=false"]), "ple") == []
    # a record from before the models section: its flat `model.ple_levels` is read as models.ple.levels
    del recorded["models"]
    recorded["model"]["ple_levels"] = 3
    (run / "metrics.json").write_text(json.dumps({"config": recorded}))
    assert stale_settings(run, with_overrides(cfg, ["models.ple.levels=3"]), "ple") == []
    assert stale_settings(run, cfg, "ple") == ["models.ple.levels: 3 → 2"]


def test_model_set_reaches_every_cell_of_its_model_and_no_other():
    plain = plan_cells(["esmm", "cstwa"], [0], ablation=True, sweeps=["gamma=4"])
    cells = plan_cells(
        ["esmm", "cstwa"],
        [0],
        ablation=True,
        sweeps=["gamma=4"],
        variants=["paper γ=cstwa:loss.gamma=3"],
        model_sets=["cstwa:loss.gamma=2;structure.beta=0.5"],
    )
    assert len(cells) == len(plain) + 1
    by = {(c.group, c.label): c for c in cells}
    # other models keep their cells (same ids: finished ones are reused)
    assert by[("table2", "esmm")] == next(c for c in plain if c.label == "esmm")
    assert by[("ablation", "MLP")].overrides == ()
    assert by[("table2", "cstwa")].overrides == ("loss.gamma=2", "structure.beta=0.5")
    assert by[("ablation", "CP")].overrides[:2] == ("loss.gamma=2", "structure.beta=0.5")
    # a key the cell sets itself wins
    assert by[("sweep:gamma", "4")].overrides == ("structure.beta=0.5", "loss.gamma=4")
    assert by[("variants", "paper γ")].overrides == ("structure.beta=0.5", "loss.gamma=3")
    for bad in ("cstwa", "cstwa:", "cstwa:gamma=2", "nosuch:loss.gamma=2"):
        with pytest.raises(ValueError):
            plan_cells(["cstwa"], [0], False, [], model_sets=[bad])
    # a model's own settings are set for that model only
    own = plan_cells(["ple"], [0], False, [], model_sets=["ple:models.ple.levels=3"])
    assert own[0].overrides == ("models.ple.levels=3",)
    with pytest.raises(ValueError, match="sets ple's own settings, not cstwa's"):
        plan_cells(["cstwa"], [0], False, [], model_sets=["cstwa:models.ple.levels=3"])
