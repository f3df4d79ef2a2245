"""Batch scoring: Parquet rows streamed by Ray Data through an exported model, predictions written as Parquet.

``cstwa-dist score`` is step 7 of a retrain (docs/scoring.md): read a data set's split or any Parquet files
that carry the model's fields, map their ids to the model's rows, run the exported program on an actor pool
and write ``<out>/part-*.parquet`` with the ids as given, the labels where present and one float32 column
per model output (``p_ctr``, ``p_cvr``, ``p_ctcvr``; a click-only model has ``p_ctr`` alone).

**Streaming, never on the driver.** ``ray.data.read_parquet`` reads the files in Ray tasks,
``map_batches`` hands batches of ``batch_size`` rows to a pool of ``actors`` :class:`Scorer` actors (each
loads the model once, with :func:`~cstwa_dist.export.artifact.load_model`, which checks every file's
digest) and ``write_parquet`` writes each scored block; the driver only reads Parquet footers (row counts,
schemas) and a progress counter. Peak memory: per actor the model (its tables) plus a few batches of
``batch_size`` rows (ids ``8·F`` bytes a row, outputs ``4·k``); Ray Data's read-ahead in the object store.

**Ids.** A data set folder's ids are already rows of its own vocabulary; the data set is accepted only if
its vocabulary extends the model's (:meth:`Vocabulary.check_extends`), so a row means the same raw id to
both. Other Parquet files carry raw ids by default (``ids="raw"``: mapped through the model's vocabulary)
or rows (``ids="rows"``). An id the model cannot place (a raw id it never saw, a row at or past its table)
is *unseen*: it reads the field's ``unknown_row`` where the vocabulary has one, else ``-1`` (the exported
program reads a zero embedding for it), and is counted per field in ``score.json``. ``strict=True``
stops instead, and the driver re-scans the files in order to name the first such file, row and field (the
actors only know that a batch had one: after Ray's batching a row no longer knows its file).

**Whole or nothing.** Output goes to a staging folder next to ``out`` and is renamed into place only when
the rows written equal the rows read (else :class:`ScoreError`); ``force=True`` replaces an existing
``out`` the same way, so a failed run never leaves a half-written or a half-replaced folder.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.spec import LABELS, SPLITS, DatasetSpec, split_files
from cstwa_dist.data.validate import DataError
from cstwa_dist.data.vocab import VocabError, Vocabulary
from cstwa_dist.fs import atomic_write_json, check_fresh_output

log = logging.getLogger(__name__)

IdsMode = Literal["rows", "raw"]
DEFAULT_BATCH_SIZE = 16384
PROGRESS_EVERY_S = 10.0
_SCAN_ROWS = 65536  # rows per record batch when the driver re-scans for the first bad row
_UNSEEN_TAG = "cstwa-score-unseen"  # marks a strict-mode stop inside Ray's wrapped error text


class ScoreError(ValueError):
    """A scoring run that cannot start or did not complete (a ``ValueError``: the CLI prints one line)."""


def default_actors() -> int:
    """Scoring actors by default: one per core, leaving none idle on small machines (docs/scoring.md)."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class ScoreOptions:
    """How one scoring run reads, maps, computes and writes (the ``score`` command's options).

    ``ids=None`` picks ``rows`` for a data set folder and ``raw`` for Parquet files. ``actors=None`` is
    :func:`default_actors`. ``actor_cpus`` is the Ray CPU share each actor reserves (``None``: the
    runtime's CPUs less one for the read and write tasks, over the actors, at most 1); ``threads`` is each
    actor's torch intra-op threads (``None``: 1 — several single-threaded actors beat one threaded one on
    these small towers, docs/scoring.md).
    """

    split: str = "test"
    ids: IdsMode | None = None
    strict: bool = False
    actors: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: Literal["cpu", "cuda"] = "cpu"
    force: bool = False
    actor_cpus: float | None = None
    threads: int | None = None
    preserve_order: bool = True
    progress_every_s: float = PROGRESS_EVERY_S

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ScoreError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.ids not in (None, "rows", "raw"):
            raise ScoreError(f"--ids {self.ids!r} is not rows or raw")
        if self.actors is not None and self.actors < 1:
            raise ScoreError(f"--actors must be >= 1, got {self.actors}")
        if self.batch_size < 1:
            raise ScoreError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in ("cpu", "cuda"):
            raise ScoreError(f"--device {self.device!r} is not cpu or cuda")


