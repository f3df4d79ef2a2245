"""Validation that loses nothing: the quarantine and line accounting every importer runs under.

Why: real input files have bad lines, and an importer that drops or repairs them silently makes every
number computed on the data set unverifiable. So a bad line is never dropped silently nor repaired. It is
counted by reason in ``stats.json`` (``extra.quarantine`` of its split), written with its file, 1-based
line number, reason and raw text to ``<out>/quarantine/<split>.jsonl``, and summarised in the log;
``strict=True`` raises a :class:`~cstwa_dist.data.validate.DataError` for the first one instead. Every
input file balances: ``input_lines = written + quarantined``, asserted before the data set is renamed into
place (the Ali-CCP specifics are in ``docs/method.md §6``).

:func:`staged_import` is the frame both importers run in: a staging folder
(:func:`cstwa_dist.fs.staged_directory`), the quarantine inside it, and at the end the accounting check,
the peak RSS, ``spec.yaml`` + ``stats.json`` and the rename. It is written once so that the two importers
cannot differ in what a finished import guarantees.

Bad input stops early and clearly. Quarantining a few stray lines is right, but an import that
quarantines a large share of a file (a spec with the wrong vocabulary, the wrong file, a missing common
file) would otherwise end with exit 0 and a data set that silently lacks most of its rows. So after each
input file's pass, and for each split at the end, the share of quarantined lines is compared with
``max_quarantine_fraction`` (:data:`DEFAULT_MAX_QUARANTINE_FRACTION`): above it the import fails with a
:class:`QuarantineLimitError` naming the file, the share, the top reasons and the first bad line, and the
quarantine files are moved to ``<out>.quarantine/`` so the bad lines can be read, while nothing appears at
``out``. A split that ends up with 0 rows is an error too, unless ``allow_empty_splits``.

Both importers open their input files through the same helpers (:func:`check_text_input`,
:func:`open_input`, :func:`scan_lines`), so that a folder or a zip given as a file, a gzip file (read on
the fly, found by its magic bytes) and a gzip file cut short are treated, and worded, alike.

This is a sibling of :mod:`cstwa_dist.data.writer` rather than part of it because the generator, which
also writes through the writer, has no input lines and nothing to quarantine.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cstwa_dist.data.progress import peak_rss_mb
from cstwa_dist.data.spec import SPLITS, DatasetSpec, SplitStats
from cstwa_dist.data.validate import DataError
from cstwa_dist.data.writer import write_metadata
from cstwa_dist.fs import staged_directory

logger = logging.getLogger(__name__)

# Quarantine reasons (the keys of ``extra.quarantine`` in stats.json), across both importers.
WRONG_COLUMN_COUNT = "wrong_column_count"
BAD_FEATURE_LIST = "bad_feature_list"
NON_INTEGER_ID = "non_integer_id"
ID_OUT_OF_RANGE = "id_out_of_range"
BAD_LABEL = "bad_label"
PURCHASE_WITHOUT_CLICK = "purchase_without_click"
UNKNOWN_COMMON_KEY = "unknown_common_key"
COMMON_FEATURES_QUARANTINED = "common_features_quarantined"
DUPLICATE_COMMON_KEY = "duplicate_common_key"
REPEATED_FIELD = "repeated_field"
BAD_KEY = "bad_key"
# The last line of a file that ends without a newline and fails the line checks: the file was cut
# mid-line (an interrupted download or unpack), which the importers also warn about loudly.
TRUNCATED_LINE = "truncated_line"

# A sound export has no bad line or a few stray ones; more than 1 % of a file means a systematic problem
# (wrong spec or vocabulary, wrong file, wrong format) that training on the remaining rows would hide.
DEFAULT_MAX_QUARANTINE_FRACTION = 0.01


class QuarantineLimitError(DataError):
    """More of an input file (or split) was quarantined than ``max_quarantine_fraction`` allows."""


def check_fraction(value: float) -> float:
    """``max_quarantine_fraction`` must be a share: 0 fails on any bad line, 1 never fails."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--max-quarantine-fraction must be in [0, 1], got {value:g}")
    return value


