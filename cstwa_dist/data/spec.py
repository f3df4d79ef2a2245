"""Dataset layout: the feature spec (``spec.yaml``) and split statistics (``stats.json``).

A dataset directory is ``<dataset>/{train,val,test}/*.parquet`` with one int64 column per categorical
field (named as the field) and int8 label columns ``click`` and ``purchase``; ``spec.yaml`` says which
side (user | item | context) each field belongs to and its vocabulary size, because the model needs
the sides to build ``r_u``, ``r_i`` and ``ctx`` (docs/method.md, Notation) and the vocabulary sizes to size
the embedding tables.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cstwa_dist.fs import atomic_write_json, atomic_write_text

SIDES = ("user", "item", "context")
LABELS = ("click", "purchase")
SPLITS = ("train", "val", "test")


class SpecError(ValueError):
    """A spec file that cannot describe a valid dataset (a ``ValueError``: the CLI prints one line)."""


_SPEC_KEYS = ("fields", "user_id", "item_id")
_FIELD_KEYS = ("name", "side", "vocab_size")
# One line of valid YAML, quoted in every spec error so a hand-written spec can be fixed from the message.
SPEC_EXAMPLE = (
    "'fields: [{name: uid, side: user, vocab_size: 1000}, {name: iid, side: item, vocab_size: 5000}, "
    "{name: hour, side: context, vocab_size: 24}]' plus 'user_id: uid' and 'item_id: iid'"
)


def _kind(value: Any) -> str:
    """The YAML word for a parsed value's type, for messages about hand-written specs."""
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), type(value).__name__
    )


