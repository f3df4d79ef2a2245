"""The sharding dry run behind ``cstwa-dist plan``: ``specs`` (the spec to plan with), ``dryrun``
(TorchRec's plan and memory per rank), ``render`` (the text report), ``verdict`` (fits or not, the
tables that do not, the smallest world size that fits). The structure step's peak
(``structure/estimate.py``) and the job's reserves (``train/reserves.py``) live next to the steps they
describe, so training asks the same functions.

``dry_run`` and ``resolve_spec`` are importable from here; they are loaded on first use, so importing
the package (the CLI's ``--help`` does) pulls in neither torch nor TorchRec.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["dry_run", "resolve_spec"]

_WHERE = {"dry_run": "cstwa_dist.planner.dryrun", "resolve_spec": "cstwa_dist.planner.specs"}


def __getattr__(name: str) -> Any:
    """PEP 562: ``from cstwa_dist.planner import dry_run`` imports ``dryrun`` only then."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
