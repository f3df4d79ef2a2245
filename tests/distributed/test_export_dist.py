"""Export of a checkpoint written by 2 ranks: CSTWA's structure tables row-wise sharded (half the rows
in each rank's files), its field tables table-wise spread over the ranks. One process reads it back
table by table, and the exported model scores the test split exactly as the 2-rank job did (each rank
wrote its own rows' predictions)."""

from __future__ import annotations

import json
from pathlib import Path

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import WORLD, rank_setup
from tests.unit.test_export import check_against_job

MODELS = ("cstwa",)  # its field tables are table-wise like every baseline's


def _train_worker(rank: int, world: int, dataset: str, graph_dir: str, out: str) -> None:
    from cstwa_dist.runtime import RayRuntime
    from cstwa_dist.train.trainer import train

    cfg, _, _ = rank_setup(
        dataset,
        "train.epochs=1",
        "data.ray_num_cpus=1",
        "data.batch_size=1024",
        "model.dropout=[0.1, 0.1]",
        f"structure.graph_dir={graph_dir}",
        "train.tensorboard=false",
        "train.write_predictions=true",
    )
    with RayRuntime(num_cpus=1):
        for name in MODELS:
            train(cfg, name, run_dir=Path(out) / name)


def test_a_two_rank_checkpoint_exports_to_its_in_job_predictions(tiny_dataset, exact_graphs, tmp_path):
    from cstwa_dist.export.exporter import export_model
    from cstwa_dist.train.checkpoint import read_dcp_metadata
    from cstwa_dist.train.sources import MODEL_PREFIX, CheckpointTensors

    spawn_ranks(_train_worker, WORLD, str(tiny_dataset), str(exact_graphs), str(tmp_path))
    for name in MODELS:
        run = tmp_path / name
        assert json.loads((run / "predictions" / "test" / "manifest.json").read_text())["world_size"] == WORLD
        assert len(list((run / "predictions" / "test").glob("part-rank-*.parquet"))) == WORLD
        out = export_model(run, tmp_path / f"{name}-model")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["world_size"] == WORLD
        if name == "cstwa":  # the structure tables were row-wise sharded: each rank saved a row range
            src = CheckpointTensors(run)
            md = read_dcp_metadata(src.path / ".metadata").state_dict_metadata
            for table in ("sm__user", "sm__item"):
                chunks = md[f"{MODEL_PREFIX}structure_embeddings.embedding_bags.{table}.weight"].chunks
                assert len(chunks) == WORLD and {c.offsets[0] for c in chunks} != {0}
        check_against_job(out, run, tiny_dataset)
