"""Structure mining as one call: pre-train the CTR MLP, then kNN graphs from its tables.

docs/method.md §1 states the steps; this module is steps 1 (pre-training) and 2–5 (``mine_structure``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cstwa_dist.config import RunConfig
from cstwa_dist.distributed.env import init_distributed
from cstwa_dist.fs import atomic_write_json
from cstwa_dist.registry import PRETRAIN_MODEL, get_model_spec
from cstwa_dist.structure.migrator import mine_structure
from cstwa_dist.train.trainer import train

logger = logging.getLogger(__name__)


def pretrain_structure(cfg: RunConfig) -> dict[str, Any]:
    """Writes ``Â_U``, ``Â_I`` and ``structure.json`` to ``cfg.structure.graph_dir``; returns the report.

    Must run inside a Ray runtime and a process group (all ranks call it: the read-out is collective).
    """
    env = init_distributed()
    source = get_model_spec(PRETRAIN_MODEL).representation_source
    if source is None:
        raise ValueError(f"registry entry {PRETRAIN_MODEL!r} declares no representation source")
    res = train(
        cfg,
        PRETRAIN_MODEL,
        run_dir=Path(cfg.structure.graph_dir) / "pretrain",
        epochs=cfg.structure.pretrain_epochs,
    )
    graphs = mine_structure(
        res.sharded.dmp, source, res.spec, cfg.data.dataset, cfg.structure, env, seed=cfg.train.seed
    )
    report = {"pretrain": res.metrics, "graphs": graphs}
    if env.is_main:
        # last: its presence marks a complete structure directory
        atomic_write_json(Path(cfg.structure.graph_dir) / "structure.json", report, sort_keys=False)
        logger.info("structure written to %s", cfg.structure.graph_dir)
    return report


def structure_complete(graph_dir: str | Path) -> bool:
    return (Path(graph_dir) / "structure.json").exists()
