"""The Ali-CCP import, end to end: argument checks, the passes over the four files, the statistics.

Passes over ``sample_skeleton_train.csv``: a newline count (cheap; gives every chunk its first line
number), pass 1 counts ids of train lines (storing nothing per sample), pass 2 remaps and writes train and
val. The test file is read once (after pass 2, with the train vocabulary). Each common-features file is
read into its table just before its skeleton file, and dropped after it, so one table is held at a time.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

from cstwa_dist.data.aliccp.executor import ChunkExecutor
from cstwa_dist.data.aliccp.fields import FILES, resolve_fields
from cstwa_dist.data.aliccp.passes import build_common, count_pass, number_chunks, write_pass
from cstwa_dist.data.aliccp.release import check_release, warn_unterminated
from cstwa_dist.data.aliccp.tasks import Context, run_chunk
from cstwa_dist.data.aliccp.vocab import build_vocab, check_previous
from cstwa_dist.data.quarantine import (
    DEFAULT_MAX_QUARANTINE_FRACTION,
    ImportRun,
    check_fraction,
    check_text_input,
    damaged_gzip,
    open_input,
    staged_import,
)
from cstwa_dist.data.spec import SPLITS, DatasetSpec, SplitStats
from cstwa_dist.data.validate import DataError
from cstwa_dist.data.vocab import VOCAB_DIR, Vocabulary
from cstwa_dist.data.writer import SplitAccumulator, default_rows_per_file

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20  # ~35k skeleton lines: worth a task; parse lists of a chunk stay ~50 MB
PARALLEL_THRESHOLD_BYTES = 512 << 20  # below this a Ray runtime (2-3 s, ~2.5 GB) costs more than it saves


def import_aliccp(
    raw: Path,
    out: Path,
    *,
    min_count: int = 10,
    fields: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    max_quarantine_fraction: float = DEFAULT_MAX_QUARANTINE_FRACTION,
    allow_empty_splits: bool = False,
    parallel: bool | None = None,
    progress: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_from: Path | None = None,
) -> dict[str, SplitStats]:
    """Imports raw Ali-CCP from ``raw`` into ``out`` (package docstring: protocol, memory, validation).

    ``parallel=None`` runs Ray tasks when the four files together exceed
    :data:`PARALLEL_THRESHOLD_BYTES`; ``chunk_bytes`` only changes how work is cut, never the output.
    Returns the per-split statistics (also in ``<out>/stats.json``). Raises ``FileExistsError`` if
    ``out`` is a non-empty directory and, with ``strict``, a ``DataError`` at the first bad line.

    Bad input stops early, with one line naming the file and the cause (a ``ValueError``): an unknown
    field id, an empty raw file (checked before any pass), a kept field that occurs on no train line,
    more than ``max_quarantine_fraction`` of any file or split quarantined
    (:class:`~cstwa_dist.data.quarantine.QuarantineLimitError`, checked after each file's pass) and a
    split with 0 rows (unless ``allow_empty_splits``, for hand-made test inputs). Nothing is written to
    ``out`` then.

    ``vocab_from`` (an earlier import-aliccp data set, e.g. yesterday's): its raw ids keep their rows and
    the ids new today are appended (:func:`~cstwa_dist.data.aliccp.vocab.build_vocab`), so a model trained
    on it can be warm-started; a data set without table vocabularies or with other fields is refused
    before any pass. Every import writes ``<out>/vocab/`` (:mod:`cstwa_dist.data.vocab`).
    """
    raw, out = Path(raw), Path(out)
    kept = resolve_fields(fields)
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    max_quarantine_fraction = check_fraction(max_quarantine_fraction)
    paths = resolve_raw_files(raw)
    previous = None
    if vocab_from is not None:
        previous = Vocabulary.load(vocab_from)
        check_previous(previous, kept, str(vocab_from))
    total = sum(p.stat().st_size for p in paths.values())
    if parallel is None:
        parallel = total > PARALLEL_THRESHOLD_BYTES
    logger.info(
        "import-aliccp %s -> %s: %.1f MiB raw, %s, fields %s, min_count=%d, val_fraction=%g, seed=%d",
        raw,
        out,
        total / 2**20,
        "parallel (Ray tasks)" if parallel else "single process",
        list(kept),
        min_count,
        val_fraction,
        seed,
    )
    with staged_import(
        out,
        strict=strict,
        command="import-aliccp",
        max_quarantine_fraction=max_quarantine_fraction,
        allow_empty_splits=allow_empty_splits,
    ) as run:
        with ChunkExecutor(run_chunk, parallel) as ex:
            stats, spec = _import(
                ex,
                paths,
                run,
                kept,
                int(min_count),
                float(val_fraction),
                int(seed),
                progress,
                int(chunk_bytes),
                previous,
            )
        if vocab_from is not None:
            stats["train"].extra["vocab_from"] = str(vocab_from)
        dt = time.perf_counter() - run.t0
        lines = sum(s.extra["input_lines"] for s in stats.values())
        extra = {
            "peak_rss_mb_worker": round(ex.worker_rss, 1) if parallel else None,
            "parallel": bool(parallel),
            "seconds": round(dt, 2),
            "lines_per_s": round(lines / max(dt, 1e-9), 1),
        }
        note = f", {lines} sample lines ({lines / max(dt, 1e-9):.0f} lines/s)"
        if parallel:
            note += f", busiest Ray worker {ex.worker_rss:.0f} MiB"
        run.finish(spec, stats, extra, note, progress=progress)
    return stats


def resolve_raw_files(raw: Path) -> dict[str, Path]:
    """The four raw files, each as ``<name>`` or ``<name>.gz`` (gzip is read on the fly, found by its
    magic bytes), checked before any pass: present, a file (not a folder nor another archive format),
    and not empty once decompressed. Where both spellings exist the plain one is read (faster)."""
    if raw.exists() and not raw.is_dir():
        raise DataError(f"--raw {raw} is a file, expected the folder holding the four Ali-CCP files")
    paths: dict[str, Path] = {}
    missing = []
    for role, name in FILES.items():
        plain, packed = raw / name, raw / f"{name}.gz"
        path = plain if plain.exists() or not packed.exists() else packed
        if not path.exists():
            missing.append(str(plain))
            continue
        check_text_input(path, f"the Ali-CCP file {name}")
        if path == plain and packed.exists():
            logger.info("%s and %s both exist: reading %s", plain, packed.name, plain.name)
        paths[role] = path
    if missing:
        raise FileNotFoundError(
            f"Ali-CCP raw files not found: {missing} (nor as .gz); download and unpack the Tianchi data "
            "set (id 408)"
        )
    empty = [str(p) for p in paths.values() if _is_empty(p)]
    if empty:  # every Ali-CCP file has lines; an empty one is a failed download or unpack
        raise DataError(
            f"Ali-CCP raw files are empty (0 bytes, no line): {empty}; every one of the four must hold "
            "data: unpack sample_train.tar.gz and sample_test.tar.gz (Tianchi data set 408) again"
        )
    return paths


def _is_empty(path: Path) -> bool:
    """No byte (a gzip file: no decompressed byte)."""
    if path.stat().st_size == 0:
        return True
    try:
        with open_input(path) as f:
            return f.read(1) == b""
    except (EOFError, OSError, zlib.error) as e:
        raise damaged_gzip(path, e) from e


def _import(
    ex: ChunkExecutor,
    paths: dict[str, Path],
    run: ImportRun,
    fields: tuple[str, ...],
    min_count: int,
    val_fraction: float,
    seed: int,
    progress: bool,
    chunk_bytes: int,
    previous: Vocabulary | None = None,
) -> tuple[dict[str, SplitStats], DatasetSpec]:
    quarantine = run.quarantine

    # train file: common table, pass 1 (vocab), pass 2 (train + val)
    skel = paths["skeleton_train"]
    table, acc = build_common(ex, paths["common_train"], "train", fields, chunk_bytes, quarantine, progress)
    run.add_file(paths["common_train"].name, str(paths["common_train"]), acc)
    chunks, n_train_lines, ends_with_newline = number_chunks(ex, skel, chunk_bytes)
    check_release(skel, n_train_lines)
    ctx = Context(fields, seed, val_fraction, table=table)
    counts, rows = count_pass(ex, chunks, n_train_lines, ctx, skel, quarantine, progress)
    vocab, spec, vocab_info, vocabulary = build_vocab(fields, counts, min_count, previous)
    del counts
    vocabulary.save(run.directory / VOCAB_DIR)  # inside the staged folder: appears with the data set
    del vocabulary
    absent = [f for f, d in vocab_info.items() if d["raw_distinct"] == 0]
    if absent and rows[0]:  # no good train line at all is reported after pass 2, with its reasons
        raise DataError(
            f"fields {absent} occur on none of the {rows[0]} good train lines of {skel} (nor in "
            f"{paths['common_train'].name}): their columns would be constant 0; drop them from --fields"
        )
    logger.log(
        logging.INFO if progress else logging.DEBUG,
        "aliccp vocab (min_count=%d): %s",
        min_count,
        ", ".join(f"{f}={d['vocab_size']}" for f, d in vocab_info.items()),
    )
    writers = {
        s: SplitAccumulator(run.directory / s, spec, default_rows_per_file(max(n, 1)), zero_is_unknown=True)
        for s, n in zip(("train", "val"), rows, strict=True)
    }
    ctx = Context(fields, seed, val_fraction, table=table, vocab=vocab)
    share, acc = write_pass(
        ex,
        chunks,
        n_train_lines,
        ctx,
        skel,
        ("train", "val"),
        writers,
        quarantine,
        progress,
        "pass 2 (write)",
    )
    warn_unterminated(skel, n_train_lines, ends_with_newline, quarantine)
    run.add_file(skel.name, str(skel), acc)
    if share["val"] == 0 and n_train_lines and not run.allow_empty_splits:
        raise DataError(
            f"val_fraction {val_fraction:g} puts none of the {n_train_lines} lines of {skel} into the "
            "validation split; raise --val-fraction"
        )
    del table, ctx
    stats = {s: writers[s].close() for s in ("train", "val")}

    # test file: its own common table, one pass with the train vocabulary
    skel_t = paths["skeleton_test"]
    table, acc = build_common(ex, paths["common_test"], "test", fields, chunk_bytes, quarantine, progress)
    run.add_file(paths["common_test"].name, str(paths["common_test"]), acc)
    chunks, n_test_lines, ends_with_newline = number_chunks(ex, skel_t, chunk_bytes)
    check_release(skel_t, n_test_lines)
    writers["test"] = SplitAccumulator(
        run.directory / "test", spec, default_rows_per_file(max(n_test_lines, 1)), zero_is_unknown=True
    )
    ctx = Context(fields, seed, 0.0, table=table, vocab=vocab)
    share_t, acc = write_pass(
        ex, chunks, n_test_lines, ctx, skel_t, ("test", "test"), writers, quarantine, progress, "(write test)"
    )
    warn_unterminated(skel_t, n_test_lines, ends_with_newline, quarantine)
    run.add_file(skel_t.name, str(skel_t), acc)
    del table, ctx
    stats["test"] = writers["test"].close()
    share.update(share_t)

    sources = {
        "train": [skel.name, paths["common_train"].name],
        "val": [skel.name],
        "test": [skel_t.name, paths["common_test"].name],
    }
    for split in SPLITS:
        s = stats[split]
        skel_name = sources[split][0]
        samples_bad = quarantine.counts(
            split, str(paths["skeleton_test" if split == "test" else "skeleton_train"])
        )
        s.extra.update(
            {
                # this split's share of the skeleton file's lines (val: lines hashed to val)
                "input_lines": share[split],
                "written": s.rows,
                "quarantined": sum(samples_bad.values()),
                "quarantine": samples_bad,
                "input_files": {name: run.files[name] for name in sources[split]},
                "source": skel_name,
            }
        )
        if split != "val":
            common = paths["common_test" if split == "test" else "common_train"]
            s.extra["quarantine_common_features"] = quarantine.counts(split, str(common))
        if s.extra["input_lines"] != s.rows + s.extra["quarantined"]:
            raise AssertionError(f"{split}: {s.extra['input_lines']} lines != written + quarantined (a bug)")
        if split == "train":
            s.extra.update(
                {"vocab": vocab_info, "min_count": min_count, "val_fraction": val_fraction, "seed": seed}
            )
    return stats, spec