class Quarantine:
    """Bad input lines: one JSONL file per split under ``<out>/quarantine``, counts by split/file/reason.

    ``strict=True`` makes :meth:`add` raise a :class:`DataError` instead of writing, so a pipeline that
    must not run on imperfect data stops at the first bad line with its file, line and reason.
    """

    def __init__(self, directory: Path, *, strict: bool) -> None:
        self.directory = directory
        self.strict = strict
        self.by_split: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        self.by_file: dict[str, Counter[str]] = {}
        self.by_split_file: dict[tuple[str, str], Counter[str]] = {}
        # first bad line per (split, file), in the order first seen: (line, reason, detail)
        self.first: dict[tuple[str, str], tuple[int, str, str]] = {}
        self._handles: dict[str, IO[str]] = {}
        self._closed = False
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, split: str, file: str, line: int, reason: str, raw: str, detail: str = "") -> None:
        if self.strict:
            suffix = f" ({detail})" if detail else ""
            raise DataError(f"{file} line {line}: {reason}{suffix}; raw line: {raw[:200]!r}")
        handle = self._handles.get(split)
        if handle is None:
            handle = self._handles[split] = open(self.directory / f"{split}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        record: dict[str, Any] = {"file": file, "line": int(line), "reason": reason, "raw": raw}
        if detail:
            record["detail"] = detail
        handle.write(json.dumps(record) + "\n")
        self.by_split[split][reason] += 1
        self.by_file.setdefault(file, Counter())[reason] += 1
        self.by_split_file.setdefault((split, file), Counter())[reason] += 1
        seen = self.first.get((split, file))
        if seen is None or line < seen[0]:
            self.first[(split, file)] = (int(line), reason, detail)

    def file_total(self, file: str) -> int:
        return sum(self.by_file.get(file, Counter()).values())

    def counts(self, split: str, file: str | None = None) -> dict[str, int]:
        """Bad lines that went to one split (of one ``file``, or of all), by reason (sorted, JSON-ready)."""
        found = self.by_split[split] if file is None else self.by_split_file.get((split, file), Counter())
        return dict(sorted(found.items()))

    def accounting(self, file: str, input_lines: int, written: int) -> dict[str, int]:
        """One input file's side of the identity ``input_lines = written + quarantined``."""
        return {"input_lines": input_lines, "written": written, "quarantined": self.file_total(file)}

    def close(self) -> None:
        """Closes the files and creates an empty one for every split without bad lines (a fixed layout).

        Idempotent: a failed import closes it, moves the folder away, and the frame closes it again.
        """
        if self._closed:
            return
        self._closed = True
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        for split in SPLITS:
            (self.directory / f"{split}.jsonl").touch()

    def log_summary(self, what: str, directory: Path | None = None) -> None:
        """Logs the counts per split; ``directory`` is where the files are now (after the rename)."""
        directory = directory or self.directory
        for split in SPLITS:
            counts = self.by_split[split]
            if counts:
                logger.warning(
                    "%s: %d %s lines quarantined (%s) -> %s",
                    what,
                    sum(counts.values()),
                    split,
                    ", ".join(f"{r}={n}" for r, n in sorted(counts.items())),
                    directory / f"{split}.jsonl",
                )
        if not any(self.by_split.values()):
            logger.info("%s: no line quarantined", what)


GZIP_MAGIC = b"\x1f\x8b"
# Other compressed or binary formats a user may hand over instead of a CSV file: named in the error,
# rather than parsed as text and quoted back as mojibake.
_OTHER_FORMATS = {
    b"PK\x03\x04": "a zip archive (or an .xlsx workbook)",
    b"PAR1": "a Parquet file",
    b"BZh": "a bzip2 file",
    b"\xfd7zXZ": "an xz file",
    b"\x28\xb5\x2f\xfd": "a zstd file",
}


def is_gzip(path: Path) -> bool:
    """Whether ``path`` is gzip-compressed, by its magic bytes (a ``.gz`` suffix is neither needed nor
    trusted: Ali-CCP mirrors and ``gzip -k`` leave both spellings around)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def check_text_input(path: Path, what: str) -> None:
    """Raises a one-line :class:`DataError` if ``path`` is a folder or a binary format we do not read
    (gzip is read transparently, so it passes); a missing file is a :class:`FileNotFoundError`."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, expected {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise DataError(
                f"{path} is {kind}, expected {what} (plain text or gzip): unpack or export it as CSV first"
            )


