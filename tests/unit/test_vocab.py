"""Vocabularies (``cstwa_dist.data.vocab``): identity fallback, save/load, raw id -> row lookups and the
extension check that keeps rows stable across days."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cstwa_dist.data.spec import DatasetSpec, FieldSpec
from cstwa_dist.data.vocab import (
    FieldVocab,
    VocabError,
    Vocabulary,
    by_row_array,
    lineage_digest,
    table_field,
)

SPEC = DatasetSpec(
    fields=(
        FieldSpec(name="uid", side="user", vocab_size=10),
        FieldSpec(name="iid", side="item", vocab_size=6),
        FieldSpec(name="hour", side="context", vocab_size=24),
    ),
    user_id="uid",
    item_id="iid",
)


def _day1() -> Vocabulary:
    """iid: a table with unknown row 0 and raw ids 50, 20, 90 on rows 2, 1, 3 (sorted by raw id)."""
    fv, t = table_field("iid", np.array([-1, 20, 50, 90]), unknown_row=0)
    v = Vocabulary.identity(SPEC)
    return Vocabulary({**v.fields, "iid": fv}, {"iid": t})


def test_identity_for_a_dataset_without_vocab(tmp_path: Path) -> None:
    SPEC.save(tmp_path / "spec.yaml")
    v = Vocabulary.load(tmp_path)
    assert {n: (f.kind, f.size) for n, f in v.fields.items()} == {
        "uid": ("identity", 10),
        "iid": ("identity", 6),
        "hour": ("identity", 24),
    }
    assert v.rows("uid", np.array([0, 9, 10, -3])).tolist() == [0, 9, -1, -1]
    with pytest.raises(FileNotFoundError):
        Vocabulary.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="spec.yaml"):
        Vocabulary.load(tmp_path / "empty")
    assert Vocabulary.load(tmp_path / "empty", spec=SPEC).fields == v.fields


def test_round_trip_and_rows(tmp_path: Path) -> None:
    v = _day1()
    v.save(tmp_path / "ds" / "vocab")
    doc = json.loads((tmp_path / "ds" / "vocab" / "vocab.json").read_text())
    assert list(doc["fields"]) == ["uid", "iid", "hour"]
    assert doc["fields"]["iid"]["lineage"] == [
        {"size": 4, "sha256": lineage_digest(np.array([-1, 20, 50, 90]))}
    ]
    for where in (tmp_path / "ds", tmp_path / "ds" / "vocab", tmp_path / "ds" / "vocab" / "vocab.json"):
        w = Vocabulary.load(where)
        assert w.to_json() == v.to_json()
        assert w.rows("iid", np.array([[50, 7], [90, 20]])).tolist() == [[2, -1], [3, 1]]
        assert w.by_row("iid").tolist() == [-1, 20, 50, 90]
    # save of a loaded vocabulary copies the table file
    w.save(tmp_path / "copy")
    assert Vocabulary.load(tmp_path / "copy").rows("iid", np.array([20])).tolist() == [1]


def test_load_refuses_malformed(tmp_path: Path) -> None:
    _day1().save(tmp_path)
    doc = json.loads((tmp_path / "vocab.json").read_text())
    doc["fields"]["iid"]["kind"] = "hash"
    (tmp_path / "vocab.json").write_text(json.dumps(doc))
    with pytest.raises(VocabError, match="'iid'.*kind"):
        Vocabulary.load(tmp_path)
    (tmp_path / "iid.parquet").unlink()
    doc["fields"]["iid"]["kind"] = "table"
    (tmp_path / "vocab.json").write_text(json.dumps(doc))
    with pytest.raises(VocabError, match="'iid'.*not found"):
        Vocabulary.load(tmp_path)


def test_check_extends() -> None:
    old = _day1()
    # day 2: old rows kept, raw ids 30 and 10 appended in raw-id order
    by_row = np.concatenate([old.by_row("iid"), [10, 30]])
    fv, t = table_field("iid", by_row, 0, previous=old.fields["iid"])
    new = Vocabulary(
        {**old.fields, "iid": fv, "uid": FieldVocab("uid", "identity", 12, None, (), None)}, {"iid": t}
    )
    assert len(fv.lineage) == 2 and fv.lineage[0] == old.fields["iid"].lineage[0]
    new.check_extends(old)
    new.check_extends(new)
    assert new.rows("iid", np.array([50, 10, 30])).tolist() == [2, 4, 5]
    with pytest.raises(VocabError, match="'uid'.*smaller"):
        old.check_extends(new)

    # a reorder: the same raw ids on other rows (a fresh import in raw-id order)
    fv_r, t_r = table_field("iid", np.array([-1, 10, 20, 30, 50, 90]), 0)
    with pytest.raises(VocabError, match="'iid'.*not hold"):
        Vocabulary({**old.fields, "iid": fv_r}, {"iid": t_r}).check_extends(old)
    # a shrink
    fv_s, t_s = table_field("iid", np.array([-1, 20, 50]), 0)
    with pytest.raises(VocabError, match="'iid'.*smaller"):
        Vocabulary({**old.fields, "iid": fv_s}, {"iid": t_s}).check_extends(old)
    # a different kind
    ident = Vocabulary.identity(SPEC)
    with pytest.raises(VocabError, match="'iid'.*kind"):
        ident.check_extends(old)
    # a missing field
    with pytest.raises(VocabError, match="'iid'.*not in this one"):
        Vocabulary({"uid": old.fields["uid"]}).check_extends(old)
    # a different unknown row
    fv_u, t_u = table_field("iid", by_row, None, previous=old.fields["iid"])
    with pytest.raises(VocabError, match="'iid'.*unknown_row"):
        Vocabulary({**old.fields, "iid": fv_u}, {"iid": t_u}).check_extends(old)


def test_by_row_and_digest_units() -> None:
    assert by_row_array(np.array([7, 3]), np.array([2, 1]), 4).tolist() == [-1, 3, 7, -1]
    assert lineage_digest(np.array([-1, 5])) != lineage_digest(np.array([5, -1]))
    with pytest.raises(VocabError, match="two rows"):
        table_field("iid", np.array([-1, 5, 5]), 0)
