"""Bad input stops early and clearly: each case a new user hit, run through the real CLI entry.

Every case must end with exit code 2 and one ``ERROR`` line that names the file (and the line, where one
line is to blame) and the cause, and must leave no data set at ``--out`` (nor a staging folder): an
importer that exits 0 with an empty or mostly quarantined split hands a silently wrong data set to a
training run that takes hours. Two cases also run as a subprocess of the installed ``cstwa-dist``, to
check what a user really sees: one line, no traceback.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cstwa_dist import cli
from cstwa_dist.data.aliccp import DEFAULT_FIELDS, FILES, MULTI_VALUED_FIELDS
from cstwa_dist.data.quarantine import DEFAULT_MAX_QUARANTINE_FRACTION
from cstwa_dist.data.spec import DatasetSpec, load_stats
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


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_aliccp_skeleton_cut_mid_line(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """A skeleton file cut in half used to import with rc 0 and no word: now a loud warning naming the
    file and its last line, the cut line quarantined as truncated_line, the accounting intact; --strict
    stops at it."""
    path = raw / FILES["skeleton_train"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    n_lines = path.read_bytes().count(b"\n") + 1
    out = tmp_path / "out"
    rc, errors = run_cli(_aliccp(raw, out), caplog, monkeypatch)
    assert (rc, errors) == (0, [])
    loud = [w for w in _warnings(caplog) if "ends mid-line" in w]
    assert len(loud) == 1 and str(path) in loud[0] and f"last line ({n_lines})" in loud[0], _warnings(caplog)
    assert "TRUNCATED" in loud[0] and "unpack the file again" in loud[0]
    bad = [
        json.loads(x)
        for s in ("train", "val")
        for x in (out / "quarantine" / f"{s}.jsonl").read_text().splitlines()
    ]
    assert [(b["line"], b["reason"]) for b in bad] == [(n_lines, "truncated_line")]
    acc = load_stats(out / "stats.json")["train"].extra["input_files"][FILES["skeleton_train"]]
    assert acc == {"input_lines": n_lines, "written": n_lines - 1, "quarantined": 1}
    strict_out = tmp_path / "strict"
    one_error(
        *run_cli(_aliccp(raw, strict_out, "--strict"), caplog, monkeypatch),
        f"{path} line {n_lines}: truncated_line (no newline at the end of the file",
    )
    nothing_written(strict_out)


def test_aliccp_missing_final_newline_warns(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    path = raw / FILES["common_test"]
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    out = tmp_path / "out"
    assert run_cli(_aliccp(raw, out), caplog, monkeypatch) == (0, [])
    assert any(str(path) in w and "does not end with a newline" in w for w in _warnings(caplog))
    assert (
        load_stats(out / "stats.json")["test"].extra["input_files"][FILES["common_test"]]["quarantined"] == 0
    )


def test_aliccp_release_size_check(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """Files the size of the release are checked against its figures: exact ones where recorded (none
    are, so the test supplies them), else the paper's approximate impression counts; a file short of
    them is warned about, naming the figures used."""
    from cstwa_dist.data.aliccp import release

    monkeypatch.setattr(release, "PAPER_LINES", {FILES["skeleton_train"]: 400, FILES["skeleton_test"]: 60})
    out = tmp_path / "out"
    assert run_cli(_aliccp(raw, out), caplog, monkeypatch) == (0, [])
    short = [w for w in _warnings(caplog) if "looks like the official Ali-CCP file" in w]
    assert len(short) == 1 and str(raw / FILES["skeleton_train"]) in short[0] and "has 300 lines" in short[0]
    assert "docs/method.md" in short[0] and "exact figures are not recorded" in short[0]
    assert any("consistent with the official release" in r.getMessage() for r in caplog.records)
    exact = release.OfficialFile(bytes=0, lines=61)
    monkeypatch.setattr(release, "OFFICIAL_FILES", {FILES["skeleton_test"]: exact})
    out2 = tmp_path / "out2"
    assert run_cli(_aliccp(raw, out2), caplog, monkeypatch) == (0, [])
    assert any("has 60 lines; the official sample_skeleton_test.csv has 61" in w for w in _warnings(caplog))


def test_aliccp_bom_is_stripped(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """A byte-order mark before the first key (a file saved by a Windows editor) used to make line 1's
    key unknown; it is skipped, so the import is the same as without it."""
    out = tmp_path / "plain"
    assert run_cli(_aliccp(raw, out), caplog, monkeypatch) == (0, [])
    for role in ("skeleton_train", "common_train", "common_test"):
        path = raw / FILES[role]
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    bom = tmp_path / "bom"
    assert run_cli(_aliccp(raw, bom), caplog, monkeypatch) == (0, [])
    for split in ("train", "val", "test"):
        assert [p.read_bytes() for p in sorted((bom / split).glob("*.parquet"))] == [
            p.read_bytes() for p in sorted((out / split).glob("*.parquet"))
        ]
        assert (bom / "quarantine" / f"{split}.jsonl").read_text() == ""


def test_aliccp_gzip_inputs(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """Ali-CCP is distributed compressed: ``<name>.csv.gz`` is read as it is, gzip found by its magic
    bytes (also under a plain name), with the same output; a cut gzip file is one error."""
    import gzip

    out = tmp_path / "plain"
    assert run_cli(_aliccp(raw, out), caplog, monkeypatch) == (0, [])
    packed = tmp_path / "packed"
    packed.mkdir()
    for role, name in FILES.items():
        target = packed / (name if role == "common_test" else f"{name}.gz")  # one without the suffix
        target.write_bytes(gzip.compress((raw / name).read_bytes()))
    out_gz = tmp_path / "gz"
    assert run_cli(_aliccp(packed, out_gz), caplog, monkeypatch) == (0, [])
    for split in ("train", "val", "test"):
        assert [p.read_bytes() for p in sorted((out_gz / split).glob("*.parquet"))] == [
            p.read_bytes() for p in sorted((out / split).glob("*.parquet"))
        ]
    cut = packed / f"{FILES['skeleton_test']}.gz"
    cut.write_bytes(cut.read_bytes()[:-100])
    one_error(
        *run_cli(_aliccp(packed, tmp_path / "o"), caplog, monkeypatch),
        f"{cut} is gzip-compressed but cannot be read to its end",
        "download it again",
    )
    nothing_written(tmp_path / "o")


def test_aliccp_folder_for_a_file(raw: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    path = raw / FILES["common_train"]
    path.unlink()
    path.mkdir()
    out = tmp_path / "out"
    one_error(
        *run_cli(_aliccp(raw, out), caplog, monkeypatch),
        f"{path} is a folder, expected the Ali-CCP file {FILES['common_train']}",
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


@pytest.mark.parametrize("tail", ["9,1", '9,"1'], ids=["plain", "inside-quotes"])
def test_csv_cut_mid_line(csv_dir: Path, tail: str, caplog, monkeypatch) -> None:
    """A CSV file cut mid-line (also inside a quoted cell, which is not a line break in a value): the
    rows before the cut are imported, the cut line is quarantined as truncated_line, and a loud warning
    names the file and the line."""
    train = csv_dir / "cut.csv"
    text = (csv_dir / "train.csv").read_text()
    train.write_text(text[: text.rindex("\n", 0, -1) + 1] + tail)  # the last row cut short
    out = csv_dir / "out"
    rc, errors = run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch)
    assert (rc, errors) == (0, [])
    loud = [w for w in _warnings(caplog) if "ends mid-line" in w]
    assert (
        len(loud) == 1 and str(train) in loud[0] and "last line (201)" in loud[0] and "TRUNCATED" in loud[0]
    )
    bad = [json.loads(x) for x in (out / "quarantine" / "train.jsonl").read_text().splitlines()]
    assert [(b["line"], b["reason"]) for b in bad] == [(201, "truncated_line")]
    e = load_stats(out / "stats.json")["train"].extra
    assert (e["input_lines"], e["written"], e["quarantined"]) == (200, 199, 1)


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


def _train_rows(out: Path) -> dict[str, list[int]]:
    import pyarrow.parquet as pq

    return pq.ParquetDataset(sorted(str(p) for p in (out / "train").glob("*.parquet"))).read().to_pydict()


def test_csv_quoted_header_imports(csv_dir: Path, caplog, monkeypatch) -> None:
    """R's write.csv quotes every name (and string cell): the names are the unquoted ones."""
    train = _csv(
        csv_dir / "quoted.csv", ['1,"2",3,1,0', "4,5,6,0,0"], header='"uid","iid","hour","click","purchase"'
    )
    out = csv_dir / "out"
    assert run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch) == (0, [])
    assert _train_rows(out)["iid"] == [2, 5]