def open_input(path: Path) -> IO[bytes]:
    """The bytes of an input file, decompressed on the fly if it is gzip (:func:`is_gzip`)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # noqa: SIM115


def damaged_gzip(path: Path, exc: BaseException) -> DataError:
    """The one-line error for a gzip stream that cannot be read to its end (a cut download)."""
    return DataError(
        f"{path} is gzip-compressed but cannot be read to its end ({type(exc).__name__}: {exc}); the "
        "file is truncated or damaged (an interrupted download?): download it again"
    )


def scan_lines(path: Path, block: int = 16 << 20) -> tuple[int, bool]:
    """Physical lines of a file (a last line without newline counts) and whether its last byte is a
    newline (a file cut mid-line ends without one), read in blocks: bounded memory. A gzip file's lines
    are those of its decompressed text."""
    n = 0
    last = b"\n"
    try:
        with open_input(path) as f:
            while data := f.read(block):
                n += data.count(b"\n")
                last = data[-1:]
    except (EOFError, OSError, zlib.error) as e:
        if not is_gzip(path):
            raise
        raise damaged_gzip(path, e) from e
    return n + (0 if last == b"\n" else 1), last == b"\n"


def count_lines(path: Path, block: int = 16 << 20) -> int:
    """Physical lines of a file (:func:`scan_lines`)."""
    return scan_lines(path, block)[0]


def check_accounting(files: dict[str, dict[str, int]]) -> None:
    """The identity the importers promise: every input line is written or quarantined, per file."""
    for name, acc in files.items():
        if acc["input_lines"] != acc["written"] + acc["quarantined"]:
            raise AssertionError(
                f"{name}: {acc['input_lines']} input lines != {acc['written']} written + "
                f"{acc['quarantined']} quarantined; the importer lost or invented lines (a bug)"
            )


@dataclass
class ImportRun:
    """An import in progress: its staging folder, its quarantine and the accounting of its input files.

    ``files`` maps a name (as it should appear in error messages and ``stats.json``) to the file's
    :meth:`Quarantine.accounting`; importers record each file with :meth:`add_file` right after its pass,
    which also applies ``max_quarantine_fraction`` to it, and :meth:`finish` checks them all again, plus
    every split's share and that no split is empty (unless ``allow_empty_splits``).
    """

    directory: Path
    quarantine: Quarantine
    out: Path = Path(".")
    command: str = "import"
    max_quarantine_fraction: float = DEFAULT_MAX_QUARANTINE_FRACTION
    allow_empty_splits: bool = False
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # name in ``files`` -> file key in the quarantine
    peak_rss_mb: float = 0.0
    stats: dict[str, SplitStats] = field(default_factory=dict)
    note: str = ""
    finished: bool = False
    t0: float = field(default_factory=time.perf_counter)

    def add_file(self, name: str, source: str, accounting: dict[str, int]) -> None:
        """Records one input file's accounting (``source``: its name in the quarantine) and fails the
        import now if too much of it was quarantined, before later passes spend time on a lost cause."""
        self.files[name] = accounting
        self.sources[name] = source
        self._check_file(name)

    def _check_file(self, name: str) -> None:
        acc = self.files[name]
        source = self.sources.get(name, name)
        reasons: Counter[str] = self.quarantine.by_file.get(source, Counter())
        firsts = [(v, f) for (_, f), v in self.quarantine.first.items() if f == source]
        first = min(firsts) if firsts else None
        splits = sorted({s for (s, f) in self.quarantine.by_split_file if f == source}, key=SPLITS.index)
        self._check_share(source, acc["input_lines"], acc["quarantined"], reasons, first, splits)

    def _check_split(self, split: str, st: SplitStats) -> None:
        e = st.extra
        firsts = [(v, f) for (s, f), v in self.quarantine.first.items() if s == split]
        self._check_share(
            f"split {split!r} ({e.get('source', '?')})",
            int(e.get("input_lines", 0)),
            int(e.get("quarantined", 0)),
            Counter(e.get("quarantine", {})),
            firsts[0] if firsts else None,
            [split],
        )

    def _check_share(
        self,
        what: str,
        total: int,
        bad: int,
        reasons: Counter[str],
        first: tuple[tuple[int, str, str], str] | None,
        splits: list[str],
    ) -> None:
        """Raises :class:`QuarantineLimitError` (one line) if ``bad / total`` exceeds the limit."""
        limit = self.max_quarantine_fraction
        if total == 0 or bad / total <= limit:
            return
        top = ", ".join(f"{r}={n}" for r, n in reasons.most_common(3)) or "-"
        example = ""
        if first is not None:
            (line, reason, detail), file = first
            example = f"; first: {Path(file).name} line {line}: {reason}" + (f" ({detail})" if detail else "")
        kept = self.keep_quarantine()
        where = (
            "bad lines kept in " + ", ".join(str(kept / f"{s}.jsonl") for s in splits)
            if kept is not None
            else f"quarantine not kept ({self.quarantine_keep_path} exists and is not a quarantine folder)"
        )
        raise QuarantineLimitError(
            f"{self.command}: {bad} of {total} lines ({bad / total:.1%}) of {what} were quarantined, above "
            f"--max-quarantine-fraction {limit:g} (reasons: {top}{example}); {where}; nothing was written "
            f"to {self.out}. Fix the input (or spec), or raise --max-quarantine-fraction if this is expected."
        )

    @property
    def quarantine_keep_path(self) -> Path:
        return self.out.parent / f"{self.out.name}.quarantine"

    def keep_quarantine(self) -> Path | None:
        """Moves the quarantine out of the staging folder (which a failed import removes) to
        ``<out>.quarantine/``, so the bad lines that failed the import can be read; replaces an earlier
        failed import's folder there, but nothing else (returns ``None`` then)."""
        self.quarantine.close()
        dest = self.quarantine_keep_path
        if dest.exists():
            names = {f"{s}.jsonl" for s in SPLITS}
            if not dest.is_dir() or any(not (q.is_file() and q.name in names) for q in dest.iterdir()):
                return None
            shutil.rmtree(dest)
        shutil.move(str(self.quarantine.directory), dest)
        return dest

    def _check_not_empty(self, stats: dict[str, SplitStats]) -> None:
        if self.allow_empty_splits:
            return
        for split in SPLITS:
            e = stats[split].extra
            if stats[split].rows == 0:
                lines, bad, source = e.get("input_lines", 0), e.get("quarantined", 0), e.get("source", "?")
                raise DataError(
                    f"{self.command}: split {split!r} would have 0 rows ({lines} input lines of {source}, "
                    f"{bad} quarantined); nothing was written to {self.out}"
                )

    def finish(
        self,
        spec: DatasetSpec,
        stats: dict[str, SplitStats],
        extra: dict[str, Any] | None = None,
        note: str = "",
        *,
        progress: bool = True,
    ) -> None:
        """Closes the quarantine, checks the accounting, the quarantined share of every file and split and
        that no split is empty, stamps the peak RSS (and ``extra``) on every split and writes the entity
        tables, ``spec.yaml`` and ``stats.json`` (:func:`write_metadata`): everything a finished import
        must hold.

        ``note`` is appended to the closing log line (what the importer alone knows, e.g. its rate);
        ``progress`` says whether the entity scan's progress lines are INFO (else DEBUG).
        """
        self.quarantine.close()
        check_accounting(self.files)
        for name in self.files:
            self._check_file(name)
        for split in SPLITS:
            self._check_split(split, stats[split])
        self._check_not_empty(stats)
        self.peak_rss_mb = peak_rss_mb()
        for s in stats.values():
            s.extra["peak_rss_mb"] = round(self.peak_rss_mb, 1)
            s.extra["max_quarantine_fraction"] = self.max_quarantine_fraction
            s.extra.update(extra or {})
        write_metadata(self.directory, spec, stats, progress=progress)
        self.stats, self.note, self.finished = stats, note, True


