"""``export``: a training run's checkpoint → a self-contained model folder a serving process loads.

The folder (docs/export.md; the contract of issue 20, section 2)::

    MODEL_DIR/manifest.json   what it is, where it came from, its test metrics, sha256 of every file
    MODEL_DIR/program.pt2     torch.export program: ids [B, F] int64 → probabilities [B, k] float32
    MODEL_DIR/spec.yaml       the dataset spec (field order of the ids' columns)
    MODEL_DIR/vocab/          the training dataset's vocabulary (raw id → row)

How: the registered model is built once, in this process, on the ``meta`` device (no weights, no
DistributedModelParallel); every TorchRec collection the forward reads is swapped for a
:class:`~cstwa_dist.export.module.TableLookup` whose tables are read out of the checkpoint one at a
time (:class:`~cstwa_dist.train.sources.CheckpointTensors`: any world size, any sharding, no process
group); the dense tensors are loaded with ``strict`` names; ``torch.export`` traces the result in
``eval`` mode (dropout off) with a dynamic batch dimension.

Memory (one process): the exported tables (Σ rows · dim · 4 bytes, see :mod:`cstwa_dist.export.weight`),
the dense tensors (a few MB), and while ``torch.export.save`` writes, one more copy of the largest
tensor's bytes. The folder is written into ``<out>.tmp-<pid>`` and renamed into place, so a killed
export leaves no half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from cstwa_dist.export.artifact import (
    FORMAT,
    MANIFEST,
    PROGRAM,
    SPEC_FILE,
    VOCAB_DIR,
    ExportError,
)

logger = logging.getLogger(__name__)


def _run_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ExportError(
            f"{path}: not found; export reads the run's model and config from the metrics.json a "
            "finished `train` writes (pass the run folder, e.g. runs/demo/cstwa)"
        )
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path}: not JSON ({e})") from None
    if not isinstance(record, dict) or "model" not in record or "config" not in record:
        raise ExportError(f"{path}: holds no 'model' and 'config'; not written by `train`")
    return record


def run_config(recorded: dict[str, Any]) -> Any:
    """The run's ``RunConfig`` from its ``metrics.json`` record, checked like a loaded file."""
    from cstwa_dist.config import RunConfig, flatten
    from cstwa_dist.registry import with_overrides

    # YAML, not JSON, for the values: YAML 1.1 reads JSON's ``1e-06`` as a string
    dump = lambda v: yaml.safe_dump(v, default_flow_style=True).strip()  # noqa: E731
    return with_overrides(RunConfig(), [f"{k}={dump(v)}" for k, v in flatten(recorded).items()])


def _tested_record(history: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """The test metrics of ``epoch`` (1-based) from a run's history; ``{}`` when it was not tested."""
    for rec in history:
        if rec.get("epoch") == epoch and isinstance(rec.get("test"), dict):
            return dict(rec["test"])
    return {}


def export_model(
    run_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    force: bool = False,
    dataset: str | Path | None = None,
) -> Path:
    """Exports the newest checkpoint of ``run_dir`` (or ``checkpoint``) into ``out``; returns ``out``.

    ``out`` must not exist or be an empty folder unless ``force`` (then it is replaced, only once the
    new folder is complete). ``dataset``: where the training dataset is now (default: the run's
    ``data.dataset``), for its spec and vocabulary.
    """
    import torch

    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.export.module import ScoringModule
    from cstwa_dist.fs import atomic_write_json, check_fresh_output, sha256_file, staged_directory
    from cstwa_dist.registry import get_model_spec
    from cstwa_dist.train.sources import CheckpointTensors

    t0 = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    if not force:
        check_fresh_output(out, "model folder")
    record = _run_record(run_dir)
    cfg = run_config(record["config"])
    name = record["model"]
    mspec = get_model_spec(name)
    data = Path(dataset) if dataset is not None else Path(cfg.data.dataset)
    spec = DatasetSpec.load(data)
    src = CheckpointTensors(checkpoint if checkpoint is not None else run_dir)
    state = src.state
    logger.info(
        "exporting %s from %s (epoch %d, step %d, %d rank(s))",
        name,
        src.path,
        state.epoch + 1,
        state.global_step,
        state.world_size,
    )
    model, table_rows, table_bytes = build_export_model(mspec, cfg, spec, src)
    two_task = mspec.predicts_purchase
    scoring = ScoringModule(model, two_task).eval()
    program = trace(scoring, len(spec.names))

    history = state.history or record.get("history") or []
    test = _tested_record(history, state.epoch + 1) if state.epoch_end else {}
    outputs = ["p_ctr", "p_cvr", "p_ctcvr"] if two_task else ["p_ctr"]
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": name,
        "fields": spec.names,
        "outputs": outputs,
        "table_rows": table_rows,
        "table_bytes": table_bytes,
        "source": {
            "run_dir": str(run_dir),
            "checkpoint": str(src.path),
            "step": state.global_step,
            "epoch": state.epoch + 1,
            "epoch_end": state.epoch_end,
            "world_size": state.world_size,
        },
        "test_metrics": test,
        "config": record["config"],
        "dataset": str(data),
        "torch": torch.__version__,
    }
    # --force over an existing folder: write beside it, swap only once the new one is whole
    staging_out = out.parent / f"{out.name}.new-{os.getpid()}" if force and out.exists() else out
    with staged_directory(staging_out, "model folder") as tmp:
        torch.export.save(program, tmp / PROGRAM)
        spec.save(tmp / SPEC_FILE)
        _save_vocab(data, spec, tmp / VOCAB_DIR)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
        atomic_write_json(tmp / MANIFEST, manifest)
    if staging_out != out:  # --force: the old folder goes only once the new one is whole
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging_out.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    logger.info(
        "wrote %s: %s, %.1f MB of tables, in %.1fs",
        out,
        ", ".join(outputs),
        sum(table_bytes.values()) / 2**20,
        time.perf_counter() - t0,
    )
    return out


