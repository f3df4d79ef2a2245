"""Bad input stops early and clearly: each case a new user hit, run through the real CLI entry.

Every case must end with exit code 2 and one ``ERROR`` line that names the file (and the line, where one
line is to blame) and the cause, and must leave no data set at ``--out`` (nor a staging folder): an
importer that exits 0 with an empty or mostly quarantined split hands a silently wrong data set to a
training run that takes hours. Two cases also run as a subprocess of the installed ``cstwa-dist``, to
check what a user really sees: one line, no traceback.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cstwa_dist import cli
from cstwa_dist.data.aliccp import DEFAULT_FIELDS, FILES, MULTI_VALUED_FIELDS
from cstwa_dist.data.quarantine import DEFAULT_MAX_QUARANTINE_FRACTION
from cstwa_dist.data.spec import DatasetSpec
from tests.fixtures.aliccp_raw import write_raw_aliccp_fixture
from tests.unit.test_importers import CSV_SPEC

ROOT = Path(__file__).resolve().parents[2]
HEADER = "uid,iid,hour,click,purchase"
SPEC = CSV_SPEC  # the importer tests' hand-written spec: uid, iid, hour


def run_cli(argv: list[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``cli.main(argv)``; returns (exit code, ERROR messages). ``setup_logging`` is skipped because its
    ``basicConfig(force=True)`` would remove pytest's capturing handler."""
    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cstwa_dist"):
        rc = cli.main(argv)
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def one_error(rc: int, errors: list[str], *needles: str) -> str:
    assert rc == 2, errors
    assert len(errors) == 1, errors
    msg = errors[0]
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left in place"
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "a staging folder was left behind"


# --- Ali-CCP ------------------------------------------------------------------------------------------
@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """A small clean raw Ali-CCP folder (300 train, 60 test lines)."""
    d = tmp_path / "raw"
    write_raw_aliccp_fixture(d, n_train_lines=300, n_test_lines=60, seed=0, bad_lines=False)
    return d


