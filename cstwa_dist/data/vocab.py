"""A data set's vocabularies: which raw id each embedding row holds, and how that grows day by day.

Why: a model trained on day ``D-1`` can only be warm-started on day ``D`` (and an exported model can only
score raw ids) if every raw id keeps its row across imports. The vocabulary folder makes that mapping
explicit and checkable instead of implicit in how an importer happened to number ids.

Layout (``<dataset>/vocab/``)::

    vocab.json          {"format": 1, "fields": {<field>: {...}, ...}}   (spec field order)
    <field>.parquet     table fields only: int64 columns raw_id, row; one line per known raw id,
                        sorted by raw_id

A field is either

* ``identity`` (``{"kind": "identity", "size": N}``): raw id == row for rows ``[0, N)``. Synthetic data and
  ``import-csv`` (whose ids already are rows) are identity; so is every field of a data set without a
  ``vocab/`` folder (older data sets), over its spec's vocabulary sizes.
* ``table`` (``{"kind": "table", "size": N, "unknown_row": 0 | null, "file": ..., "lineage": [...]}``):
  the parquet file maps raw ids to rows. ``unknown_row`` is the row rare or absent ids were written as
  (Ali-CCP: 0), or null. ``lineage`` holds one ``{"size", "sha256"}`` entry per generation (day) the
  vocabulary grew through, the last one with the current size; the digest is :func:`lineage_digest` of the
  raw ids of rows ``[0, size)`` in row order. A newer vocabulary *extends* an older one
  (:meth:`Vocabulary.check_extends`) when the older's last ``(size, digest)`` is in its lineage, i.e.
  every old row still holds the same raw id.

Memory: :meth:`Vocabulary.rows` loads a table field's parquet once, on first use, and keeps its two int64
columns: 16 bytes per known id of that field while the :class:`Vocabulary` lives (an identity field holds
nothing). Nothing here imports torch: the data commands, the exporter and the scorer all read it.
The user-facing description (``--vocab-from``, synthetic days) is ``docs/data-days.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cstwa_dist.data.spec import DatasetSpec
from cstwa_dist.fs import atomic_path, atomic_write_json

VOCAB_DIR = "vocab"
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = 1
KINDS = ("identity", "table")

IdRows = tuple[np.ndarray, np.ndarray]  # (raw ids sorted ascending, their int64 rows)


class VocabError(ValueError):
    """A vocabulary that is malformed, or does not extend another one; the message names the field."""


@dataclass(frozen=True)
class FieldVocab:
    """One field's vocabulary (``file`` is the absolute path of a table field's parquet, else None)."""

    name: str
    kind: Literal["identity", "table"]
    size: int
    unknown_row: int | None
    lineage: tuple[tuple[int, str], ...]
    file: Path | None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "identity":
            return {"kind": "identity", "size": self.size}
        return {
            "kind": "table",
            "size": self.size,
            "unknown_row": self.unknown_row,
            "file": f"{self.name}.parquet",
            "lineage": [{"size": s, "sha256": d} for s, d in self.lineage],
        }


def lineage_digest(by_row: np.ndarray) -> str:
    """sha256 over the little-endian int64 bytes of the raw ids of consecutive rows (-1: no raw id)."""
    return hashlib.sha256(np.ascontiguousarray(by_row, dtype="<i8").tobytes()).hexdigest()


def by_row_array(raw_ids: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """The raw id of every row ``[0, size)`` (-1 for the unknown row or a row without a raw id)."""
    out = np.full(int(size), -1, dtype=np.int64)
    out[np.asarray(rows, dtype=np.int64)] = np.asarray(raw_ids, dtype=np.int64)
    return out


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise VocabError(f"field {name!r}: not usable as a vocabulary file name")


def table_field(
    name: str, by_row: np.ndarray, unknown_row: int | None, previous: FieldVocab | None = None
) -> tuple[FieldVocab, IdRows]:
    """A table field whose row ``r`` holds raw id ``by_row[r]`` (-1: none), and its ``(raw ids, rows)``.

    ``previous`` is the vocabulary this one grows from (its lineage is continued, an unchanged vocabulary
    adds no entry); the caller keeps its rows, which :meth:`Vocabulary.check_extends` verifies.
    """
    _check_name(name)
    by_row = np.asarray(by_row, dtype=np.int64)
    rows = np.flatnonzero(by_row >= 0).astype(np.int64)
    raw = by_row[rows]
    order = np.argsort(raw, kind="stable")
    raw, rows = raw[order], rows[order]
    if raw.size > 1 and not bool(np.all(raw[1:] > raw[:-1])):
        raise VocabError(f"field {name!r}: a raw id is on two rows")
    entry = (int(by_row.size), lineage_digest(by_row))
    lineage = previous.lineage if previous is not None else ()
    if not lineage or lineage[-1] != entry:
        lineage = (*lineage, entry)
    fv = FieldVocab(name, "table", int(by_row.size), unknown_row, tuple(lineage), None)
    return fv, (raw, rows)


class Vocabulary:
    """Every field's vocabulary of one data set (module docstring: format, memory)."""

    def __init__(self, fields: dict[str, FieldVocab], tables: dict[str, IdRows] | None = None) -> None:
        self.fields = dict(fields)
        self._tables: dict[str, IdRows] = dict(tables or {})  # loaded lazily from FieldVocab.file

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: DatasetSpec) -> Vocabulary:
        """Raw id == row for every field, over the spec's vocabulary sizes."""
        return cls(
            {f.name: FieldVocab(f.name, "identity", int(f.vocab_size), None, (), None) for f in spec.fields}
        )

    @classmethod
    def load(cls, path: str | Path, spec: DatasetSpec | None = None) -> Vocabulary:
        """From a data set folder, a ``vocab/`` folder, a run folder holding ``vocab.json``, or a
        ``vocab.json``. A data set without ``vocab/`` is identity over ``spec`` (or its own spec.yaml)."""
        path = Path(path)
        if path.is_dir():
            if (path / VOCAB_FILE).is_file():
                path = path / VOCAB_FILE
            elif (path / VOCAB_DIR / VOCAB_FILE).is_file():
                path = path / VOCAB_DIR / VOCAB_FILE
            elif (path / VOCAB_DIR).exists():
                raise VocabError(f"{path / VOCAB_DIR}: no {VOCAB_FILE} (an incomplete vocabulary folder)")
            else:
                if spec is None:
                    if not (path / "spec.yaml").is_file():
                        raise FileNotFoundError(f"{path}: neither a vocabulary nor a data set (no spec.yaml)")
                    spec = DatasetSpec.load(path)
                return cls.identity(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such vocabulary file")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VocabError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw, base=path.parent, source=str(path))

    @classmethod
    def from_json(cls, raw: Any, base: Path | None = None, source: str = "<dict>") -> Vocabulary:
        """Parses :meth:`to_json`'s content; table files are looked up in ``base`` (and must exist there)."""
        if (
            not isinstance(raw, dict)
            or raw.get("format") != VOCAB_FORMAT
            or not isinstance(raw.get("fields"), dict)
        ):
            raise VocabError(f"{source}: expected {{'format': {VOCAB_FORMAT}, 'fields': {{...}}}}")
        fields: dict[str, FieldVocab] = {}
        for name, d in raw["fields"].items():

            def bad(what: str, name: str = name) -> VocabError:
                return VocabError(f"{source}: field {name!r}: {what}")

            if not isinstance(d, dict) or d.get("kind") not in KINDS:
                raise bad(f"'kind' must be one of {list(KINDS)}")
            size = d.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"'size' must be an integer >= 0, got {size!r}")
            if d["kind"] == "identity":
                fields[name] = FieldVocab(name, "identity", size, None, (), None)
                continue
            _check_name(name)
            unk = d.get("unknown_row")
            if unk is not None and (not isinstance(unk, int) or isinstance(unk, bool) or not 0 <= unk < size):
                raise bad(f"'unknown_row' must be null or a row in [0, {size}), got {unk!r}")
            lin = d.get("lineage")
            try:
                lineage = tuple((int(e["size"]), str(e["sha256"])) for e in lin)
            except (TypeError, KeyError, ValueError):
                raise bad("'lineage' must be a list of {size, sha256}") from None
            if not lineage or lineage[-1][0] != size:
                raise bad(f"the last lineage entry must have the field's size {size}")
            if d.get("file") != f"{name}.parquet":
                raise bad(f"'file' must be {name}.parquet, got {d.get('file')!r}")
            file = None
            if base is not None:
                file = (base / d["file"]).resolve()
                if not file.is_file():
                    raise bad(f"table file {file} not found")
            fields[name] = FieldVocab(name, "table", size, unk, lineage, file)
        return cls(fields)

    # --- output ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": VOCAB_FORMAT, "fields": {n: f.to_json() for n, f in self.fields.items()}}

    def save(self, folder: str | Path) -> None:
        """Writes ``folder/vocab.json`` and every table field's parquet (from memory or copied)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, f in self.fields.items():
            if f.kind != "table":
                continue
            dest = folder / f"{name}.parquet"
            if name in self._tables:
                raw, rows = self._tables[name]
                table = pa.table({"raw_id": pa.array(raw, pa.int64()), "row": pa.array(rows, pa.int64())})
                with atomic_path(dest) as tmp:
                    pq.write_table(table, tmp)
            elif f.file is None:
                raise VocabError(f"field {name!r}: no table to save (neither loaded nor on disk)")
            elif f.file.resolve() != dest.resolve():
                with atomic_path(dest) as tmp:
                    shutil.copyfile(f.file, tmp)
        atomic_write_json(folder / VOCAB_FILE, self.to_json(), sort_keys=False)

    # --- lookups --------------------------------------------------------------------------------
    def field(self, name: str) -> FieldVocab:
        if name not in self.fields:
            raise VocabError(f"no vocabulary for field {name!r}; fields are {list(self.fields)}")
        return self.fields[name]

    def table(self, name: str) -> IdRows:
        """A table field's ``(sorted raw ids, rows)``, read from its parquet on first use and kept."""
        f = self.field(name)
        if f.kind != "table":
            raise VocabError(f"field {name!r} is {f.kind}, not a table")
        if name not in self._tables:
            if f.file is None:
                raise VocabError(f"field {name!r}: table file unknown")
            self._tables[name] = _read_table(f)
        return self._tables[name]

    def rows(self, field: str, raw: np.ndarray) -> np.ndarray:
        """int64 rows of raw ids (any shape); -1 where the id is not in the vocabulary.

        Unseen ids are -1, not ``unknown_row``: the caller decides (a scorer maps them to the unknown row
        or reads the zero vector an out-of-range row gets). Vectorised: one searchsorted over the field's
        sorted raw ids.
        """
        f = self.field(field)
        raw = np.asarray(raw, dtype=np.int64)
        if f.kind == "identity":
            return np.where((raw >= 0) & (raw < f.size), raw, -1).astype(np.int64)
        keys, vals = self.table(field)
        if keys.size == 0:
            return np.full(raw.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, raw), keys.size - 1)
        return np.where(keys[pos] == raw, vals[pos], -1).astype(np.int64)

    def by_row(self, field: str) -> np.ndarray:
        """Raw id of every row of a table field (-1: the unknown row / no raw id); O(size) memory."""
        f = self.field(field)
        raw, rows = self.table(field)
        return by_row_array(raw, rows, f.size)

    # --- compatibility --------------------------------------------------------------------------
    def check_extends(self, older: Vocabulary) -> None:
        """Raises :class:`VocabError` unless every field of ``older`` keeps all its rows here."""
        for name, old in older.fields.items():
            new = self.fields.get(name)
            if new is None:
                raise VocabError(f"field {name!r}: in the older vocabulary but not in this one")
            if new.kind != old.kind:
                raise VocabError(f"field {name!r}: kind {new.kind} here, {old.kind} in the older vocabulary")
            if new.size < old.size:
                raise VocabError(f"field {name!r}: size {new.size} is smaller than the older {old.size}")
            if new.kind == "table":
                if new.unknown_row != old.unknown_row:
                    raise VocabError(
                        f"field {name!r}: unknown_row {new.unknown_row} here, {old.unknown_row} in the older"
                    )
                if old.lineage[-1] not in new.lineage:
                    raise VocabError(
                        f"field {name!r}: rows [0, {old.size}) do not hold the older vocabulary's raw ids "
                        "(its lineage digest is not in this one's: reordered or rebuilt, not extended); "
                        "import with --vocab-from the older data set"
                    )