@contextlib.contextmanager
def staged_import(
    out: Path,
    *,
    strict: bool,
    command: str,
    max_quarantine_fraction: float = DEFAULT_MAX_QUARANTINE_FRACTION,
    allow_empty_splits: bool = False,
) -> Iterator[ImportRun]:
    """The frame of an import into ``out``: yields an :class:`ImportRun` whose folder becomes ``out``.

    The body must end with :meth:`ImportRun.finish`; the folder is then renamed to ``out``, and the
    quarantine and the split sizes are logged under ``command``. On an exception nothing appears at
    ``out`` (a :class:`QuarantineLimitError` leaves the bad lines in ``<out>.quarantine/``).
    """
    out = Path(out)
    limit = check_fraction(max_quarantine_fraction)
    with staged_directory(out, "data set") as tmp:
        run = ImportRun(
            tmp,
            Quarantine(tmp / "quarantine", strict=strict),
            out=out,
            command=command,
            max_quarantine_fraction=limit,
            allow_empty_splits=allow_empty_splits,
        )
        try:
            yield run
        except BaseException:
            run.quarantine.close()  # release the open files; the staging folder is removed anyway
            raise
        if not run.finished:
            raise AssertionError(f"{command}: the importer did not finish its run (a bug)")
    run.quarantine.log_summary(f"{command} {out}", out / "quarantine")
    logger.info(
        "%s -> %s: train/val/test %d/%d/%d rows in %.1fs, peak RSS %.0f MiB%s",
        command,
        out,
        *(run.stats[s].rows for s in SPLITS),
        time.perf_counter() - run.t0,
        run.peak_rss_mb,
        run.note,
    )