def _aliccp(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["import-aliccp", "--raw", str(raw), "--out", str(out), "--min-count", "1", *extra]


def test_aliccp_all_files_empty(tmp_path: Path, caplog, monkeypatch) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in FILES.values():
        (raw / name).write_bytes(b"")
    out = tmp_path / "out"
    msg = one_error(*run_cli(_aliccp(raw, out), caplog, monkeypatch), "empty (0 bytes", "Tianchi")
    assert all(name in msg for name in FILES.values())
    nothing_written(out)


@pytest.mark.parametrize("role", ["skeleton_test", "common_train"])
def test_aliccp_one_empty_file(raw: Path, tmp_path: Path, role: str, caplog, monkeypatch) -> None:
    """An empty test skeleton used to give an empty test split, an empty common-features file a fully
    quarantined train split; both exited 0."""
    (raw / FILES[role]).write_bytes(b"")
    out = tmp_path / "out"
    msg = one_error(*run_cli(_aliccp(raw, out), caplog, monkeypatch), str(raw / FILES[role]), "empty")
    others = [n for r, n in FILES.items() if r != role]
    assert not any(n in msg for n in others), msg
    nothing_written(out)


def test_aliccp_mismatched_common_file_hits_the_limit(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """A common-features file of the wrong split (not empty, but no key matches): every train line is
    quarantined; the limit stops the import after the train skeleton's pass and keeps the bad lines."""
    (raw / FILES["common_train"]).write_text((raw / FILES["common_test"]).read_text())
    out = tmp_path / "out"
    msg = one_error(
        *run_cli(_aliccp(raw, out), caplog, monkeypatch),
        f"300 of 300 lines (100.0%) of {raw / FILES['skeleton_train']}",
        "--max-quarantine-fraction 0.01",
        "unknown_common_key=300",
        f"first: {FILES['skeleton_train']} line 1: unknown_common_key",
        str(tmp_path / "out.quarantine" / "train.jsonl"),
    )
    assert "val.jsonl" in msg
    nothing_written(out)
    assert len((tmp_path / "out.quarantine" / "train.jsonl").read_text().splitlines()) > 200


def test_aliccp_unknown_field(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    out = tmp_path / "out"
    msg = one_error(
        *run_cli(_aliccp(raw, out, "--fields", "101", "205", "301", "999"), caplog, monkeypatch),
        "--fields ['999']",
        "not Ali-CCP field ids",
        " ".join(DEFAULT_FIELDS),
        " ".join(MULTI_VALUED_FIELDS),
    )
    assert "docs/method.md" in msg
    nothing_written(out)


def test_aliccp_field_absent_from_the_data(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """A documented field that no train line carries would also be a constant column."""
    path = raw / FILES["skeleton_train"]
    lines = []
    for line in path.read_text().splitlines():
        cols = line.split(",", 5)
        entries = [e for e in cols[5].split("\x01") if not e.startswith("853\x02")]
        cols[4], cols[5] = str(len(entries)), "\x01".join(entries)
        lines.append(",".join(cols))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    one_error(
        *run_cli(_aliccp(raw, out), caplog, monkeypatch),
        "fields ['853'] occur on none of the",
        str(path),
        "constant 0",
    )
    nothing_written(out)


def test_aliccp_empty_val_split(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    out = tmp_path / "out"
    one_error(
        *run_cli(_aliccp(raw, out, "--val-fraction", "0.0001"), caplog, monkeypatch),
        "val_fraction 0.0001 puts none of the 300 lines",
        str(raw / FILES["skeleton_train"]),
        "--val-fraction",
    )
    nothing_written(out)


# --- CSV ----------------------------------------------------------------------------------------------
def _csv(path: Path, rows: list[str], header: str = HEADER, encoding: str = "utf-8") -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding=encoding)
    return path


@pytest.fixture()
def csv_dir(tmp_path: Path) -> Path:
    SPEC.save(tmp_path / "spec.yaml")
    _csv(tmp_path / "train.csv", [f"{i % 10},{i % 20},{i % 24},{i % 2},0" for i in range(200)])
    _csv(tmp_path / "val.csv", ["1,2,3,0,0", "2,3,4,1,1"])
    _csv(tmp_path / "test.csv", ["3,4,5,1,0"])
    return tmp_path


def _import_csv(d: Path, out: Path, *extra: str, **files: Path) -> list[str]:
    paths = {s: files.get(s, d / f"{s}.csv") for s in ("train", "val", "test")}
    spec = files.get("spec", d / "spec.yaml")
    args = ["import-csv", "--spec", str(spec), "--out", str(out), *extra]
    for split, path in paths.items():
        args += [f"--{split}", str(path)]
    return args


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "fields: {uid: {side: user, vocab_size: 10}}\nuser_id: uid\nitem_id: iid\n",
            ["'fields' is a mapping", "must be a list", "expected e.g. 'fields: [{name: uid"],
        ),
        (
            "fields:\n  - {name: uid, side: user}\nuser_id: uid\nitem_id: iid\n",
            ["fields[0] (uid)", "vocab_size"],
        ),
        (
            "fields:\n  - {name: uid, side: user, vocab_size: ten}\nuser_id: uid\nitem_id: iid\n",
            ["vocab_size 'ten' is a string, not an integer"],
        ),
        ("fields:\n  - {name: uid, side: user, vocab_size: 10}\n", ["missing key(s) ['user_id', 'item_id']"]),
        ("fields: [\nuser_id: uid\n", ["not valid YAML at line"]),
        ("", ["the spec is empty"]),
    ],
    ids=["fields-mapping", "missing-key", "wrong-type", "missing-ids", "bad-yaml", "empty"],
)
def test_csv_spec_errors(csv_dir: Path, text: str, needles: list[str], caplog, monkeypatch) -> None:
    spec = csv_dir / "hand.yaml"
    spec.write_text(text)
    out = csv_dir / "out"
    rc, errors = run_cli(_import_csv(csv_dir, out, spec=spec), caplog, monkeypatch)
    msg = one_error(rc, errors, f"SpecError: {spec}: ", *needles)
    assert "TypeError" not in msg
    nothing_written(out)


def test_csv_wrong_vocabulary_hits_the_limit(csv_dir: Path, caplog, monkeypatch) -> None:
    """A spec whose iid vocabulary is too small: 196 of 200 rows out of range used to exit 0."""
    rows = [f"{i % 10},{i if i < 4 else 20 + i},{i % 24},1,0" for i in range(200)]
    train = _csv(csv_dir / "wide.csv", rows)
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch),
        f"import-csv: 196 of 200 lines (98.0%) of {train} were quarantined",
        "--max-quarantine-fraction 0.01",
        "id_out_of_range=196",
        "first: wide.csv line 6: id_out_of_range (field 'iid' outside [0, 20))",
        f"bad lines kept in {csv_dir / 'out.quarantine' / 'train.jsonl'}",
    )
    nothing_written(out)
    kept = csv_dir / "out.quarantine"
    assert sorted(p.name for p in kept.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    assert len((kept / "train.jsonl").read_text().splitlines()) == 196
    # a second failure replaces the earlier quarantine, but never a folder that is not one
    rc, errors = run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch)
    one_error(rc, errors, "bad lines kept in")
    (kept / "notes.txt").write_text("mine")
    rc, errors = run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch)
    one_error(rc, errors, f"quarantine not kept ({kept} exists")
    assert (kept / "notes.txt").read_text() == "mine"
    # the limit is the user's to raise: then the 4 good rows are imported
    assert (
        run_cli(
            _import_csv(csv_dir, out, "--max-quarantine-fraction", "1", train=train), caplog, monkeypatch
        )[0]
        == 0
    )
    assert DatasetSpec.load(out) == SPEC


