"""How big an export is, from a spec and a config alone (no data, no checkpoint): ``plan``'s line.

The exported program holds, in float32, every table the model's forward reads (``rows · dim · 4``
bytes each; CSTWA's side tables, read only to initialise its structure tables, are not exported) and
the dense layers. That is also the host memory ``export`` needs and what a serving replica loads,
so the figure decides whether one process can hold the model or the tables must be served apart
(docs/export.md, "Weights at the industrial shape").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def fmt_bytes(b: float) -> str:
    """Binary size as ``plan`` prints it (1.50 GiB, 312.0 MiB); planner.render's, which this room
    may not import (export sits below the planner)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


@dataclass(frozen=True)
class ExportWeights:
    """Bytes of an export: per table (``<collection>.embedding_bags.<table>.weight``) and dense."""

    tables: dict[str, int]
    dense: int

    @property
    def table_bytes(self) -> int:
        return sum(self.tables.values())

    @property
    def total(self) -> int:
        return self.table_bytes + self.dense

    def line(self, top: int = 3) -> str:
        """``export: 1.23 GiB (tables 1.23 GiB: a 0.9 GiB, b ...; dense 1.2 MiB)``."""
        big = sorted(self.tables.items(), key=lambda kv: -kv[1])[:top]
        names = ", ".join(
            f"{k.rsplit('.embedding_bags.', 1)[-1].removesuffix('.weight')} {fmt_bytes(v)}" for k, v in big
        )
        more = f", +{len(self.tables) - top} more" if len(self.tables) > top else ""
        return (
            f"export: {fmt_bytes(self.total)} float32 (tables {fmt_bytes(self.table_bytes)}: {names}{more}; "
            f"dense {fmt_bytes(self.dense)})"
        )


def export_weights(model_name: str, cfg: Any, spec: Any) -> ExportWeights:
    """The bytes ``export`` would write for ``model_name`` trained under ``cfg`` on ``spec``."""
    from cstwa_dist.export.exporter import meta_export_model
    from cstwa_dist.registry import get_model_spec

    model, layouts, called = meta_export_model(get_model_spec(model_name), cfg, spec)
    tables = {
        f"{path}.embedding_bags.{t}.weight": rows * dim * 4
        for path, layout in layouts.items()
        if path in called
        for t, _, _, rows, dim in layout
    }
    exported = set(tables)
    dense = sum(
        t.numel() * 4
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if ".embedding_bags." not in n and n not in exported
    )
    return ExportWeights(tables=tables, dense=dense)
