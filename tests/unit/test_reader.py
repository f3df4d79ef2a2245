"""SplitReader: equal steps on every rank, each row exactly once, seeded shuffle, located data errors."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cstwa_dist.data.reader import DataError, SplitReader, measure_input_rate, plan_shares
from cstwa_dist.data.spec import DatasetSpec, FieldSpec
from cstwa_dist.distributed.runtime import RayRuntime

SPEC = DatasetSpec(
    fields=(
        FieldSpec(name="user_id", side="user", vocab_size=50),
        FieldSpec(name="age", side="user", vocab_size=5),
        FieldSpec(name="item_id", side="item", vocab_size=40),
        FieldSpec(name="cat", side="item", vocab_size=6),
        FieldSpec(name="hour", side="context", vocab_size=24),
    ),
    user_id="user_id",
    item_id="item_id",
)
UNEVEN = (100, 37, 5)
BS = 16


def _rows(start: int, n: int) -> dict[str, np.ndarray]:
    """Rows with global index g in [start, start+n); (user_id, item_id) encodes g uniquely (g < 2000)."""
    g = np.arange(start, start + n, dtype=np.int64)
    click = (g % 3 == 0).astype(np.int8)
    return {
        "user_id": g % 50,
        "age": g % 5,
        "item_id": (g // 50) % 40,
        "cat": g % 6,
        "hour": g % 24,
        "click": click,
        "purchase": (click * (g % 2 == 0)).astype(np.int8),
    }


def _write(path: Path, cols: dict[str, np.ndarray | pa.Array]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=32)


def _make_split(root: Path, sizes=UNEVEN, split: str = "train") -> list[tuple[int, int]]:
    """Writes part-0000i.parquet files; returns every row's (user_id, item_id) key in file order."""
    keys, start = [], 0
    for i, n in enumerate(sizes):
        cols = _rows(start, n)
        _write(root / split / f"part-{i:05d}.parquet", cols)
        keys += list(zip(cols["user_id"].tolist(), cols["item_id"].tolist(), strict=True))
        start += n
    return keys


def _real_keys(batch) -> list[tuple[int, int]]:
    d = batch.features.to_dict()
    u, i = d["user_id"].values(), d["item_id"].values()
    return list(zip(u[batch.mask].tolist(), i[batch.mask].tolist(), strict=True))


def _epoch_keys(reader: SplitReader, epoch: int) -> list[tuple[int, int]]:
    keys = []
    for b in reader.epoch(epoch):
        keys += _real_keys(b)
    return keys


@pytest.fixture(scope="module")
def ray_runtime():
    with RayRuntime(num_cpus=2) as rt:
        yield rt


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("uneven")
    return root, _make_split(root)


def test_plan_shares_balanced_and_deterministic(tmp_path):
    _make_split(tmp_path, sizes=(100, 37, 5, 60, 60))
    files = sorted((tmp_path / "train").glob("*.parquet"))
    shares = plan_shares(files, 2)
    # largest first to the least-loaded rank: 100→r0, 60→r1, 60→r1, 37→r0, 5→r1; files keep order
    assert shares == [[files[0], files[1]], [files[2], files[3], files[4]]]
    assert plan_shares(files, 2) == shares
    assert plan_shares(list(reversed(files)), 2) != [] and plan_shares(files, 1) == [files]
    five = plan_shares(files, 6)
    assert sorted(f for s in five for f in s) == files and sum(not s for s in five) == 1