def test_csv_limit_is_a_share(csv_dir: Path, caplog, monkeypatch) -> None:
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, "--max-quarantine-fraction", "5"), caplog, monkeypatch),
        "--max-quarantine-fraction must be in [0, 1], got 5",
    )
    nothing_written(out)


def test_csv_split_with_no_row_left(csv_dir: Path, caplog, monkeypatch) -> None:
    """With the limit lifted, a split whose every row is bad is still an error: it would be empty."""
    test = _csv(csv_dir / "bad_test.csv", ["3,99,5,1,0"])
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, "--max-quarantine-fraction", "1", test=test), caplog, monkeypatch),
        "split 'test' would have 0 rows",
        str(test),
        "1 quarantined",
    )
    nothing_written(out)


def test_csv_bom_header_is_accepted(csv_dir: Path, caplog, monkeypatch) -> None:
    train = _csv(csv_dir / "bom.csv", ["1,2,3,1,0", "4,5,6,0,0"], encoding="utf-8-sig")
    assert train.read_bytes().startswith(b"\xef\xbb\xbf")
    out = csv_dir / "out"
    rc, errors = run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch)
    assert (rc, errors) == (0, [])
    import pyarrow.parquet as pq

    t = pq.ParquetDataset(sorted(str(p) for p in (out / "train").glob("*.parquet"))).read().to_pydict()
    assert t["uid"] == [1, 4] and t["click"] == [1, 0]


def test_csv_empty_file(csv_dir: Path, caplog, monkeypatch) -> None:
    val = csv_dir / "empty.csv"
    val.write_bytes(b"")
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, val=val), caplog, monkeypatch),
        f"{val}: file is empty (no header line)",
        f"expected a header like {HEADER}",
    )
    nothing_written(out)


def test_csv_header_only(csv_dir: Path, caplog, monkeypatch) -> None:
    val = _csv(csv_dir / "header_only.csv", [])
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, val=val), caplog, monkeypatch),
        f"{val}: has a header but no data rows",
    )
    nothing_written(out)


def test_readme_spec_example_imports(tmp_path: Path, caplog, monkeypatch) -> None:
    """The hand-written spec and header the README shows are what a user copies: they must work."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Importing your own CSV", 1)[1].split("\n## ", 1)[0]
    spec_text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    header, row = section.split("```\nuid,", 1)[1].split("```", 1)[0].strip().splitlines()
    (tmp_path / "spec.yaml").write_text(spec_text)
    for split in ("train", "val", "test"):
        _csv(tmp_path / f"{split}.csv", [row], header="uid," + header)
    out = tmp_path / "out"
    assert run_cli(_import_csv(tmp_path, out), caplog, monkeypatch) == (0, [])
    assert DatasetSpec.load(out).names == ["uid", "age", "iid", "shop", "hour"]


def test_parser_default_is_the_library_default() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name in ("import-aliccp", "import-csv"):
        act = next(a for a in sub.choices[name]._actions if a.dest == "max_quarantine_fraction")
        assert act.default == DEFAULT_MAX_QUARANTINE_FRACTION


# --- what the user sees: one line on stderr, no traceback ---------------------------------------------
def _cstwa_dist(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cstwa-dist")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cstwa_dist.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_subprocess_spec_mapping_is_one_line(csv_dir: Path) -> None:
    spec = csv_dir / "hand.yaml"
    spec.write_text("fields: {uid: {side: user, vocab_size: 10}}\nuser_id: uid\nitem_id: iid\n")
    out = csv_dir / "out"
    p = _cstwa_dist(*_import_csv(csv_dir, out, spec=spec))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and " ERROR cstwa_dist: SpecError: " in lines[0], p.stderr
    assert "Traceback" not in p.stderr and str(spec) in lines[0]
    nothing_written(out)


def test_subprocess_empty_raw_file_is_one_line(raw: Path, tmp_path: Path) -> None:
    (raw / FILES["skeleton_test"]).write_bytes(b"")
    out = tmp_path / "out"
    p = _cstwa_dist(*_aliccp(raw, out))
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and str(raw / FILES["skeleton_test"]) in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    nothing_written(out)
