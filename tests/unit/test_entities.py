"""Entity tables (``cstwa_dist/data/entities.py``): written once with the data set, equal to a full rescan
of the impressions, read by id range touching only the overlapping row groups, with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cstwa_dist import cli
from cstwa_dist.data.aliccp import import_aliccp
from cstwa_dist.data.csv_import import import_csv
from cstwa_dist.data.entities import (
    ENTITIES_DIR,
    ENTITY_ROW_GROUP_ROWS,
    ENTITY_SIDES,
    REPORT_NAME,
    entity_table_path,
    entity_tables_complete,
    read_entity_rows,
    write_entity_tables,
)
from cstwa_dist.data.spec import SPLITS, DatasetSpec, FieldSpec, split_files
from cstwa_dist.data.synth import generate
from cstwa_dist.data.writer import dataset_complete
from tests.fixtures.aliccp_raw import write_raw_aliccp_fixture

SMALL_RG = 16  # row groups of 16 ids: the demo users (100) span 7 row groups, the last one short


def _reference(dataset: Path, spec: DatasetSpec, side: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The definition, row by row: splits in order, files sorted, the last profile of an id wins."""
    fields = [f.name for f in spec.side_fields(side)]
    n = spec.field(fields[0]).vocab_size
    prof = {i: (i,) + (0,) * (len(fields) - 1) for i in range(n)}
    variants: dict[int, set[tuple[int, ...]]] = defaultdict(set)
    for split in SPLITS:
        for path in split_files(dataset, split):
            t = pq.read_table(path, columns=fields).to_pydict()
            for row in zip(*(t[f] for f in fields), strict=True):
                prof[row[0]] = row
                variants[row[0]].add(row[1:])
    conflicts = sum(len(v) > 1 for v in variants.values())
    seen = np.array([i in variants for i in range(n)])
    return np.array([prof[i] for i in range(n)], dtype=np.int64).reshape(n, len(fields)), seen, conflicts


def _full(dataset: Path, spec: DatasetSpec, side: str) -> tuple[np.ndarray, np.ndarray]:
    return read_entity_rows(dataset, spec, side, 0, spec.field(spec.side_fields(side)[0].name).vocab_size)


def _assert_tables_match_rescan(dataset: Path) -> dict:
    spec = DatasetSpec.load(dataset)
    assert entity_tables_complete(dataset) and dataset_complete(dataset)
    report = json.loads((dataset / ENTITIES_DIR / REPORT_NAME).read_text())
    for side in ENTITY_SIDES:
        want_prof, want_seen, want_conflicts = _reference(dataset, spec, side)
        prof, seen = _full(dataset, spec, side)
        np.testing.assert_array_equal(prof, want_prof)
        np.testing.assert_array_equal(seen, want_seen)
        assert report[side]["rows"] == len(want_prof)
        assert report[side]["seen"] == int(want_seen.sum())
        assert report[side]["conflicts"] == want_conflicts
        assert report[side]["fields"] == [f.name for f in spec.side_fields(side)]
        assert pq.read_schema(entity_table_path(dataset, side)).names == [*report[side]["fields"], "seen"]
    return report


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo at 2 %: 100 users, 50 items; written by the generator, tables included."""
    out = tmp_path_factory.mktemp("ent") / "synth"
    generate("demo", 0.02, 3, out, progress=False)
    return out


@pytest.fixture(scope="module")
def small_rg(synth_ds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``synth_ds`` whose tables are rewritten with row groups of :data:`SMALL_RG` ids."""
    out = tmp_path_factory.mktemp("ent_rg") / "synth"
    shutil.copytree(synth_ds, out)
    write_entity_tables(out, DatasetSpec.load(out), row_group_rows=SMALL_RG, progress=False)
    return out


def test_generator_writes_tables_equal_to_a_full_rescan(synth_ds: Path) -> None:
    report = _assert_tables_match_rescan(synth_ds)
    assert report["row_group_rows"] == ENTITY_ROW_GROUP_ROWS
    assert report["user"]["conflicts"] == 0  # the generator's profiles are functions of the id
    assert pq.ParquetFile(entity_table_path(synth_ds, "user")).metadata.num_row_groups == 1


