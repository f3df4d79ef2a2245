"""Structure mining as one call: pre-train the CTR MLP, then kNN graphs from its tables.

docs/method.md §1 states the steps; this module is steps 1 (pre-training) and 2–5 (``mine_structure``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from cstwa_dist.config import RunConfig, flat_settings, settings_differences
from cstwa_dist.distributed.env import init_distributed
from cstwa_dist.fs import atomic_write_json
from cstwa_dist.registry import PRETRAIN_MODEL, get_model_spec
from cstwa_dist.structure.ivf import check_ivf_supported, faiss_device
from cstwa_dist.structure.migrator import ivf_params, mine_structure
from cstwa_dist.train.trainer import train

logger = logging.getLogger(__name__)

PRETRAIN_RUN = "pretrain"  # the CTR MLP's run folder inside a structure directory


# Every setting the mined structure depends on: the pre-training run (data, the CTR MLP's model and
# optimizer settings, its own settings should it get any, seed, epochs) and the graph build (k and the
# kNN search); a key ending in "." is a whole section. Anything else (β, the SM reading, the loss, the
# CVR side, the trained models' own settings) only reads the graphs, so cells that differ only there
# share them.
_MINING_KEYS = (
    "data.dataset",
    "data.batch_size",
    "data.shuffle",
    "model.embedding_dim",
    "model.ctr_tower",
    "model.dropout",
    "model.embedding_init_std",
    "model.context_pooling",
    f"models.{PRETRAIN_MODEL}.",
    "optim.",
    "train.seed",
    "structure.k",
    "structure.pretrain_epochs",
    "structure.knn",
    "structure.nlist",
    "structure.nprobe",
    "structure.pq_m",
)


def mining_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings a structure directory was (or will be) mined with, as ``section.key`` → value.

    Written into ``structure.json`` so a directory is never reused for a config it was not mined
    with (:func:`structure_mismatch`), and hashed by ``experiment`` to give cells that change one of
    them their own directory.
    """
    return {
        k: v
        for k, v in flat_settings(cfg).items()
        if any(k == m or (m.endswith(".") and k.startswith(m)) for m in _MINING_KEYS)
    }


def structure_mismatch(graph_dir: str | Path, cfg: RunConfig) -> str | None:
    """Why the complete structure in ``graph_dir`` must not serve ``cfg`` (mined with other settings),
    or None when it may. A directory written before the settings were recorded is accepted with a
    warning naming it.
    """
    path = Path(graph_dir) / "structure.json"
    try:
        report = json.loads(path.read_text())
    except ValueError as e:  # JSON only: a planted pickle or a damaged file is refused by name
        raise ValueError(f"{path}: not the JSON `pretrain` writes ({e}); mine the structure again") from None
    recorded = report.get("settings")
    if recorded is None:
        logger.warning(
            "%s/structure.json records no mining settings (written by an older version): reused as is",
            graph_dir,
        )
        return None
    diff = settings_differences(recorded, mining_settings(cfg))
    if not diff:
        return None
    return (
        f"{graph_dir} was mined with other settings than this run's ({'; '.join(diff)}); point "
        "structure.graph_dir elsewhere or delete the directory to mine it again"
    )


def pretrain_run(path: str | Path) -> Path:
    """The CTR MLP run a warm-started pre-training starts from: ``path`` is a previous structure
    directory (its ``pretrain/`` run is used), that run folder, or one of its checkpoints."""
    p = Path(path)
    return p / PRETRAIN_RUN if (p / PRETRAIN_RUN).is_dir() else p


def pretrain_structure(cfg: RunConfig, init_from: str | Path | None = None) -> dict[str, Any]:
    """Writes ``Â_U``, ``Â_I`` and ``structure.json`` to ``cfg.structure.graph_dir``; returns the report.

    ``init_from`` (``pretrain --init-from``, docs/retrain.md): the CTR MLP starts from a previous
    pre-training's weights (:func:`pretrain_run`; carried rows exact, new rows and optimizer state
    fresh, ``train/warmstart.py``); the graphs are mined for this data set as always. The config's
    ``train.init_from`` names the *trained* model's source and never applies here.

    Must run inside a Ray runtime and a process group (all ranks call it: the read-out is collective).
    """
    env = init_distributed()
    if cfg.structure.knn == "ivf":  # refuse what this node's Faiss index cannot do before pre-training
        check_ivf_supported(ivf_params(cfg.structure, cfg.train.seed), faiss_device(), k=cfg.structure.k)
    previous = None if init_from is None else str(pretrain_run(init_from))
    cfg = replace(cfg, train=replace(cfg.train, init_from=previous))
    source = get_model_spec(PRETRAIN_MODEL).representation_source
    if source is None:
        raise ValueError(f"registry entry {PRETRAIN_MODEL!r} declares no representation source")
    res = train(
        cfg,
        PRETRAIN_MODEL,
        run_dir=Path(cfg.structure.graph_dir) / PRETRAIN_RUN,
        epochs=cfg.structure.pretrain_epochs,
    )
    graphs = mine_structure(
        res.sharded.dmp, source, res.spec, cfg.data.dataset, cfg.structure, env, seed=cfg.train.seed
    )
    report = {"settings": mining_settings(cfg), "pretrain": res.metrics, "graphs": graphs}
    if env.is_main:
        # last: its presence marks a complete structure directory
        atomic_write_json(Path(cfg.structure.graph_dir) / "structure.json", report, sort_keys=False)
        logger.info("structure written to %s", cfg.structure.graph_dir)
    return report


def structure_complete(graph_dir: str | Path) -> bool:
    return (Path(graph_dir) / "structure.json").exists()