# --- the model as the driver sees it (no torch) -----------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """An exported model folder's manifest, spec and vocabulary, read without torch (the driver's view).

    The actors load the program itself (and verify every digest); the driver needs only the field order,
    the table sizes and the vocabulary to check the input and to name a bad row.
    """

    path: Path
    manifest: dict[str, Any]
    spec: DatasetSpec
    vocab: Vocabulary

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        from cstwa_dist.export.artifact import MANIFEST, SPEC_FILE, VOCAB_DIR, ExportError, read_manifest

        path = Path(model_dir)
        manifest = read_manifest(path)
        if "table_rows" not in manifest:
            raise ExportError(f"{path / MANIFEST}: no 'table_rows'; export the model again")
        spec = DatasetSpec.load(path / SPEC_FILE)
        if list(manifest["fields"]) != spec.names:
            raise ExportError(
                f"{path}: spec.yaml's fields {spec.names} differ from the manifest's; re-export"
            )
        vocab = (
            Vocabulary.load(path / VOCAB_DIR, spec)
            if (path / VOCAB_DIR).exists()
            else Vocabulary.identity(spec)
        )
        return cls(path=path, manifest=manifest, spec=spec, vocab=vocab)

    @property
    def fields(self) -> list[str]:
        return list(self.manifest["fields"])

    @property
    def outputs(self) -> list[str]:
        return list(self.manifest["outputs"])

    @property
    def table_rows(self) -> dict[str, int]:
        return {f: int(n) for f, n in self.manifest["table_rows"].items()}


# --- id mapping (numpy only: the actors and the driver's re-scan share it) --------------------------
class IdMapper:
    """Input id columns -> the program's ``[B, F]`` int64 rows, with unseen ids replaced and counted.

    ``ids="raw"`` maps through ``vocab.rows``; ``ids="rows"`` takes the values as rows. Either way a
    result outside ``[0, table_rows)`` is unseen and becomes the field's fallback: the vocabulary's
    ``unknown_row`` where it has one inside the table, else ``-1`` (a zero embedding in the program).
    """

    def __init__(self, fields: Sequence[str], table_rows: Mapping[str, int], vocab: Vocabulary, ids: IdsMode):
        self.fields = list(fields)
        self.ids = ids
        self.vocab = vocab
        self.limit = {f: int(table_rows[f]) for f in self.fields}
        self.fallback: dict[str, int] = {}
        for f in self.fields:
            unknown = vocab.fields[f].unknown_row if f in vocab.fields else None
            ok = unknown is not None and 0 <= int(unknown) < self.limit[f]
            self.fallback[f] = int(unknown) if ok else -1

    def field_rows(self, name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, unseen mask)`` of one column; raises :class:`DataError` on nulls or non-integers."""
        if values.dtype.kind not in "iu":
            raise DataError(f"field {name!r}: null or non-integer values (dtype {values.dtype})")
        values = values.astype(np.int64, copy=False)
        rows = self.vocab.rows(name, values) if self.ids == "raw" else values
        bad = (rows < 0) | (rows >= self.limit[name])
        if bad.any():
            rows = np.where(bad, np.int64(self.fallback[name]), rows)
        return rows, bad

    def map(self, columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
        """``[B, F]`` int64 rows in the model's field order and the unseen count of each field."""
        n = len(columns[self.fields[0]])
        ids = np.empty((n, len(self.fields)), dtype=np.int64)
        unseen: dict[str, int] = {}
        for j, name in enumerate(self.fields):
            rows, bad = self.field_rows(name, columns[name])
            ids[:, j] = rows
            unseen[name] = int(bad.sum())
        return ids, unseen


def locate_first_problem(files: Sequence[Path], mapper: IdMapper, *, unseen: bool) -> DataError | None:
    """The first null (and, with ``unseen``, unseen) id in file order, as a :class:`DataError` naming
    file, row (0-based within the file), field and value; ``None`` if every id is fine.

    Called only after the Ray pipeline stopped on such a row, so its cost (one pass over the id columns,
    ``_SCAN_ROWS`` rows at a time) is paid once, on the way to raising.
    """
    for path in files:
        offset = 0
        for rb in pq.ParquetFile(path).iter_batches(batch_size=_SCAN_ROWS, columns=mapper.fields):
            for name in mapper.fields:
                col = rb.column(name)
                if col.null_count:
                    row = offset + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                    return DataError(f"{path}: row {row}, field {name!r}: null id; every field needs an id")
                if not unseen:
                    continue
                values = col.to_numpy(zero_copy_only=False)
                _, bad = mapper.field_rows(name, values)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    kind = "raw id" if mapper.ids == "raw" else "row"
                    where = "not in the model's vocabulary" if mapper.ids == "raw" else "outside its table"
                    return DataError(
                        f"{path}: row {offset + i}, field {name!r}: {kind} {int(values[i])} is {where} "
                        f"(table rows {mapper.limit[name]}); drop --strict to score it as unseen"
                    )
            offset += rb.num_rows
    return None


# --- the input -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreInput:
    """What to read: the files in order, their id mode, the label columns they all carry, their rows."""

    files: list[Path]
    ids: IdsMode
    dataset: Path | None
    labels: list[str]
    rows: int
    file_rows: list[int] = field(default_factory=list)

    def describe(self) -> str:
        if self.dataset is not None:
            return f"{self.dataset} ({len(self.files)} files)"
        return f"{len(self.files)} Parquet files"


def _glob_files(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"{pattern}: no Parquet files match")
    return files


def resolve_input(source: str | Path, options: ScoreOptions, model: ModelInfo) -> ScoreInput:
    """The files to score and how to read their ids; checks every file's footer (fields present and
    integer) and, for a data set folder, that its vocabulary extends the model's."""
    src = Path(source)
    dataset: Path | None = None
    if src.is_dir() and (src / "spec.yaml").is_file():
        dataset = src
        if options.ids == "raw":
            raise ScoreError(
                f"{src}: a data set folder holds rows of its vocabulary, not raw ids; drop --ids raw, or "
                "pass its Parquet files as a glob"
            )
        ids: IdsMode = "rows"
        spec = DatasetSpec.load(src)
        missing = [f for f in model.fields if f not in spec.names]
        if missing:
            raise ScoreError(
                f"{src}: the data set lacks the model's field(s) {missing}; fields are {spec.names}"
            )
        try:
            Vocabulary.load(src, spec).check_extends(model.vocab)
        except VocabError as e:
            raise VocabError(
                f"{src}: its vocabulary does not extend the model's ({model.path}), so its rows would "
                f"mean other ids: {e}; import it with --vocab-from the model's training data set"
            ) from None
        files = split_files(src, options.split)
    else:
        ids = options.ids or "raw"
        files = _glob_files(str(source))
    labels = list(LABELS)
    file_rows = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        for name in model.fields:
            if name not in schema.names:
                raise DataError(
                    f"{path}: field {name!r} is missing (column not found); columns are {schema.names}"
                )
            if not pa.types.is_integer(schema.field(name).type):
                raise DataError(
                    f"{path}: field {name!r} has type {schema.field(name).type}, expected integer ids"
                )
        labels = [c for c in labels if c in schema.names]
        file_rows.append(pf.metadata.num_rows)
    return ScoreInput(
        files=files, ids=ids, dataset=dataset, labels=labels, rows=sum(file_rows), file_rows=file_rows
    )


# --- the Ray side -----------------------------------------------------------------------------------
class ScoreCounter:
    """Rows and unseen ids scored so far, across all actors (a Ray actor with no CPU of its own).

    Each :class:`Scorer` reports a batch after scoring it; the driver polls :meth:`snapshot` for progress
    and, at the end, for the unseen counts. The first batch's time is kept apart, so that the steady rate
    (without the actors' start-up) can be told from the whole run's.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.batches = 0
        self.unseen: dict[str, int] = {}
        self.first_t: float | None = None
        self.first_rows = 0
        self.last_t: float | None = None
        self.actor_start_s: list[float] = []
        self.ready_t: list[float] = []
        self.events: list[tuple[float, int]] = []

    def started(self, seconds: float) -> None:
        """An actor's start-up (torch import, model load and checks), for the report."""
        self.actor_start_s.append(seconds)
        self.ready_t.append(time.time())

    def add(self, rows: int, unseen: dict[str, int]) -> None:
        now = time.time()
        if self.first_t is None:
            self.first_t, self.first_rows = now, rows
        self.last_t = now
        self.events.append((now, rows))
        self.rows += rows
        self.batches += 1
        for k, v in unseen.items():
            self.unseen[k] = self.unseen.get(k, 0) + v

    def snapshot(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "batches": self.batches,
            "unseen": dict(self.unseen),
            "first_t": self.first_t,
            "first_rows": self.first_rows,
            "last_t": self.last_t,
            "actor_start_s": list(self.actor_start_s),
            "ready_t": list(self.ready_t),
            "events": list(self.events),
        }


class Scorer:
    """One Ray Data actor: loads the exported model once, then maps and scores batches.

    Memory: the program (its embedding tables and towers) plus the batch in hand and its ``[B, F]`` ids.
    """

    def __init__(
        self,
        model_dir: str,
        ids: IdsMode,
        keep: list[str],
        strict: bool,
        device: str,
        threads: int,
        counter: Any,
    ):
        t0 = time.perf_counter()
        import ray
        import torch

        from cstwa_dist.export.artifact import load_model

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.model = load_model(model_dir)
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.model.module.to(self.device)
        self.outputs = list(self.model.manifest["outputs"])
        self.mapper = IdMapper(
            self.model.manifest["fields"], self.model.manifest["table_rows"], self.model.vocab, ids
        )
        self.keep = keep
        self.strict = strict
        self.counter = counter
        ray.get(counter.started.remote(time.perf_counter() - t0))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        ids, unseen = self.mapper.map(batch)
        if self.strict and any(unseen.values()):
            name = next(k for k, v in unseen.items() if v)
            raise DataError(f"{_UNSEEN_TAG}: field {name!r} has an unseen id")
        t = self.torch.from_numpy(ids)
        if self.device.type == "cpu":
            probs = self.model.predict(t)
        else:
            with self.torch.inference_mode():
                probs = self.model.module(t.to(self.device, non_blocking=True)).float().cpu()
        p = probs.numpy()
        out = {c: batch[c] for c in self.keep}
        for j, name in enumerate(self.outputs):
            out[name] = np.ascontiguousarray(p[:, j], dtype=np.float32)
        ray.get(self.counter.add.remote(len(ids), unseen))  # counted once scored, before it is written
        return out


class _ProgressLogger(threading.Thread):
    """Driver thread: logs ``rows done/total (rows/s)`` from the counter every ``every_s`` seconds."""

    def __init__(self, counter: Any, total: int, every_s: float):
        super().__init__(name="score-progress", daemon=True)
        self.counter, self.total, self.every_s = counter, total, every_s
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        import ray

        while not self.stop.wait(self.every_s):
            try:
                done = ray.get(self.counter.snapshot.remote(), timeout=self.every_s)["rows"]
            except Exception:  # a dying pipeline: the main thread reports why
                return
            dt = time.perf_counter() - self.t0
            log.info(
                "scored %d/%d rows (%.1f%%, %.0f rows/s)", done, self.total, 100 * done / max(self.total, 1),
                done / max(dt, 1e-9),
            )  # fmt: skip


def _steady_rate(snap: dict[str, Any]) -> float | None:
    """Rows/s once every actor had started: rows of the batches scored after the last actor's start-up
    over the time from it to the last batch (``None`` when fewer than two batches ended after it).

    Without the start-up (Ray worker, torch import, model load: seconds, whatever the input's size) this
    is the rate a long input approaches; a batch in flight at that moment counts whole, so on a short
    input it errs high by at most a batch per actor.
    """
    if not snap["ready_t"] or snap["last_t"] is None:
        return None
    ready = max(snap["ready_t"])
    after = [rows for t, rows in snap["events"] if t > ready]
    if len(after) < 2 or snap["last_t"] <= ready:
        return None
    return sum(after) / (snap["last_t"] - ready)


def _output_rows(folder: Path) -> tuple[list[Path], int]:
    files = sorted(folder.glob("*.parquet"))
    return files, sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _is_data_stop(exc: BaseException) -> bool:
    """Whether Ray's wrapped error came from a :class:`DataError` raised in an actor."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, DataError):
            return True
        seen = seen.__cause__ or seen.__context__
    text = f"{type(exc).__name__}: {exc}"
    return "DataError" in text or _UNSEEN_TAG in text


@contextlib.contextmanager
def _ray_data_errors_muted() -> Iterator[None]:
    """Ray Data logs a failed task's error (and a stack) itself before raising it; the exception raised
    here says the same in one line (file, row, field for a data stop), so its own lines stay silent."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _replace_folder(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; an existing ``out`` (``--force``) is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def score(
    model_dir: str | Path, source: str | Path, out: str | Path, options: ScoreOptions
) -> dict[str, Any]:
    """Scores ``source`` with the model in ``model_dir`` into ``out``; returns what ``score.json`` holds.

    Opens the project's Ray runtime (:class:`~cstwa_dist.runtime.RayRuntime`: attaches to the node's, or
    starts a private loopback one with a token; reused if the caller already has one).
    """
    import ray
    import ray.data

    from cstwa_dist.data.shares import SplitPlan
    from cstwa_dist.data.stream import TASK_ROWS, SliceDatasource
    from cstwa_dist.export.artifact import verify_files
    from cstwa_dist.runtime import RayRuntime

    t_start = time.perf_counter()
    out = Path(out)
    if not options.force:
        check_fresh_output(out, "score output")
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; --force replaces only a folder")
    model = ModelInfo.load(model_dir)
    verify_files(model.path, model.manifest)  # a damaged model fails here in one line, not in an actor
    inp = resolve_input(source, options, model)
    if inp.rows == 0:
        raise ScoreError(f"{source}: its {len(inp.files)} Parquet file(s) hold no rows; nothing to score")
    keep = list(model.fields) + inp.labels
    actors = options.actors or default_actors()
    log.info(
        "scoring %s: %d rows, ids as %s, with %s (%s) on %d actor(s), batches of %d",
        inp.describe(), inp.rows, inp.ids, model.path, model.manifest.get("model"), actors,
        options.batch_size,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with RayRuntime():
            t_ready = time.perf_counter()
            cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            actor_cpus = options.actor_cpus
            if actor_cpus is None:
                actor_cpus = min(1.0, max(cpus - 1.0, 0.5 * cpus) / actors)
            threads = options.threads or 1
            counter = ray.remote(num_cpus=0)(ScoreCounter).remote()
            # the project's row-group reader (cstwa_dist.data.stream): no re-listing of the files, and read
            # tasks small enough that every actor has a block from the start (read_parquet made one block
            # of the demo's 8 small files, so one actor of two got all the work)
            plan = SplitPlan(inp.files)
            slices = plan.slices(plan.order(0, 0, shuffle=False), 0, plan.total_rows)
            task_rows = max(1024, min(TASK_ROWS, -(-inp.rows // (2 * actors))))
            reader = SliceDatasource([str(f) for f in inp.files], slices, keep, task_rows=task_rows)
            ds = ray.data.read_datasource(reader, override_num_blocks=max(1, len(reader.groups)))
            ctx = ds.context  # per-dataset copy: these settings do not leak into other datasets
            ctx.execution_options.preserve_order = options.preserve_order
            ctx.enable_progress_bars = False
            ctx.enable_operator_progress_bars = False
            ctx.enable_auto_log_stats = False
            gpus = {"num_gpus": 1} if options.device == "cuda" else {}
            ds = ds.map_batches(
                Scorer,
                fn_constructor_kwargs={
                    "model_dir": str(model.path),
                    "ids": inp.ids,
                    "keep": keep,
                    "strict": options.strict,
                    "device": options.device,
                    "threads": threads,
                    "counter": counter,
                },
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=actor_cpus,
                **gpus,
            )
            progress = _ProgressLogger(counter, inp.rows, options.progress_every_s)
            progress.start()
            t_exec = time.perf_counter()
            try:
                with _ray_data_errors_muted():
                    ds.write_parquet(str(staging))
            except Exception as e:
                if not _is_data_stop(e):
                    raise
                found = locate_first_problem(
                    inp.files,
                    IdMapper(model.fields, model.table_rows, model.vocab, inp.ids),
                    unseen=options.strict,
                )
                if found is None:
                    raise
                raise found from None
            finally:
                progress.stop.set()
            t_done = time.perf_counter()
            snap = ray.get(counter.snapshot.remote())
            ray.kill(counter)
        files, rows_out = _output_rows(staging)
        if rows_out != inp.rows or snap["rows"] != inp.rows:
            raise ScoreError(
                f"{out}: wrote {rows_out} rows (scored {snap['rows']}) for {inp.rows} input rows; the output "
                "is incomplete and was not kept — rerun, and report it if it repeats"
            )
        for i, f in enumerate(files):  # Ray's names are <uuid>_<task>_<block>; order kept, names made plain
            f.rename(staging / f"part-{i:05d}.parquet")
        execute_s = t_done - t_exec
        steady = _steady_rate(snap)
        seconds = time.perf_counter() - t_start
        report = {
            "rows_in": inp.rows,
            "rows_out": rows_out,
            "unseen": {f: int(snap["unseen"].get(f, 0)) for f in model.fields},
            "unseen_total": int(sum(snap["unseen"].values())),
            "seconds": seconds,
            "rows_per_s": inp.rows / max(seconds, 1e-9),
            "execute_s": execute_s,
            "rows_per_s_execute": inp.rows / max(execute_s, 1e-9),
            "rows_per_s_steady": steady,
            "runtime_start_s": t_ready - t_start,
            "actor_start_s": snap["actor_start_s"],
            "model": model.manifest.get("model"),
            "source": model.manifest.get("source"),
            "model_dir": str(model.path),
            "input": str(source),
            "split": options.split if inp.dataset is not None else None,
            "ids": inp.ids,
            "files_in": len(inp.files),
            "files_out": len(files),
            "columns": keep + model.outputs,
            "actors": actors,
            "actor_cpus": actor_cpus,
            "threads_per_actor": threads,
            "batch_size": options.batch_size,
            "device": options.device,
            "strict": options.strict,
        }
        atomic_write_json(staging / "score.json", report, sort_keys=False)
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    unseen = {k: v for k, v in report["unseen"].items() if v}
    log.info(
        "scored %d rows in %.1fs (%.0f rows/s; %.0f rows/s steady) -> %s; unseen ids: %s",
        rows_out, seconds, report["rows_per_s"], steady or float("nan"), out, unseen or "none",
    )  # fmt: skip
    return report
