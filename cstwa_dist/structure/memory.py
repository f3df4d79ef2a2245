"""Per-rank memory items: what a structure step says it allocates, in a form the dry run can add up.

Why: a memory estimate has one source, the step that does the work. Each step module (``readout``,
``ivf``, ``sharded_graph``, ``propagate``) has a function next to its code that lists what one rank
holds while the step runs, as :class:`MemoryItem` values; the dry run (``cstwa_dist/planner``) asks
those functions and adds their items up per phase, as TorchRec's planner asks its storage estimators.
It never re-derives a formula, so a change to a step's allocations changes one function, and the
tests that hold the dry run's figures to the steps' own functions keep the two together.

An item carries its formula as text so that the report prints the step's own formula. The text uses
the sizes as the dry run names them: ``n_r`` the rank's rows of a side, ``w`` the row width, ``k``
the list width (graph degree), ``M`` the side's fields, ``f_r`` a bound on the foreign rows a rank
fetches (and serves), ``b`` the rows of one kNN query block, ``nlist``/``nprobe``/``pq_m`` the IVF
settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MemoryItem", "total_bytes"]


@dataclass(frozen=True)
class MemoryItem:
    """One allocation of a step on one rank.

    ``key`` is stable within its step (``"own_topk"``), ``name`` says what it is and ``detail`` adds a
    parenthesis for reports (``"int64 + seen"``); ``formula`` gives ``bytes`` in the sizes above.
    ``rank0_only`` marks work only rank 0 does (the IVF quantizer's training sample).
    """

    key: str
    name: str
    bytes: int
    formula: str
    detail: str = ""
    rank0_only: bool = False


def total_bytes(items: Iterable[MemoryItem], *, rank0: bool = True) -> int:
    """The sum of ``items`` on rank 0 (``rank0=True``) or on any other rank."""
    return sum(i.bytes for i in items if rank0 or not i.rank0_only)