@pytest.mark.parametrize("world_size,shuffle", [(2, True), (3, False), (4, True)])
def test_equal_steps_and_each_row_exactly_once(ray_runtime, uneven, world_size, shuffle):
    root, keys = uneven
    opts = {"world_size": world_size, "batch_size": BS, "seed": 1, "shuffle": shuffle}
    readers = [SplitReader(root, "train", SPEC, rank=r, **opts) for r in range(world_size)]
    steps = {r.steps_per_epoch for r in readers}
    assert len(steps) == 1
    assert steps.pop() == -(-max(r.rows for r in readers) // BS)
    assert sum(r.rows for r in readers) == readers[0].total_rows == sum(UNEVEN)
    seen: Counter = Counter()
    for reader in readers:
        batches = list(reader.epoch(0))
        assert len(batches) == reader.steps_per_epoch
        real = 0
        for b in batches:
            assert b.size == BS and b.mask.shape == (BS,) and b.mask.dtype == torch.bool
            assert b.features.keys() == SPEC.names and b.features.stride() == BS
            assert b.click.dtype == torch.float32 and b.purchase.dtype == torch.float32
            assert bool(((b.purchase <= b.click) | ~b.mask).all())
            real += int(b.mask.sum())
            seen.update(_real_keys(b))
        assert real == reader.rows
    assert seen == Counter(keys) and max(seen.values()) == 1
    if world_size == 4:  # 3 files for 4 ranks: one rank has nothing and pads with zero ids
        empty = next(r for r in readers if r.rows == 0)
        assert empty.files == []
        b = next(iter(empty.epoch(0)))
        assert not b.mask.any() and int(b.features.values().abs().sum()) == 0


def test_empty_rank_warns_once(ray_runtime, uneven, caplog):
    root, _ = uneven
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.data.reader"):
        reader = SplitReader(root, "train", SPEC, rank=3, world_size=4, batch_size=BS, seed=0, shuffle=True)
        assert len(list(reader.epoch(0))) == reader.steps_per_epoch == 7
    assert sum("no rows" in r.getMessage() for r in caplog.records) == 1


def test_shuffle_reproducible_and_differs_across_epochs(ray_runtime, uneven):
    root, keys = uneven
    make = lambda: SplitReader(root, "train", SPEC, rank=0, world_size=1, batch_size=BS, seed=7, shuffle=True)  # noqa: E731
    a0, a1 = _epoch_keys(make(), 0), _epoch_keys(make(), 1)
    reader = make()
    assert _epoch_keys(reader, 0) == a0  # same seed + epoch, fresh reader
    assert _epoch_keys(reader, 1) == a1
    assert a0 != a1 and a0 != keys
    assert sorted(a0) == sorted(a1) == sorted(keys)


def test_no_shuffle_is_file_order_with_padding_copies(ray_runtime, uneven):
    root, keys = uneven
    reader = SplitReader(root, "train", SPEC, rank=0, world_size=1, batch_size=BS, seed=0, shuffle=False)
    batches = list(reader.epoch(3))
    assert [k for b in batches for k in _real_keys(b)] == keys
    last = batches[-1]
    n = sum(UNEVEN) % BS
    assert int(last.mask.sum()) == n and bool(last.mask[:n].all())
    d = last.features.to_dict()["user_id"].values()
    assert torch.equal(d[n:], d[:n].repeat(BS)[: BS - n])  # padding = copies of real rows


def test_measure_input_rate(ray_runtime, uneven):
    root, _ = uneven
    reader = SplitReader(root, "train", SPEC, rank=0, world_size=1, batch_size=BS, seed=0, shuffle=True)
    out = measure_input_rate(reader, epochs=1)
    assert out["rows"] == sum(UNEVEN) and out["rows_per_s"] > 0
    assert out["per_epoch"][0]["steps"] == reader.steps_per_epoch == 9


def _bad(name: str):
    """Modifies row 17 of part-00001 (the 2nd file); returns (mutator, field named in the error)."""

    def setter(col: str, value):
        def mutate(cols):
            a = cols[col].copy()
            a[17] = value
            cols[col] = a

        return mutate

    def null_hour(cols):
        vals = cols["hour"].tolist()
        vals[17] = None
        cols["hour"] = pa.array(vals, type=pa.int64())

    def click0_purchase1(cols):
        cols["click"] = cols["click"].copy()
        cols["purchase"] = cols["purchase"].copy()
        cols["click"][17], cols["purchase"][17] = 0, 1

    return {
        "out_of_range": (setter("item_id", 40), "item_id", "out of range"),
        "negative": (setter("age", -1), "age", "negative"),
        "null": (null_hour, "hour", "null"),
        "label_2": (setter("click", 2), "click", "not in {0, 1}"),
        "click0_purchase1": (click0_purchase1, "purchase", "click=0"),
    }[name]


@pytest.mark.parametrize(
    "case,shuffle",
    [
        ("out_of_range", True),
        ("negative", False),
        ("null", True),
        ("label_2", True),
        ("click0_purchase1", True),
    ],
)
def test_bad_value_raises_located_error(ray_runtime, tmp_path, case, shuffle):
    mutate, field, what = _bad(case)
    start = 0
    for i, n in enumerate(UNEVEN):
        cols = _rows(start, n)
        if i == 1:
            mutate(cols)
        _write(tmp_path / "train" / f"part-{i:05d}.parquet", cols)
        start += n
    bad_file = tmp_path / "train" / "part-00001.parquet"
    # with 2 ranks part-00001 belongs to rank 1 (100 → r0, 37 → r1, 5 → r1)
    reader = SplitReader(
        tmp_path, "train", SPEC, rank=1, world_size=2, batch_size=BS, seed=3, shuffle=shuffle
    )
    assert bad_file in reader.files
    with pytest.raises(DataError) as info:
        list(reader.epoch(0))
    msg = str(info.value)
    assert str(bad_file) in msg and "row 17" in msg and repr(field) in msg and what in msg, msg
    if case != "null":
        return
    # the rank without the bad file streams fine
    other = SplitReader(tmp_path, "train", SPEC, rank=0, world_size=2, batch_size=BS, seed=3, shuffle=shuffle)
    assert len(list(other.epoch(0))) == other.steps_per_epoch


def test_out_of_range_message_format(ray_runtime, tmp_path):
    cols = _rows(0, 30)
    cols["item_id"] = cols["item_id"].copy()
    cols["item_id"][5] = 41
    _write(tmp_path / "train" / "part-00000.parquet", cols)
    reader = SplitReader(tmp_path, "train", SPEC, rank=0, world_size=1, batch_size=BS, seed=0, shuffle=False)
    expected = r"part-00000\.parquet row 5 field 'item_id': id 41 out of range \[0, 40\)"
    with pytest.raises(DataError, match=expected):
        list(reader.epoch(0))


@pytest.mark.parametrize("column,what", [("cat", "missing"), ("purchase", "missing"), ("age", "type double")])
def test_schema_error_at_construction(tmp_path, column, what):
    _make_split(tmp_path)
    bad_file = tmp_path / "train" / "part-00002.parquet"
    cols = _rows(0, 5)
    if what == "missing":
        del cols[column]
    else:
        cols[column] = cols[column].astype(np.float64)
    _write(bad_file, cols)
    with pytest.raises(DataError) as info:  # no Ray needed: footer-only check before any streaming
        SplitReader(tmp_path, "train", SPEC, rank=0, world_size=2, batch_size=BS, seed=0, shuffle=False)
    msg = str(info.value)
    assert str(bad_file) in msg and repr(column) in msg and what in msg, msg


def test_ray_runtime_is_idempotent(ray_runtime):
    import ray

    with RayRuntime() as inner:
        assert ray.is_initialized()
    assert ray.is_initialized() and inner.address is None
