"""What more than one command group needs: the run-config options, the command line as typed, JSON on stdout.

Kept apart from the group modules so that a group never imports another group, and light (no numpy,
no torch) because every ``--help`` imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``: every command that runs on a run config takes both, spelled alike, so
    that a command line that works for ``train`` works for ``pretrain``, ``plan`` and the Kubernetes
    renderer's check too. Handlers load it with ``cstwa_dist.registry.load_config``, which also checks
    the models' own settings (``models.<name>.<key>``)."""
    p.add_argument(
        "--config",
        default="configs/demo.yaml",
        help="run config YAML (default: configs/demo.yaml, the embedded default)",
    )
    from cstwa_dist.registry import describe_choices  # light: config dataclasses and names only

    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=(
            "override a config value, e.g. --set train.epochs=2 or --set models.ple.levels=3 "
            "(repeatable; value is YAML); closed choices: " + describe_choices()
        ),
    )


def add_json_out(p: argparse.ArgumentParser) -> None:
    """``--out``: the JSON file a benchmark writes (required: a measurement nobody keeps is lost)."""
    p.add_argument("--out", required=True, help="JSON file to write")


def command_line() -> str:
    """The command as the user typed it, stored with every measurement so that it can be re-run."""
    return "cstwa-dist " + " ".join(sys.argv[1:])


def emit_json(obj: Any) -> None:
    """The user-facing result on stdout (logs go to stderr), so that ``| jq`` works on it."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def require_positive(**values: int) -> None:
    """One error naming every option that must be at least 1, in the order given, e.g.
    ``--users, --k, --ranks and --threads must be >= 1`` (underscores become dashes)."""
    if all(v >= 1 for v in values.values()):
        return
    names = [f"--{n.replace('_', '-')}" for n in values]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    raise ValueError(f"{listed} must be >= 1")