def meta_export_model(mspec: Any, cfg: Any, spec: Any) -> tuple[Any, dict[str, list], set[str]]:
    """The registered model on ``meta`` with every TorchRec collection swapped for a ``TableLookup`` of
    ``meta`` tables; returns ``(model, {collection path: table layout}, paths the forward reads)``.

    The forward's reads come from one pass on ``meta`` tensors (no data, no weights): a model's forward
    does not branch on its inputs, so the collections it calls are the same for every batch.
    """
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from cstwa_dist.export.module import (
        ScoringModule,
        TableLookup,
        collections_of,
        replace_module,
        table_layout,
    )

    meta = torch.device("meta")
    own = mspec.settings_in(cfg)
    model = mspec.build(spec, cfg.model, meta, structure=cfg.structure, settings=own)
    columns = {f: i for i, f in enumerate(spec.names)}
    layouts = {
        path: table_layout(ebc, columns)
        for path, ebc in collections_of(model, EmbeddingBagCollection).items()
    }
    for path, layout in layouts.items():
        replace_module(
            model,
            path,
            TableLookup([(t, f, c, torch.empty(r, d, device=meta)) for t, f, c, r, d in layout]),
        )
    called: set[str] = set()
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: called.add(p)) for p in layouts
    ]
    with torch.no_grad():
        ids = torch.zeros(2, len(spec.names), dtype=torch.int64, device=meta)
        ScoringModule(model, mspec.predicts_purchase).eval()(ids)
    for h in hooks:
        h.remove()
    return model, layouts, called


def build_export_model(
    mspec: Any, cfg: Any, spec: Any, src: Any
) -> tuple[Any, dict[str, int], dict[str, int]]:
    """The registered model with every TorchRec collection replaced by a filled ``TableLookup``.

    Returns ``(model, table_rows by field, bytes by table)``. ``table_rows`` names the rows a field's
    tables hold (every table of a field has the spec's vocabulary size, so one number per field).
    Host memory: one table is read at a time, straight into the tensor the module keeps.
    """
    import torch

    from cstwa_dist.export.module import TableLookup, Unused, replace_module

    model, layouts, called = meta_export_model(mspec, cfg, spec)
    tables = src.tables()
    table_rows: dict[str, int] = {}
    table_bytes: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    for path, layout in layouts.items():
        if path not in called:
            replace_module(model, path, Unused())
            logger.info("%s: not read by the forward, not exported", path)
            continue
        filled = []
        for table, feat, col, rows, dim in layout:
            key = f"{path}.embedding_bags.{table}.weight"
            info = src.tensors.get(key)
            if info is None or tables.get(table) is None:
                raise ExportError(
                    f"{src.path}: holds no table {key}; the checkpoint is not of this model/config"
                )
            if tuple(info.shape) != (rows, dim):
                raise ExportError(
                    f"{src.path}: {key} is {tuple(info.shape)}, the model's table is ({rows}, {dim}); "
                    "the dataset spec or config differs from the run's"
                )
            t1 = time.perf_counter()
            weight = src.read_rows(key).float()
            logger.info("table %s: %d x %d read in %.2fs", key, rows, dim, time.perf_counter() - t1)
            filled.append((table, feat, col, weight))
            state[key] = weight
            prev = table_rows.setdefault(feat, rows)
            if prev != rows:
                raise ExportError(f"field {feat}: tables of {prev} and {rows} rows")
            table_bytes[key] = weight.numel() * weight.element_size()
        replace_module(model, path, TableLookup(filled))
    dense = src.dense_state()
    wanted = {k for k in model.state_dict() if k not in state}
    missing, extra = sorted(wanted - set(dense)), sorted(set(dense) - wanted)
    if missing or extra:
        raise ExportError(
            f"{src.path}: dense tensors do not match the model (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); the checkpoint is not of this model/config"
        )
    model.load_state_dict({**dense, **state}, strict=True, assign=True)
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if bad:
        raise ExportError(f"tensors left without a value after loading {src.path}: {bad[:5]}")
    for p in model.parameters():  # a scoring program: no autograd state in it
        p.requires_grad_(False)
    return model.eval(), table_rows, table_bytes


def trace(scoring: Any, n_fields: int) -> Any:
    """``torch.export`` of the scoring module with a dynamic batch dimension."""
    import torch

    example = torch.zeros(4, n_fields, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=2**31 - 1)
    with torch.no_grad():
        return torch.export.export(scoring, (example,), dynamic_shapes=({0: batch},), strict=False)


def _save_vocab(dataset: Path, spec: Any, folder: Path) -> None:
    """The training dataset's vocabulary (its ``vocab/``, or the identity over the spec's sizes)."""
    from cstwa_dist.data.vocab import Vocabulary

    Vocabulary.load(dataset, spec).save(folder)