@pytest.mark.parametrize("name", ["train.csv.gz", "train_gzip_without_suffix.csv"])
def test_csv_gzip_imports(csv_dir: Path, name: str, caplog, monkeypatch) -> None:
    """gzip is read transparently, found by its magic bytes whatever the file is called (BOM included)."""
    import gzip

    train = csv_dir / name
    train.write_bytes(gzip.compress(("\ufeff" + HEADER + "\n1,2,3,1,0\n4,5,6,0,0\n").encode()))
    out = csv_dir / "out"
    assert run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch) == (0, [])
    assert _train_rows(out)["uid"] == [1, 4]
    assert load_stats(out / "stats.json")["train"].extra["input_lines"] == 2


def test_csv_truncated_gzip(csv_dir: Path, caplog, monkeypatch) -> None:
    import gzip

    rows = "".join(f"{i % 10},{i % 20},{i % 24},1,0\n" for i in range(5000))
    data = gzip.compress((HEADER + "\n" + rows).encode())
    train = csv_dir / "cut.csv.gz"
    train.write_bytes(data[: len(data) // 2])
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch),
        f"{train} is gzip-compressed but cannot be read to its end",
        "download it again",
    )
    nothing_written(out)


def test_csv_duplicate_column(csv_dir: Path, caplog, monkeypatch) -> None:
    train = _csv(csv_dir / "dup.csv", ["1,2,3,1,0,7"], header=HEADER + ",iid")
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch),
        f"{train} line 1: column 'iid' appears twice (columns 2 and 6)",
        "rename or drop one",
    )
    nothing_written(out)