def test_small_row_groups_give_the_same_table(synth_ds: Path, small_rg: Path) -> None:
    spec = DatasetSpec.load(small_rg)
    meta = pq.ParquetFile(entity_table_path(small_rg, "user")).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [16] * 6 + [4]
    for side in ENTITY_SIDES:
        for a, b in zip(_full(small_rg, spec, side), _full(synth_ds, spec, side), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "lo, hi",
    [(0, 100), (15, 17), (16, 32), (5, 90), (99, 100), (31, 33), (0, 0), (3, 3), (100, 100), (96, 100)],
)
def test_range_reads_are_slices_of_the_full_table(small_rg: Path, lo: int, hi: int) -> None:
    spec = DatasetSpec.load(small_rg)
    prof, seen = _full(small_rg, spec, "user")
    got_prof, got_seen = read_entity_rows(small_rg, spec, "user", lo, hi)
    assert got_prof.dtype == np.int64 and got_seen.dtype == bool
    assert got_prof.shape == (hi - lo, len(spec.user_fields)) and got_seen.shape == (hi - lo,)
    np.testing.assert_array_equal(got_prof, prof[lo:hi])
    np.testing.assert_array_equal(got_seen, seen[lo:hi])


@pytest.mark.parametrize(
    "lo, hi, groups",
    [(15, 17, [0, 1]), (16, 32, [1]), (0, 0, []), (40, 40, []), (95, 100, [5, 6]), (0, 100, list(range(7)))],
)
def test_only_overlapping_row_groups_are_read(
    small_rg: Path, monkeypatch: pytest.MonkeyPatch, lo: int, hi: int, groups: list[int]
) -> None:
    spec = DatasetSpec.load(small_rg)
    read: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *args, **kwargs) -> pa.Table:
        read.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    read_entity_rows(small_rg, spec, "user", lo, hi)
    assert read == groups


def test_errors_name_the_file_and_the_fix(synth_ds: Path, tmp_path: Path) -> None:
    spec = DatasetSpec.load(synth_ds)
    user = spec.field(spec.user_id)
    with pytest.raises(ValueError, match=r"user\.parquet: row range \[-1, 5\) is outside \[0, 100\]"):
        read_entity_rows(synth_ds, spec, "user", -1, 5)
    with pytest.raises(ValueError, match=r"row range \[6, 5\)"):
        read_entity_rows(synth_ds, spec, "user", 6, 5)
    with pytest.raises(ValueError, match=r"row range \[0, 101\)"):
        read_entity_rows(synth_ds, spec, "user", 0, 101)
    with pytest.raises(ValueError, match="sides"):
        read_entity_rows(synth_ds, spec, "context", 0, 1)
    # the spec no longer matches the table: another vocab size, another field
    bigger = dataclasses.replace(user, vocab_size=user.vocab_size + 1)
    spec_rows = dataclasses.replace(spec, fields=tuple(bigger if f is user else f for f in spec.fields))
    rows_msg = r"user\.parquet: 100 rows, but spec\.yaml's user_id has vocab_size 101"
    with pytest.raises(ValueError, match=rows_msg):
        read_entity_rows(synth_ds, spec_rows, "user", 0, 1)
    extra = FieldSpec(name="extra", side="user", vocab_size=3)
    spec_cols = dataclasses.replace(spec, fields=(*spec.fields, extra))
    with pytest.raises(ValueError, match=r"user\.parquet: columns .* needs .*extra.*cstwa-dist entities"):
        read_entity_rows(synth_ds, spec_cols, "user", 0, 1)
    # a table that is not dense by id (rows 3 and 4 swapped)
    swapped = tmp_path / "swapped"
    shutil.copytree(synth_ds, swapped)
    path = entity_table_path(swapped, "user")
    table = pq.read_table(path)
    order = np.arange(table.num_rows)
    order[[3, 4]] = [4, 3]
    pq.write_table(table.take(pa.array(order)), path)
    np.testing.assert_array_equal(
        read_entity_rows(swapped, spec, "user", 0, 3)[0], _full(synth_ds, spec, "user")[0][:3]
    )
    with pytest.raises(ValueError, match=r"user\.parquet: row 3 \(row group 0\) holds user_id = 4; .* dense"):
        read_entity_rows(swapped, spec, "user", 2, 5)
    # a data set written before entity tables
    old = tmp_path / "old"
    shutil.copytree(synth_ds, old)
    shutil.rmtree(old / ENTITIES_DIR)
    assert not entity_tables_complete(old) and not dataset_complete(old)
    with pytest.raises(FileNotFoundError) as e:
        read_entity_rows(old, spec, "item", 0, 1)
    msg = str(e.value)
    assert "\n" not in msg and str(old / ENTITIES_DIR / "item.parquet") in msg
    assert "older version" in msg and f"cstwa-dist entities --dataset {old}" in msg