def _read_table(f: FieldVocab) -> IdRows:
    """A table field's parquet, checked: int64 raw_id strictly increasing, rows unique in [0, size)."""
    assert f.file is not None
    try:
        t = pq.read_table(f.file, columns=["raw_id", "row"])
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise VocabError(f"{f.file}: field {f.name!r}: not a raw_id/row parquet table ({e})") from None
    if t.schema.field("raw_id").type != pa.int64() or t.schema.field("row").type != pa.int64():
        raise VocabError(f"{f.file}: field {f.name!r}: columns raw_id and row must be int64")
    raw = t.column("raw_id").to_numpy().astype(np.int64, copy=False)
    rows = t.column("row").to_numpy().astype(np.int64, copy=False)
    if raw.size > 1 and not bool(np.all(raw[1:] > raw[:-1])):
        raise VocabError(f"{f.file}: field {f.name!r}: raw_id is not strictly increasing")
    if rows.size and (rows.min() < 0 or rows.max() >= f.size):
        raise VocabError(f"{f.file}: field {f.name!r}: a row is outside [0, {f.size})")
    if np.unique(rows).size != rows.size:
        raise VocabError(f"{f.file}: field {f.name!r}: two raw ids share a row")
    if f.unknown_row is not None and bool(np.any(rows == f.unknown_row)):
        raise VocabError(f"{f.file}: field {f.name!r}: a raw id is on the unknown row {f.unknown_row}")
    return raw, rows