def test_csv_folder_and_binary_inputs(csv_dir: Path, caplog, monkeypatch) -> None:
    folder = csv_dir / "a_folder"
    folder.mkdir()
    out = csv_dir / "out"
    one_error(
        *run_cli(_import_csv(csv_dir, out, train=folder), caplog, monkeypatch),
        f"{folder} is a folder, expected a CSV file",
    )
    xlsx = csv_dir / "train.xlsx"
    xlsx.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    msg = one_error(
        *run_cli(_import_csv(csv_dir, out, train=xlsx), caplog, monkeypatch),
        f"{xlsx} is a zip archive (or an .xlsx workbook), expected a CSV file",
    )
    assert "\\x" not in msg  # no binary dumped into the message
    nothing_written(out)


@pytest.mark.parametrize("block", [1 << 20, 100, 34], ids=["joined", "cut", "out-of-sync"])
def test_csv_quoted_newline(csv_dir: Path, block: int, caplog, monkeypatch) -> None:
    """A line break inside a quoted (ignored) cell: whatever the parser makes of it at a block boundary
    (the row joined, cut in two, or the parser out of sync), one error naming the file and line, never the
    accounting's AssertionError. The block sizes put the break in each of these positions."""
    from cstwa_dist.data import csv_import

    monkeypatch.setattr(csv_import, "CSV_BLOCK_BYTES", block)
    rows = ["1,2,3,1,0,x"] * 5 + ['1,2,3,1,0,"a\nb"'] + ["4,5,6,0,0,y"] * 5
    train = _csv(csv_dir / "nl.csv", rows, header=HEADER + ",note")
    out = csv_dir / "out"
    rc, errors = run_cli(_import_csv(csv_dir, out, train=train), caplog, monkeypatch)
    msg = one_error(rc, errors, str(train), "a quoted value holds a line break", "export again")
    assert "lines 7-8:" in msg or "near line" in msg, msg
    assert "AssertionError" not in msg
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


def test_subprocess_quoted_newline_is_one_line(csv_dir: Path) -> None:
    """The case that used to end in an AssertionError traceback ('the importer lost or invented lines')."""
    rows = ["1,2,3,1,0,x", '4,5,6,0,0,"two\nlines"', "7,8,9,1,1,y"]
    train = _csv(csv_dir / "nl.csv", rows, header=HEADER + ",note")
    out = csv_dir / "out"
    p = _cstwa_dist(*_import_csv(csv_dir, out, train=train))
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and f"{train} lines 3-4: a quoted value holds a line break" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    nothing_written(out)