def test_out_of_range_id_names_file_row_group_and_row(synth_ds: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(synth_ds, bad)
    victim = split_files(bad, "val")[0]
    table = pq.read_table(victim)
    ids = table.column("item_id").to_numpy().copy()
    ids[5] = 10**6
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.int64()))
    pq.write_table(table, victim)
    before = entity_table_path(bad, "item").read_bytes()
    with pytest.raises(ValueError, match=rf"{victim.name}: row group 0, row 5: item_id = 1000000 is outside"):
        write_entity_tables(bad, DatasetSpec.load(bad), progress=False)
    assert entity_tables_complete(bad)  # the scan fails before anything is written: old tables kept
    assert entity_table_path(bad, "item").read_bytes() == before


CONFLICT_SPEC = DatasetSpec(
    fields=(
        FieldSpec(name="uid", side="user", vocab_size=6),
        FieldSpec(name="iid", side="item", vocab_size=5),
        FieldSpec(name="hour", side="context", vocab_size=24),
        FieldSpec(name="age", side="user", vocab_size=4),  # after iid in the file: side_fields reorders
        FieldSpec(name="cat", side="item", vocab_size=3),
    ),
    user_id="uid",
    item_id="iid",
)


def test_csv_import_writes_tables_and_reports_conflicts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def csv(name: str, rows: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("uid,iid,hour,age,cat,click,purchase\n" + "\n".join(rows) + "\n")
        return path

    CONFLICT_SPEC.save(tmp_path / "spec.yaml")
    train = csv("train.csv", ["1,2,3,2,1,1,0", "2,2,3,1,1,0,0", "2,3,4,0,2,0,0", "0,4,5,3,0,1,1"])
    val = csv("val.csv", ["3,4,6,1,0,0,0"])
    test = csv("test.csv", ["1,2,7,3,1,1,0"])
    out = tmp_path / "ds"
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.data.entities"):
        import_csv(train, val, test, tmp_path / "spec.yaml", out, progress=False)
    report = _assert_tables_match_rescan(out)
    # user 1: age 2 in train, 3 in test (across splits); user 2: ages 1 then 0 in one row group
    assert report["user"]["conflicts"] == 2 and report["item"]["conflicts"] == 0
    assert any("2 users have more than one profile" in r.getMessage() for r in caplog.records)
    prof, seen = read_entity_rows(out, CONFLICT_SPEC, "user", 0, 6)
    assert prof.tolist() == [[0, 3], [1, 3], [2, 0], [3, 1], [4, 0], [5, 0]]  # uid, age: the last wins
    assert seen.tolist() == [True, True, True, True, False, False]  # 4, 5 unseen: own id, age 0
    prof, seen = read_entity_rows(out, CONFLICT_SPEC, "item", 0, 5)
    assert prof.tolist() == [[0, 0], [1, 0], [2, 1], [3, 2], [4, 0]]
    assert seen.tolist() == [False, False, True, True, True]


def test_aliccp_import_writes_tables(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_raw_aliccp_fixture(raw, n_train_lines=200, n_test_lines=40, seed=4, bad_lines=False)
    out = tmp_path / "ds"
    import_aliccp(raw, out, min_count=2, seed=1, parallel=False, progress=False)
    report = _assert_tables_match_rescan(out)
    assert report["user"]["seen"] > 1 and report["item"]["seen"] > 1


def test_cli_rewrites_deleted_tables(
    synth_ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)  # keep pytest's log capture
    ds = tmp_path / "ds"
    shutil.copytree(synth_ds, ds)
    shutil.rmtree(ds / ENTITIES_DIR)
    assert not dataset_complete(ds)
    with caplog.at_level(logging.INFO, logger="cstwa_dist"):
        assert cli.main(["entities", "--dataset", str(ds)]) == 0
    assert dataset_complete(ds)
    assert any("entity tables written" in r.getMessage() for r in caplog.records)
    _assert_tables_match_rescan(ds)
    for side in ENTITY_SIDES:  # the same bytes as the generator wrote
        assert entity_table_path(ds, side).read_bytes() == entity_table_path(synth_ds, side).read_bytes()
    report = (ds / ENTITIES_DIR / REPORT_NAME).read_text()
    assert report == (synth_ds / ENTITIES_DIR / REPORT_NAME).read_text()
    assert cli.main(["entities", "--dataset", str(ds)]) == 0  # rewriting in place is fine
    names = sorted(p.name for p in (ds / ENTITIES_DIR).iterdir())
    assert names == ["entities.json", "item.parquet", "user.parquet"]  # no temporary left behind
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cstwa_dist"):
        assert cli.main(["entities", "--dataset", str(tmp_path / "nowhere")]) == 2
    assert any("nowhere" in r.getMessage() for r in caplog.records)
