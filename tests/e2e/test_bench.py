"""``cstwa-dist bench train`` as a user runs it: 1 process, then 2 ranks compared with it; ``bench score``
on the tiny exported model."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import BIN, _config, _run

STAGES = {"data_wait", "host_to_device", "input_distribution", "forward", "backward", "optimizer"}


def _bench(cfg: Path, out: Path, ranks: int, *extra: str) -> dict:
    _run(
        [
            str(BIN / "cstwa-dist"),
            "bench",
            "train",
            "--config",
            str(cfg),
            "--model",
            "cstwa",
            "--ranks",
            str(ranks),
            "--threads",
            "2",
            "--compute-batches",
            "2",
            "--compute-steps",
            "3",
            "--profile-steps",
            "3",
            "--out",
            str(out),
            *extra,
        ]  # fmt: skip
    )
    return json.loads(out.read_text())


def test_bench_train_one_process_then_two_ranks(tmp_path, tiny_dataset):
    cfg = _config(
        tmp_path,
        tiny_dataset,
        models={"cstwa": {"info_layer": [8], "structure_migrator": False}},
        data={"batch_size": 512},
    )
    one = _bench(cfg, tmp_path / "r1.json", 1)
    assert one["ranks"]["world_size"] == 1 and one["compute_only"]["world_size"] == 1
    assert one["ranks"]["end_to_end"]["samples_per_s"] > 0
    assert one["compute_only"]["samples_per_s"] > 0
    assert set(one["ranks"]["stages_s_per_step"]) == STAGES
    assert one["ranks"]["profiled_steps"] == 3
    assert one["verdict"]["end_to_end_over_compute_bound"] > 0

    two = _bench(cfg, tmp_path / "r2.json", 2, "--baseline", str(tmp_path / "r1.json"))
    assert two["ranks"]["world_size"] == 2
    assert len(two["ranks"]["input_only"]["rows_per_s_per_rank"]) == 2
    v = two["verdict"]
    assert "ranks_over_one_process" in v
    # either as fast as one process, or the stage that grew most is named
    assert v["at_least_as_fast_as_one_process"] or v["stage_to_blame"] in STAGES


def test_bench_score_reports_both_rates_and_a_verdict(tmp_path, tiny_dataset, model_dir):
    out = tmp_path / "score.json"
    _run(
        [str(BIN / "cstwa-dist"), "bench", "score", "--model", str(model_dir), "--input", str(tiny_dataset),
         "--actors", "1", "--batch-size", "512", "--repeats", "1", "--score-repeats", "1", "--out", str(out)]
    )  # fmt: skip
    r = json.loads(out.read_text())
    rows = json.loads((tiny_dataset / "stats.json").read_text())["test"]["rows"]
    assert r["rows"] == r["forward_only"]["rows"] == r["end_to_end"]["rows"] == rows
    assert r["forward_only"]["rows_per_s"] > 0 and r["end_to_end"]["rows_per_s_whole"] > 0
    assert r["end_to_end"]["actors"] == 1 and r["cpu_count"] >= 1
    v = r["verdict"]
    assert v["target"] == 0.8 and v["steady_over_bound"] > 0 and isinstance(v["meets_target"], bool)
