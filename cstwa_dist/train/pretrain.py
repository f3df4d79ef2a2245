"""Structure mining as one call: pre-train the CTR MLP, then kNN graphs from its tables (§1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cstwa_dist.config import RunConfig
from cstwa_dist.distributed.env import init_distributed
from cstwa_dist.structure.migrator import mine_structure
from cstwa_dist.train.trainer import train

logger = logging.getLogger(__name__)

PRETRAIN_MODEL = "ctr_mlp"


def pretrain_structure(cfg: RunConfig) -> dict[str, Any]:
    """Writes ``Â_U``, ``Â_I`` and ``structure.json`` to ``cfg.structure.graph_dir``; returns the report.

    Must run inside a Ray runtime and a process group (all ranks call it: the read-out is collective).
    """
    env = init_distributed()
    res = train(
        cfg,
        PRETRAIN_MODEL,
        run_dir=Path(cfg.structure.graph_dir) / "pretrain",
        epochs=cfg.structure.pretrain_epochs,
    )
    source = res.sharded.dmp.module.model.representation_source()
    if source is None:
        raise ValueError(f"{PRETRAIN_MODEL} declares no representation source")
    graphs = mine_structure(res.sharded.dmp, source, res.spec, cfg.data.dataset, cfg.structure, env)
    report = {"pretrain": res.metrics, "graphs": graphs}
    if env.is_main:
        out = Path(cfg.structure.graph_dir) / "structure.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(out)  # last: its presence marks a complete structure directory
        logger.info("structure written to %s", cfg.structure.graph_dir)
    return report


def structure_complete(graph_dir: str | Path) -> bool:
    return (Path(graph_dir) / "structure.json").exists()
