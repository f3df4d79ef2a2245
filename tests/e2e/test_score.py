"""``cstwa-dist score`` as a user runs it, on a tiny ESMM trained one epoch and exported once per
session (``tests/e2e/conftest.py``): a data set's split scores to the exported model's own
predictions, row for row; raw-id Parquet with ids the model never saw is scored and counted (or, with
``--strict``, refused naming file, row and field); a data set whose vocabulary does not extend the
model's is refused before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.e2e.test_cli import BIN, _run

CLI = str(BIN / "cstwa-dist")


def _score(model: Path, source: Path | str, out: Path, *extra: str, check: bool = True):
    return _run(
        [CLI, "score", "--model", str(model), "--input", str(source), "--out", str(out), "--actors", "2",
         "--batch-size", "512", *extra],
        check=check,
    )  # fmt: skip


def _predict(model: Path, table: pa.Table, ids: np.ndarray | None = None) -> np.ndarray:
    import torch

    from cstwa_dist.export.artifact import load_model

    m = load_model(model)
    if ids is None:
        ids = np.stack([table.column(f).to_numpy() for f in m.spec.names], axis=1).astype(np.int64)
    return m.predict(torch.from_numpy(ids)).numpy()


def test_scores_a_split_as_the_exported_model_predicts(model_dir, tiny_dataset, tmp_path):
    out = tmp_path / "scored"
    _score(model_dir, tiny_dataset, out)
    report = json.loads((out / "score.json").read_text())
    files = sorted((tiny_dataset / "test").glob("*.parquet"))
    src = pa.concat_tables([pq.read_table(f) for f in files])
    assert report["rows_in"] == report["rows_out"] == src.num_rows
    assert report["model"] == "esmm" and report["unseen_total"] == 0 and report["ids"] == "rows"
    got = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))])
    assert got.num_rows == src.num_rows
    assert got.column_names[-3:] == ["p_ctr", "p_cvr", "p_ctcvr"]
    assert {"click", "purchase"} <= set(got.column_names)
    for c in ("p_ctr", "p_cvr", "p_ctcvr"):
        assert got.schema.field(c).type == pa.float32()
    # rows keep the input's order, ids as given
    assert np.array_equal(got.column("user_id").to_numpy(), src.column("user_id").to_numpy())
    probs = np.stack([got.column(c).to_numpy() for c in ("p_ctr", "p_cvr", "p_ctcvr")], axis=1)
    np.testing.assert_allclose(probs, _predict(model_dir, got), rtol=0, atol=1e-6)
    # an existing output is never overwritten without --force (refused before anything runs)
    again = _score(model_dir, tiny_dataset, out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def _raw_input(tiny_dataset: Path, folder: Path) -> tuple[Path, int]:
    """The test split as two raw-id files without labels; the second has 5 user ids and 2 item ids the
    model never saw."""
    folder.mkdir()
    table = pa.concat_tables(pq.read_table(f) for f in sorted((tiny_dataset / "test").glob("*.parquet")))
    table = table.drop_columns(["click", "purchase"])
    half = table.num_rows // 2
    for i, t in enumerate((table.slice(0, half), table.slice(half))):
        if i == 1:
            user = t.column("user_id").to_numpy().copy()
            user[[3, 4, 10, 11, 12]] = 10**9 + np.arange(5)
            item = t.column("item_id").to_numpy().copy()
            item[[7, 8]] = -5
            t = t.set_column(t.column_names.index("user_id"), "user_id", pa.array(user))
            t = t.set_column(t.column_names.index("item_id"), "item_id", pa.array(item))
        pq.write_table(t, folder / f"day-{i}.parquet", row_group_size=512)
    return folder / "day-1.parquet", table.num_rows


def test_unseen_raw_ids_are_scored_and_counted(model_dir, tiny_dataset, tmp_path):
    _, rows = _raw_input(tiny_dataset, tmp_path / "raw")
    out = tmp_path / "scored"
    _score(model_dir, str(tmp_path / "raw" / "*.parquet"), out)
    report = json.loads((out / "score.json").read_text())
    assert report["ids"] == "raw" and report["rows_in"] == report["rows_out"] == rows
    assert report["unseen"]["user_id"] == 5 and report["unseen"]["item_id"] == 2
    assert report["unseen_total"] == 7
    got = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))])
    assert got.num_rows == rows and "click" not in got.column_names
    # unseen ids read the zero vector (identity vocabulary: no unknown row): predict with -1 there
    from cstwa_dist.data.spec import DatasetSpec

    spec = DatasetSpec.load(model_dir / "spec.yaml")
    ids = np.stack([got.column(f).to_numpy() for f in spec.names], axis=1).astype(np.int64)
    for j, f in enumerate(spec.fields):
        ids[(ids[:, j] < 0) | (ids[:, j] >= f.vocab_size), j] = -1
    assert (ids == -1).sum() == 7
    probs = np.stack([got.column(c).to_numpy() for c in ("p_ctr", "p_cvr", "p_ctcvr")], axis=1)
    np.testing.assert_allclose(probs, _predict(model_dir, got, ids), rtol=0, atol=1e-6)


def test_strict_stops_naming_file_row_and_field(model_dir, tiny_dataset, tmp_path):
    bad, _ = _raw_input(tiny_dataset, tmp_path / "raw")
    out = tmp_path / "scored"
    proc = _score(model_dir, str(tmp_path / "raw" / "*.parquet"), out, "--strict", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"{bad}: row 3, field 'user_id'" in errors[0] and "1000000000" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".scored.*"))  # nothing half-written


def test_refuses_a_data_set_whose_vocabulary_does_not_extend_the_models(model_dir, tmp_path):
    from cstwa_dist.data.synth import generate

    smaller = tmp_path / "smaller"
    generate("demo", 0.01, 7, smaller, progress=False)  # fewer users and items: rows mean other ids
    proc = _score(model_dir, smaller, tmp_path / "scored", check=False)
    assert proc.returncode == 2
    assert "does not extend the model's" in proc.stderr and "user_id" in proc.stderr
    assert not (tmp_path / "scored").exists()
