"""Warm start: a fresh run that begins from yesterday's trained weights (``train.init_from``).

Why: a daily retrain on a day's new impressions should not learn every embedding again from noise.
The vocabularies make the rows comparable: when today's data set's vocabulary *extends* yesterday's
(``Vocabulary.check_extends``: every old row still holds the same raw id, new ids appended after
them, the way ``import-aliccp --vocab-from`` writes it), old row ``r`` is new row ``r``. So every
embedding table's rows ``[0, old_rows)`` are copied exactly from the previous run's checkpoint, rows
``[old_rows, new_rows)`` (ids first seen today) keep the run's fresh initialisation, and the dense
layers (towers, heads, gates) are loaded whole. A table that is not keyed by a field of its own
(CSTWA's ``sm__user``/``sm__item``, one row per user/item) follows the field its feature names
(``user_id``/``item_id``).

What is *not* carried: the optimizer state. The fused embedding optimizer's per-row state (row-wise
Adagrad's accumulators, Adam's moments) and the dense Adam's moments start from zero, as in any fresh
run; the run's step counter, history and data position start at zero too (it is a new run, not a
resume). ``docs/retrain.md`` gives the recipe.

Where the previous run is found (:func:`resolve_source`): a run folder (its newest complete checkpoint,
its ``vocab.json`` and ``metrics.json``), one of its ``checkpoints/step-*`` folders, or an exported
model folder whose manifest's source checkpoint still exists (the exported program holds the weights
in another form; the warm start reads the checkpoint).

Every check (model, table names and widths, dense names and shapes, vocabularies) runs before any
weight is written, on every rank alike from the same files, so a refused warm start raises the same
one-line :class:`WarmStartError` on every rank and no collective is left waiting (none runs here).

**Per-rank memory.** Each rank reads only the rows of its *own* shards (the overlap of each local
shard's ``[offset, offset + rows)`` with ``[0, old_rows)``), one table at a time and at most
:data:`CHUNK_ROWS` rows per read: ``min(shard rows, CHUNK_ROWS) · width · 4`` bytes (float32), plus
DCP's read buffer of one storage chunk overlap. A table-wise table is read whole by the rank that owns
it; a row-wise table by every rank for its block. The dense state (``CheckpointTensors.dense_state``,
the towers: a few MB) is read by every rank.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.data.vocab import VOCAB_FILE, VocabError, Vocabulary
from cstwa_dist.distributed.tables import local_blocks, table_configs, table_keys
from cstwa_dist.train.sources import CheckpointTensors, resolve_checkpoint

logger = logging.getLogger(__name__)

#: rows read per DCP call while copying a shard (bounds the read buffer of a very large shard)
CHUNK_ROWS = 1 << 18
#: the ``state_dict`` prefix of the RecModel inside ``DMP(ModelTrain)``
LIVE_PREFIX = "model."
MANIFEST = "manifest.json"


class WarmStartError(ValueError):
    """A previous run that cannot seed this one; the message names what differs and what to do."""


@dataclass(frozen=True)
class WarmStartSource:
    """Where the weights come from and what is known about the run that wrote them."""

    checkpoint: Path  # the checkpoint folder (``step-*``) read
    record_dir: Path | None  # the folder holding the previous run's vocab.json / metrics.json / manifest
    model: str | None  # the model the previous run trained, where recorded
    vocab: Vocabulary | None  # the previous run's vocabulary; None: an older run that wrote none


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:  # JSON only: a planted pickle is refused by name
        raise WarmStartError(f"{path}: not the JSON this project writes ({e})") from None


def _run_vocab(folder: Path) -> Vocabulary | None:
    """The vocabulary a run recorded (``<run>/vocab.json``); only its sizes and lineage are needed,
    so the table files of the data set it came from are not looked for."""
    path = folder / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        return Vocabulary.from_json(_read_json(path), base=None, source=str(path))
    except VocabError as e:
        raise WarmStartError(str(e)) from None


def resolve_source(path: str | Path) -> WarmStartSource:
    """The checkpoint and records of the run ``path`` names: a run folder, a checkpoint folder, or an
    exported model folder whose source checkpoint still exists. Reads only small JSON files.

    Raises ``FileNotFoundError`` (no checkpoint there) or :class:`WarmStartError`.
    """
    p = Path(path)
    if (p / MANIFEST).is_file() and not (p / "meta.json").is_file():
        manifest = _read_json(p / MANIFEST)
        src = (manifest.get("source") or {}).get("checkpoint") if isinstance(manifest, dict) else None
        if not src or not Path(src).is_dir():
            raise WarmStartError(
                f"{p} is an exported model folder whose source checkpoint {src!r} no longer exists; a warm "
                "start reads the training checkpoint (its sharded tables), not the exported program: "
                "pass the previous training run folder or one of its checkpoints"
            )
        try:
            vocab = Vocabulary.load(p / "vocab")
        except (VocabError, FileNotFoundError) as e:
            raise WarmStartError(f"{p}: the exported model's vocabulary cannot be read ({e})") from None
        return WarmStartSource(resolve_checkpoint(src), p, manifest.get("model"), vocab)
    ckpt = resolve_checkpoint(p)
    candidates = [p] if p.resolve() != ckpt.resolve() else []
    if ckpt.parent.name == "checkpoints":
        candidates.append(ckpt.parent.parent)
    candidates.append(ckpt.parent)
    record = next(
        (c for c in candidates if (c / VOCAB_FILE).is_file() or (c / "metrics.json").is_file()),
        None,
    )
    model = None
    vocab = None
    if record is not None:
        vocab = _run_vocab(record)
        if (record / "metrics.json").is_file():
            m = _read_json(record / "metrics.json")
            model = m.get("model") if isinstance(m, dict) else None
    return WarmStartSource(ckpt, record, model, vocab)


def _table_features(model: nn.Module) -> dict[str, str]:
    """Table name → the (one) feature that looks it up, for every embedding collection of ``model``
    (sharded or not)."""
    out: dict[str, str] = {}
    for c in table_configs(model).values():
        if len(c.feature_names) != 1:
            raise WarmStartError(f"table {c.name!r} is looked up by {c.feature_names}; expected one feature")
        out[c.name] = c.feature_names[0]
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    """A live tensor's global shape (a ShardedTensor's from its metadata)."""
    return tuple(int(n) for n in (t.metadata().size if isinstance(t, ShardedTensor) else t.shape))


def _previous_vocab(source: WarmStartSource, spec: DatasetSpec, old_rows: dict[str, int]) -> Vocabulary:
    """The previous run's vocabulary, or for an older run that recorded none, identity over its
    checkpoint's table rows (``old_rows``: field → rows), with a warning."""
    if source.vocab is not None:
        return source.vocab
    logger.warning(
        "%s records no vocab.json (written by an older version): assuming its rows are raw ids "
        "(identity over its checkpoint's table rows); this holds for synthetic and import-csv data only",
        source.record_dir or source.checkpoint,
    )
    fields = tuple(replace(f, vocab_size=old_rows.get(f.name, f.vocab_size)) for f in spec.fields)
    return Vocabulary.identity(replace(spec, fields=fields))


