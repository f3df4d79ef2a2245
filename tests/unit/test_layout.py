"""The layout's promises, checked: which room imports what, light CLI start-up, docs that resolve.

These are the rules a newcomer relies on when adding a model or a command; a change that breaks one
fails here with the file and the import (or reference) that broke it.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cstwa_dist.cli import build_parser
from cstwa_dist.registry import MODELS, table2_models, trainable_models

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cstwa_dist"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_models_import_only_config_schema_and_their_own_blocks():
    forbidden = (
        "cstwa_dist.train",
        "cstwa_dist.structure",
        "cstwa_dist.distributed",
        "cstwa_dist.losses",
        "cstwa_dist.registry",
        "ray",
    )
    bad = []
    for path in sorted((PACKAGE / "models").glob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_nothing_asks_a_model_instance_for_its_needs():
    """Needs live in the registry: no code calls model methods that declare them."""
    pattern = re.compile(r"\.(structure_tables|representation_source)\(\)")
    hits = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for line in p.read_text().splitlines()
        if pattern.search(line)
    ]
    assert not hits, hits


def test_cli_help_imports_no_torch_ray_or_torchrec():
    """``--help`` of the top level and of every command and benchmark: each group module is imported
    and each help text formatted, and still nothing heavy is loaded."""
    code = (
        "import argparse, sys\n"
        "from cstwa_dist.cli import build_parser\n"
        "def helps(p):\n"
        "    p.format_help()\n"
        "    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]\n"
        "    return 1 + sum(helps(s) for a in subs for s in a.choices.values())\n"
        "assert helps(build_parser()) > 12\n"
        "heavy = sorted(m for m in ('torch', 'torchrec', 'ray', 'fbgemm_gpu', 'faiss') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_runs_as_a_module():
    """``python -m cstwa_dist.cli``: how torchrun starts the ranks (launchers/torchrun.sh, bench train)."""
    cmd = [sys.executable, "-m", "cstwa_dist.cli", "--version"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert p.stdout.startswith("cstwa-dist ")


def test_model_lists_come_from_the_registry():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    train = sub.choices["train"]
    model_action = next(a for a in train._actions if a.dest == "model")
    assert list(model_action.choices) == trainable_models()
    assert "ctr_mlp" not in trainable_models()
    assert table2_models() == ["mlp", "esmm", "omoe", "mmoe", "ple", "aitm", "escm2_ips", "cstwa"]
    experiment_help = next(a for a in sub.choices["experiment"]._actions if a.dest == "models").help
    assert ",".join(table2_models()) in experiment_help
    for name in trainable_models():  # every trainable model's description reaches `train --help`
        assert MODELS[name].description in model_action.help


def _readme_command_rows() -> dict[str, list[str]]:
    rows = {}
    in_table = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| command | what it does |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            m = re.match(r"\| `cstwa-dist ([a-z-]+)([^`]*)`", line)
            if m:
                rows.setdefault(m.group(1), []).append(m.group(2))
    return rows


def test_readme_command_table_matches_the_cli():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    rows = _readme_command_rows()
    assert sorted(rows) == sorted(sub.choices), "README command table and `cstwa-dist --help` differ"
    for name, usage in ((n, u) for n, us in rows.items() for u in us):
        sp = sub.choices[name]
        nested = [a for a in sp._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # `bench train ...`: check the options against the named sub-subcommand
            word, _, usage = usage.strip().partition(" ")
            assert word in nested[0].choices, f"README row {name}: unknown subcommand {word!r}"
            sp = nested[0].choices[word]
        known = {o for a in sp._actions for o in a.option_strings}
        written = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage))
        assert written <= known, f"README row {name}: unknown options {sorted(written - known)}"
        required = {a.option_strings[0] for a in sp._actions if a.required and a.option_strings}
        missing = sorted(required - written)
        assert not missing, f"README row {name}: required options missing {missing}"


DOC_REF = re.compile(r"docs/([\w./-]+\.md)(?:\s*(§\s*[\d.]+))?")


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in [
            *PACKAGE.rglob("*.py"),
            *(ROOT / "tests").rglob("*.py"),
            *(ROOT / "launchers").glob("*.sh"),
            *(ROOT / "configs").glob("*.yaml"),
            ROOT / "README.md",
            ROOT / "Makefile",
        ]
        if p.name != "test_layout.py"
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_doc_references_resolve_inside_the_repository(path: Path):
    text = path.read_text()
    assert "shared/docs" not in text and "../shared" not in text
    # a bare `method.md` / `platform-notes.md` / `design.md` would point outside the repository
    bare = re.findall(r"(?<![/\w])(method|platform-notes|design)\.md", text)
    assert not bare, f"{path}: cite docs/<file>.md, not {bare}"
    for doc, section in DOC_REF.findall(text):
        target = ROOT / "docs" / doc
        assert target.is_file(), f"{path} cites docs/{doc}, which does not exist"
        if section:
            number = section.replace("§", "").strip().rstrip(".")
            headings = [h for h in target.read_text().splitlines() if h.startswith("#")]
            assert any(re.match(rf"#+ {re.escape(number)}[. ]", h) for h in headings), (
                f"{path} cites docs/{doc} {section}, which has no such section"
            )


# Rooms from the bottom up (the README's layout table): a module may import its own room and rooms
# listed below it, never one above or beside it. A piece two rooms need goes below both — so the
# node's Ray runtime sits below data/ and distributed/, and the dry run sits above train/ and structure/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fs", "config", "runtime"),
    ("data",),
    ("distributed",),
    ("models",),
    ("losses",),
    ("registry",),
    ("structure",),
    ("train",),
    ("export",),
    ("experiments", "planner", "bench"),
    ("cli",),
    ("deploy",),
)
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cstwa_dist" else None


def _all_imports(path: Path) -> set[str]:
    """Every absolute import in the file, function-level and ``TYPE_CHECKING`` ones included: a lazy
    import runs upward just the same when it runs."""
    names = _imports(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.relative_to(ROOT)}: relative import; use cstwa_dist.<room>")
    return names


def test_every_room_has_a_layer():
    rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    rooms.discard("__init__")
    assert sorted(rooms - set(LEVEL)) == [], "a new room needs its place in LAYERS"


def _upward(path: Path, here: str) -> list[str]:
    """The imports of ``path`` (a module of room ``here``) that reach a room not below it."""
    bad = []
    for name in sorted(_all_imports(path)):
        there = _room(name)
        if there is None or there == here:
            continue
        if there not in LEVEL or LEVEL[there] >= LEVEL[here]:
            bad.append(f"{path.name} ({here}) imports {name} ({there})")
    return bad


def test_no_import_runs_upward():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if here != "__init__":
            bad += [f"{path.relative_to(ROOT)}: {b}" for b in _upward(path, here)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("here", "line"),
    [
        ("data", "    from cstwa_dist.distributed.env import DistEnv"),  # lazy, beside-and-above
        ("distributed", "from cstwa_dist.registry import StructureTable"),
        ("structure", "    from cstwa_dist.train.trainer import Trainer"),
    ],
)
def test_the_layer_check_catches_an_upward_import(tmp_path: Path, here: str, line: str):
    """The check above on planted files: each import must be reported, also inside a function."""
    planted = tmp_path / "planted.py"
    body = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    planted.write_text(body)
    assert len(_upward(planted, here)) == 1


def test_set_help_lists_every_closed_choice():
    """``--set``'s help is read off the config's ``Literal`` types: a new choice reaches ``--help``."""
    from cstwa_dist.config import choices
    from cstwa_dist.registry import MODEL_SETTINGS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = next(a for a in sub.choices["train"]._actions if a.dest == "overrides").help
    listed = choices(MODEL_SETTINGS)
    assert "structure.sm_reading" in listed and "train.pipeline" in listed
    for key, allowed in listed.items():
        assert f"{key}: {'|'.join(map(str, allowed))}" in help_text