def _is_name(value: Any) -> bool:
    """Field names may be written bare in YAML (``name: 101`` parses as an integer)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One categorical field: ids are in ``[0, vocab_size)``; 0 may mean 'unknown'."""

    name: str
    side: str
    vocab_size: int

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise SpecError(f"field name {self.name!r} must be non-empty and alphanumeric/underscore")
        if self.name in LABELS:
            raise SpecError(f"field name {self.name!r} collides with a label column")
        if self.side not in SIDES:
            raise SpecError(f"field {self.name!r}: side {self.side!r} is not one of {SIDES}")
        if int(self.vocab_size) < 1:
            raise SpecError(f"field {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """All fields of a dataset, in column order, plus which fields identify users and items."""

    fields: tuple[FieldSpec, ...]
    user_id: str
    item_id: str

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"duplicate field names: {dupes}")
        by_name = {f.name: f for f in self.fields}
        for role, name, side in (("user_id", self.user_id, "user"), ("item_id", self.item_id, "item")):
            if name not in by_name:
                raise SpecError(f"{role} {name!r} is not a field; fields are {names}")
            if by_name[name].side != side:
                raise SpecError(f"{role} {name!r} must be on side {side!r}, not {by_name[name].side!r}")
        if not self.context_fields:
            raise SpecError("at least one context field is required (ctx = mean of context embeddings)")

    # --- views used by models and the structure step -------------------------------------------
    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def side_fields(self, side: str) -> list[FieldSpec]:
        """Fields of one side, the side's id field first (so ``r_u`` starts with the id embedding)."""
        if side not in SIDES:
            raise SpecError(f"unknown side {side!r}")
        out = [f for f in self.fields if f.side == side]
        key = {"user": self.user_id, "item": self.item_id}.get(side)
        return sorted(out, key=lambda f: f.name != key)

    @property
    def user_fields(self) -> list[FieldSpec]:
        return self.side_fields("user")

    @property
    def item_fields(self) -> list[FieldSpec]:
        return self.side_fields("item")

    @property
    def context_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.side == "context"]

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SpecError(f"no field {name!r}; fields are {self.names}")

    @property
    def num_users(self) -> int:
        return self.field(self.user_id).vocab_size

    @property
    def num_items(self) -> int:
        return self.field(self.item_id).vocab_size

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "fields": [asdict(f) for f in self.fields],
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> DatasetSpec:
        """A spec from parsed YAML; any problem is one :class:`SpecError` line naming ``source``, what is
        wrong, and what is expected (:data:`SPEC_EXAMPLE`), never a ``TypeError`` from deep inside."""

        def bad(problem: str) -> SpecError:
            return SpecError(f"{source}: {problem}; expected e.g. {SPEC_EXAMPLE}")

        if raw is None:
            raise bad("the spec is empty")
        if not isinstance(raw, dict):
            raise bad(f"the top level is a {_kind(raw)}, not a mapping of fields, user_id, item_id")
        unknown = set(raw) - set(_SPEC_KEYS)
        if unknown:
            raise bad(f"unknown keys {sorted(map(str, unknown))} (valid: {', '.join(_SPEC_KEYS)})")
        missing = [k for k in _SPEC_KEYS if k not in raw]
        if missing:
            raise bad(f"missing key(s) {missing}")
        entries = raw["fields"]
        if not isinstance(entries, list) or not entries:
            shape = "an empty list" if isinstance(entries, list) else f"a {_kind(entries)}"
            raise bad(f"'fields' is {shape}; it must be a list with one {{name, side, vocab_size}} per field")
        fields = []
        for i, entry in enumerate(entries):
            where = f"fields[{i}]"
            if not isinstance(entry, dict):
                raise bad(f"{where} is {entry!r}, not a mapping with keys {', '.join(_FIELD_KEYS)}")
            if isinstance(entry.get("name"), (str, int)) and not isinstance(entry.get("name"), bool):
                where += f" ({entry['name']})"
            extra = set(entry) - set(_FIELD_KEYS)
            if extra:
                raise bad(
                    f"{where}: unknown keys {sorted(map(str, extra))} (valid: {', '.join(_FIELD_KEYS)})"
                )
            lacking = [k for k in _FIELD_KEYS if k not in entry]
            if lacking:
                raise bad(f"{where}: missing key(s) {lacking}")
            name, side, vocab = entry["name"], entry["side"], entry["vocab_size"]
            if not _is_name(name):
                raise bad(f"{where}: name {name!r} is a {_kind(name)}, not a string")
            if not isinstance(side, str):
                raise bad(f"{where}: side {side!r} is a {_kind(side)}, not one of {', '.join(SIDES)}")
            if isinstance(vocab, bool) or not isinstance(vocab, int):
                raise bad(f"{where}: vocab_size {vocab!r} is a {_kind(vocab)}, not an integer")
            try:
                fields.append(FieldSpec(name=str(name), side=side, vocab_size=vocab))
            except SpecError as e:
                raise bad(f"{where}: {e}") from None
        for role in ("user_id", "item_id"):
            if not _is_name(raw[role]):
                raise bad(f"{role} {raw[role]!r} is a {_kind(raw[role])}, not a field name")
        try:
            return cls(fields=tuple(fields), user_id=str(raw["user_id"]), item_id=str(raw["item_id"]))
        except SpecError as e:
            raise bad(str(e)) from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> DatasetSpec:
        path = Path(path)
        if path.is_dir():
            path = path / "spec.yaml"
        if not path.exists():
            raise SpecError(f"spec file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SpecError(f"{path}: not valid YAML{at}: {problem}; expected e.g. {SPEC_EXAMPLE}") from None
        return cls.from_dict(raw, source=str(path))


@dataclass(kw_only=True)
class SplitStats:
    """Row and label counts of one split (the shape of the paper's Table 1)."""

    rows: int
    click_rate: float
    purchase_rate: float
    users: int
    items: int
    extra: dict[str, Any] = field(default_factory=dict)


def save_stats(path: str | Path, stats: dict[str, SplitStats]) -> None:
    atomic_write_json(path, {split: asdict(s) for split, s in stats.items()})


def load_stats(path: str | Path) -> dict[str, SplitStats]:
    raw = json.loads(Path(path).read_text())
    return {split: SplitStats(**v) for split, v in raw.items()}


def split_files(dataset: str | Path, split: str) -> list[Path]:
    """Parquet files of a split in a stable (sorted) order; an empty split is an error."""
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r}; valid: {SPLITS}")
    d = Path(dataset) / split
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {d}")
    return files


def dataset_split_rows(spec: DatasetSpec, dataset: str | Path) -> dict[str, int] | None:
    """Rows of each split from ``<dataset>/stats.json`` when that folder's ``spec.yaml`` is ``spec``
    (the data set a job will read), else None. Reads two small files, never the data."""
    folder = Path(dataset)
    stats, spec_file = folder / "stats.json", folder / "spec.yaml"
    if stats.is_file() and spec_file.is_file() and DatasetSpec.load(spec_file) == spec:
        return {split: s.rows for split, s in load_stats(stats).items()}
    return None