@torch.no_grad()
def warm_start(
    dmp: nn.Module,
    model_name: str,
    spec: DatasetSpec,
    vocab: Vocabulary,
    init_from: str | Path,
    *,
    dataset: str | Path | None = None,
) -> dict[str, Any]:
    """Copies the previous run's weights into this rank's part of the freshly built ``dmp``.

    Every table's rows ``[0, old_rows)`` (this rank's shards of them) and every dense tensor; rows
    appended since keep their fresh initialisation; optimizer state is not touched (fresh). ``vocab``
    is this run's data set's (``dataset``, named in errors) vocabulary, which must extend the previous
    run's. Returns the record ``metrics.json`` keeps as ``init_from`` (the same on every rank). See the
    module docstring for the checks and the per-rank memory.
    """
    source = resolve_source(init_from)
    if source.model is not None and source.model != model_name:
        raise WarmStartError(
            f"{init_from} trained model {source.model!r}, this run trains {model_name!r}; --init-from "
            f"must name a previous run of {model_name!r}"
        )
    ct = CheckpointTensors(source.checkpoint)
    model: nn.Module = dmp.module.model  # type: ignore[assignment]
    features = _table_features(model)
    live = {k.removeprefix(LIVE_PREFIX): v for k, v in dmp.state_dict().items() if k.startswith(LIVE_PREFIX)}
    live_tables = table_keys(live)
    old_tables = ct.tables()
    where = f"{init_from} ({ct.path})"

    # --- checks (no weight written yet) ----------------------------------------------------------
    missing, extra = sorted(set(live_tables) - set(old_tables)), sorted(set(old_tables) - set(live_tables))
    if missing or extra:
        raise WarmStartError(
            f"{where} holds other embedding tables than {model_name!r} here (only in this model: {missing}; "
            f"only in the checkpoint: {extra}): it was trained with another model or model settings"
        )
    old_rows: dict[str, int] = {}
    for table, info in old_tables.items():
        feat = features.get(table)
        if feat is None:
            raise WarmStartError(f"table {table!r}: no feature of this model looks it up")
        new_shape = _shape(live[live_tables[table]])
        grown = new_shape[0] >= info.shape[0]
        if (
            info.name != live_tables[table]
            or len(new_shape) != 2
            or new_shape[1:] != info.shape[1:]
            or not grown
        ):
            raise WarmStartError(
                f"{where}: table {table!r} is {info.shape} there and {new_shape} here; rows may only be "
                "added between runs (same model.embedding_dim and model settings, no smaller vocabulary)"
            )
        mine = vocab.fields.get(feat)
        if mine is not None and mine.size != new_shape[0]:
            raise WarmStartError(
                f"table {table!r} has {new_shape[0]} rows but the data set's vocabulary of {feat!r} has "
                f"{mine.size}: its spec.yaml and vocab/ disagree; re-import the data set"
            )
        prev = old_rows.setdefault(feat, info.shape[0])
        if prev != info.shape[0]:
            raise WarmStartError(
                f"{where}: tables keyed by {feat!r} disagree on its rows ({prev}, {info.shape[0]})"
            )
    old_vocab = _previous_vocab(source, spec, old_rows)
    try:
        vocab.check_extends(old_vocab)
    except VocabError as e:
        raise WarmStartError(
            f"the data set {dataset or '(this run)'} does not extend the vocabulary of {where}: {e}. Import "
            "the new day with --vocab-from the previous day's data set, so every known id keeps its row"
        ) from None
    for feat, rows in old_rows.items():
        known = old_vocab.fields.get(feat)
        if known is not None and known.size != rows:
            raise WarmStartError(
                f"{where}: tables keyed by {feat!r} have {rows} rows, its run's vocabulary {known.size}"
            )
    new_dense = sorted(n for n in live if n not in live_tables.values())
    old_dense = ct.dense_names()
    if set(new_dense) != set(old_dense):
        raise WarmStartError(
            f"{where} holds other dense tensors than {model_name!r} here (only in this model: "
            f"{sorted(set(new_dense) - set(old_dense))[:5]}; only in the checkpoint: "
            f"{sorted(set(old_dense) - set(new_dense))[:5]}): another model or tower layout"
        )
    for n in new_dense:
        old_shape, new_shape = tuple(ct.tensors[n].shape), _shape(live[n])
        if old_shape != new_shape:
            raise WarmStartError(
                f"{where}: dense tensor {n} is {old_shape} there and {new_shape} here (another "
                "tower width, embedding_dim or field count); a warm start needs the same dense layers"
            )

    # --- copies ---------------------------------------------------------------------------------
    dense = ct.dense_state()
    for n in new_dense:
        live[n].copy_(dense[n].to(device=live[n].device, dtype=live[n].dtype))
    del dense
    tables: dict[str, dict[str, int]] = {}
    for table in sorted(old_tables):
        name, n_old = live_tables[table], old_tables[table].shape[0]
        n_new = _shape(live[name])[0]
        for row0, col0, block in local_blocks(live[name]):
            h, w = int(block.shape[0]), int(block.shape[1])
            for start in range(row0, min(row0 + h, n_old), CHUNK_ROWS):
                count = min(CHUNK_ROWS, n_old - start, row0 + h - start)
                rows = ct.read_rows(name, start, count)[:, col0 : col0 + w]
                block[start - row0 : start - row0 + count].copy_(
                    rows.to(device=block.device, dtype=block.dtype)
                )
        tables[table] = {"rows_carried": min(n_old, n_new), "rows_new": max(n_new - n_old, 0)}
    report = {
        "source": str(init_from),
        "checkpoint": str(ct.path),
        "model": model_name,
        "step": ct.state.global_step,
        "epoch": ct.state.epoch + 1,
        "world_size": ct.state.world_size,
        "vocab": "recorded" if source.vocab is not None else "identity (older run without vocab.json)",
        "tables": tables,
        "dense_tensors": len(new_dense),
        "optimizer_state": "fresh",
    }
    logger.info(
        "warm start from %s (step %d): %d tables, %d rows carried, %d new rows left at their fresh "
        "initialisation, %d dense tensors loaded; optimizer state starts fresh (Adam moments, Adagrad "
        "accumulators zero)",
        ct.path,
        ct.state.global_step,
        len(tables),
        sum(t["rows_carried"] for t in tables.values()),
        sum(t["rows_new"] for t in tables.values()),
        len(new_dense),
    )
    return report
