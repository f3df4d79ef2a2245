"""SplitReader: row-level shares from metadata, equal steps, each row exactly once, global + local shuffle,
a persistent prefetching stream (errors surface, early stops do not leak), located data errors."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cstwa_dist.data.reader import DataError, SplitReader, measure_input_rate, plan_shares
from cstwa_dist.data.shares import SplitPlan, step_rows, steps_per_epoch
from cstwa_dist.data.spec import DatasetSpec, FieldSpec
from cstwa_dist.data.writer import dataset_schema
from cstwa_dist.runtime import RayRuntime

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
# Uneven files (one empty) with uneven row groups: (rows, row-group size) per file.
UNEVEN = ((100, 32), (37, 10), (0, 8), (5, 2), (61, 61))
TOTAL = sum(n for n, _ in UNEVEN)
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


def _write(path: Path, cols: dict[str, np.ndarray | pa.Array], row_group_size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def _make_split(root: Path, files=UNEVEN, split: str = "train", mutate=None) -> list[tuple[int, int]]:
    """Writes part-0000i.parquet files; returns every row's (user_id, item_id) key in file order.

    ``mutate(i, cols)`` may change the columns of file ``i`` before it is written."""
    keys, start = [], 0
    for i, (n, rg) in enumerate(files):
        cols = _rows(start, n)
        if mutate is not None:
            mutate(i, cols)
        _write(root / split / f"part-{i:05d}.parquet", cols, rg)
        keys += list(
            zip(_rows(start, n)["user_id"].tolist(), _rows(start, n)["item_id"].tolist(), strict=True)
        )
        start += n
    return keys


def _real_keys(batch) -> list[tuple[int, int]]:
    d = batch.features.to_dict()
    u, i = d["user_id"].values(), d["item_id"].values()
    return list(zip(u[batch.mask].tolist(), i[batch.mask].tolist(), strict=True))


def _epoch_keys(reader: SplitReader, epoch: int) -> list[tuple[int, int]]:
    return [k for b in reader.epoch(epoch) for k in _real_keys(b)]


def _reader(root: Path, **kw) -> SplitReader:
    opts = {"rank": 0, "world_size": 1, "batch_size": BS, "seed": 1, "shuffle": True, **kw}
    return SplitReader(root, "train", SPEC, **opts)


def _input_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cstwa-input") and t.is_alive()]


@pytest.fixture(scope="module")
def ray_runtime():
    with RayRuntime(num_cpus=2) as rt:
        yield rt


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("uneven")
    return root, _make_split(root)


# --- shares from metadata (no Ray) ----------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7, 250])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shares_partition_every_row_once_with_floor_ceil_sizes(uneven, world_size, shuffle):
    root, _ = uneven
    files = sorted((root / "train").glob("*.parquet"))
    plan = SplitPlan(files)
    assert plan.total_rows == TOTAL and plan.num_units == 4 + 4 + 0 + 3 + 1  # empty file: no unit
    starts = np.cumsum([0] + [n for n, _ in UNEVEN])  # global row index of each file's row 0
    for epoch in range(3):
        shares = plan_shares(files, world_size, seed=4, epoch=epoch, shuffle=shuffle)
        seen: Counter = Counter()
        sizes = []
        for share in shares:
            sizes.append(sum(s.rows for s in share))
            for s in share:
                assert (
                    0 <= s.start < s.stop <= pq.read_metadata(files[s.file]).row_group(s.row_group).num_rows
                )
                seen.update(range(starts[s.file] + s.file_row, starts[s.file] + s.file_row + s.rows))
        assert seen == Counter(range(TOTAL)), "every row exactly once per epoch"
        assert set(sizes) <= {TOTAL // world_size, -(-TOTAL // world_size)}
        steps = steps_per_epoch(TOTAL, world_size, BS)
        for rows in sizes:  # at most one step of padding per rank
            assert steps - rows // BS <= 1
        assert sum(step_rows(TOTAL, world_size, BS, s) for s in range(steps)) == TOTAL
        if not shuffle:  # file order, contiguous ranges: concatenated in rank order = the split
            flat = [starts[s.file] + s.file_row + j for share in shares for s in share for j in range(s.rows)]
            assert flat == list(range(TOTAL))


def test_global_shuffle_moves_rows_between_ranks_and_seeds_do_not_replay(uneven):
    root, _ = uneven
    files = sorted((root / "train").glob("*.parquet"))
    plan = SplitPlan(files)

    def rank0(seed, epoch):
        return [
            (s.file, s.row_group, s.start)
            for s in plan_shares(files, 2, seed=seed, epoch=epoch, shuffle=True)[0]
        ]

    assert rank0(3, 0) != rank0(3, 1) != rank0(3, 2)
    assert rank0(3, 1) == rank0(3, 1)
    for e in range(1, 6):  # seed + epoch is not the seed: (s, e) and (s+1, e-1) differ
        assert not np.array_equal(plan.order(3, e, True), plan.order(4, e - 1, True))
    assert plan_shares(files, 1)[0] == plan_shares(files, 1, seed=9, epoch=5)[0]  # no shuffle: file order


# --- streaming (real Ray Data) ----------------------------------------------------------------------
@pytest.mark.parametrize("world_size,shuffle", [(1, True), (2, True), (3, False), (5, True), (7, False)])
def test_equal_steps_each_row_once_and_global_rows(ray_runtime, uneven, world_size, shuffle):
    root, keys = uneven
    readers = [_reader(root, rank=r, world_size=world_size, shuffle=shuffle) for r in range(world_size)]
    steps = readers[0].steps_per_epoch
    assert {r.steps_per_epoch for r in readers} == {steps} == {math.ceil(math.ceil(TOTAL / world_size) / BS)}
    assert sum(r.rows for r in readers) == readers[0].total_rows == TOTAL
    assert {r.rows for r in readers} <= {TOTAL // world_size, -(-TOTAL // world_size)}
    seen: Counter = Counter()
    real_per_step = np.zeros(steps, dtype=np.int64)
    for reader in readers:
        batches = list(reader.epoch(0))
        assert len(batches) == steps
        assert sum(not bool(b.mask.all()) for b in batches) <= 1  # at most one step with padding
        real = 0
        for s, b in enumerate(batches):
            assert b.size == BS and b.mask.shape == (BS,) and b.mask.dtype == torch.bool
            assert b.features.keys() == SPEC.names and b.features.stride() == BS
            assert b.click.dtype == torch.float32 and b.purchase.dtype == torch.float32
            assert bool(((b.purchase <= b.click) | ~b.mask).all())
            assert b.global_rows == reader.step_rows(0, s)
            real += int(b.mask.sum())
            real_per_step[s] += int(b.mask.sum())
            seen.update(_real_keys(b))
        assert real == reader.rows
        reader.close()
    assert seen == Counter(keys) and max(seen.values()) == 1
    assert [readers[0].step_rows(3, s) for s in range(steps)] == real_per_step.tolist()


def test_same_seed_epoch_same_batches_other_epoch_other_rows_per_rank(ray_runtime, uneven):
    root, keys = uneven

    def batches(reader, epoch):
        return [
            (b.features.values().tolist(), b.click.tolist(), b.mask.tolist()) for b in reader.epoch(epoch)
        ]

    with _reader(root, rank=1, world_size=2, seed=7) as a, _reader(root, rank=1, world_size=2, seed=7) as b:
        b0 = batches(a, 0)
        assert batches(b, 0) == b0  # fresh reader, same (seed, epoch, rank)
        assert batches(a, 1) == batches(b, 1)
        k0, k1 = set(_epoch_keys(a, 0)), set(_epoch_keys(a, 1))
        assert k0 != k1  # the global shuffle gives rank 1 other rows in another epoch
    with _reader(root, seed=7) as one, _reader(root, seed=8) as other:
        e1 = _epoch_keys(one, 1)
        assert sorted(e1) == sorted(keys) and e1 != keys  # shuffled, complete
        assert _epoch_keys(other, 0) != e1  # seed s+1 epoch e-1 does not replay seed s epoch e


def test_no_shuffle_is_file_order_with_padding_copies_and_reusable(ray_runtime, uneven):
    root, keys = uneven
    with _reader(root, shuffle=False, seed=0) as reader:
        batches = list(reader.epoch(3))
        assert [k for b in batches for k in _real_keys(b)] == keys
        last = batches[-1]
        n = TOTAL % BS
        assert int(last.mask.sum()) == n and bool(last.mask[:n].all())
        d = last.features.to_dict()["user_id"].values()
        assert torch.equal(d[n:], d[:n].repeat(BS)[: BS - n])  # padding = copies of real rows
        reader.prefetch(0)  # the next evaluation pass, started ahead
        for _ in range(2):  # one reader serves every pass
            assert _epoch_keys(reader, 0) == keys
    two = [_reader(root, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert _epoch_keys(two[0], 0) + _epoch_keys(two[1], 0) == keys  # rank order = file order
    for r in two:
        r.close()


def test_all_padding_step_uses_copies_and_empty_rank_pads_zeros(ray_runtime, tmp_path, caplog):
    # 2 ranks, 33 rows, batch 16: shares 16 and 17 → 2 steps; rank 0 runs one all-padding step
    _make_split(tmp_path, files=((33, 8),))
    with _reader(tmp_path, world_size=2) as r0:
        b = list(r0.epoch(0))
        assert [int(x.mask.sum()) for x in b] == [16, 0]
        assert torch.equal(b[1].features.values(), b[0].features.values())  # copies of real rows
        assert [b[0].global_rows, b[1].global_rows] == [32, 1]
    # 3 rows on 5 ranks (bounds r*3//5 = 0,0,1,1,2,3): ranks 0 and 2 have nothing, warn once, pad with id 0
    small = tmp_path / "small"
    _make_split(small, files=((3, 2),))
    with caplog.at_level(logging.WARNING, logger="cstwa_dist.data.reader"):
        empty = _reader(small, rank=2, world_size=5)
        batches = list(empty.epoch(0)) + list(empty.epoch(1))
    assert len(batches) == 2 * empty.steps_per_epoch == 2
    assert all(not x.mask.any() and int(x.features.values().abs().sum()) == 0 for x in batches)
    assert sum("no rows" in r.getMessage() for r in caplog.records) == 1
    empty.close()


def test_measure_input_rate(ray_runtime, uneven):
    root, _ = uneven
    with _reader(root, seed=0) as reader:
        out = measure_input_rate(reader, epochs=2)
    assert out["rows"] == 2 * TOTAL and out["rows_per_s"] > 0 and out["rows_per_s_after_first"] > 0
    assert out["per_epoch"][0]["steps"] == reader.steps_per_epoch == 13
    assert all(p["first_batch_s"] > 0 for p in out["per_epoch"])


def test_early_stop_then_new_epoch_and_close_leaves_no_thread(ray_runtime, uneven):
    root, keys = uneven
    reader = _reader(root, prefetch_batches=1)
    for i, _ in enumerate(reader.epoch(0)):
        if i == 1:
            break  # the stream of epoch 0 is stopped; its producer must not stay blocked
    assert sorted(_epoch_keys(reader, 1)) == sorted(keys)
    with _reader(root) as fresh:
        assert _epoch_keys(reader, 0) == _epoch_keys(fresh, 0)  # a restarted epoch is the same epoch
    it = reader.epoch(2)
    next(it)
    reader.close()
    deadline = time.monotonic() + 10
    while _input_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _input_threads()
    with pytest.raises(RuntimeError):
        list(it)  # a stream of a closed reader ends with an error, never a hang
    with pytest.raises(RuntimeError, match="closed"):
        reader.epoch(3)


def test_lookahead_starts_the_next_epoch_and_stops_after_the_last(ray_runtime, uneven):
    root, keys = uneven
    with _reader(root, epochs=2) as reader:
        list(reader.epoch(0))
        ahead = reader._streams._ahead  # started once epoch 0 had been read, before its last batch
        assert ahead is not None and ahead.key == 1
        assert sorted(_epoch_keys(reader, 1)) == sorted(keys)
        assert reader._streams._current is ahead and reader._streams._ahead is None  # none past the last
    with _reader(root, shuffle=False) as evaluation:  # evaluation readers: no look-ahead by default
        list(evaluation.epoch(0))
        assert evaluation._streams._ahead is None


def test_producer_error_surfaces_with_its_message(ray_runtime, uneven, monkeypatch):
    import cstwa_dist.data.reader as reader_mod

    root, _ = uneven
    real = reader_mod.batch_from_columns
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("KJT build failed at batch 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(reader_mod, "batch_from_columns", flaky)
    with _reader(root, lookahead=False) as reader:
        with pytest.raises(ValueError, match="KJT build failed at batch 3"):
            list(reader.epoch(0))
        assert len(list(reader.epoch(1))) == reader.steps_per_epoch  # the reader still works


def test_read_failure_in_ray_task_surfaces(ray_runtime, tmp_path):
    _make_split(tmp_path)
    with _reader(tmp_path, shuffle=False, lookahead=False) as reader:
        victim = tmp_path / "train" / "part-00004.parquet"
        victim.unlink()  # planned from the footer, gone when the read task opens it
        with pytest.raises(Exception, match="part-00004.parquet"):
            list(reader.epoch(0))


def test_empty_split_is_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / "val").mkdir(exist_ok=True)
        pq.write_table(dataset_schema(SPEC).empty_table(), tmp_path / "val" / f"part-{i:05d}.parquet")
    with pytest.raises(DataError, match=r"dataset .* split 'val' has no rows"):
        SplitReader(tmp_path, "val", SPEC, rank=0, world_size=2, batch_size=BS, seed=0, shuffle=False)


# --- located data errors ----------------------------------------------------------------------------
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
    _make_split(tmp_path, mutate=lambda i, cols: mutate(cols) if i == 1 else None)
    bad_file = tmp_path / "train" / "part-00001.parquet"
    readers = [_reader(tmp_path, rank=r, world_size=2, seed=3, shuffle=shuffle) for r in range(2)]
    # the rank whose epoch-0 share holds row 17 of part-00001
    owner = next(
        r
        for r in readers
        if any(r.files[s.file] == bad_file and s.file_row <= 17 < s.file_row + s.rows for s in r.slices(0))
    )
    with pytest.raises(DataError) as info:
        list(owner.epoch(0))
    msg = str(info.value)
    assert str(bad_file) in msg and "row 17" in msg and repr(field) in msg and what in msg, msg
    other = readers[1 - readers.index(owner)]  # the rank without the bad row streams fine
    assert len(list(other.epoch(0))) == other.steps_per_epoch
    for r in readers:
        r.close()


def test_out_of_range_message_format(ray_runtime, tmp_path):
    cols = _rows(0, 30)
    cols["item_id"] = cols["item_id"].copy()
    cols["item_id"][5] = 41
    _write(tmp_path / "train" / "part-00000.parquet", cols)
    with _reader(tmp_path, shuffle=False) as reader:
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


# --- data.shares: the same global batches at any world size ---------------------------------------------
def _global_batches(root: Path, world_size: int, shares: int, global_bs: int, epoch: int) -> list[dict]:
    """Every step's global batch (ranks' batches concatenated in rank order): ids, labels, mask, keys."""
    per_rank = []
    for r in range(world_size):
        reader = _reader(
            root, rank=r, world_size=world_size, batch_size=global_bs // world_size, shares=shares
        )
        per_rank.append(list(reader.epoch(epoch)))
        reader.close()
    out = []
    for parts in zip(*per_rank, strict=True):
        d = [b.features.to_dict() for b in parts]
        out.append(
            {
                "item": np.concatenate([x["item_id"].values().numpy() for x in d]),
                "user": np.concatenate([x["user_id"].values().numpy() for x in d]),
                "click": np.concatenate([b.click.numpy() for b in parts]),
                "mask": np.concatenate([b.mask.numpy() for b in parts]),
                "keys": sum((b.dropout_keys for b in parts), ()),
                "global_rows": {b.global_rows for b in parts},
            }
        )
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_shares_give_the_same_global_batches_at_any_world_size(ray_runtime, uneven, shuffle):
    """data.shares=4 with a global batch of 32: 1, 2 and 4 ranks read the same rows in every step, in the
    same order, with the same padding and dropout keys; every row once per epoch."""
    root, keys = uneven
    ref = _global_batches(root, 1, 4, 32, epoch=1) if shuffle else None
    for world in (1, 2, 4):
        got = _global_batches(root, world, 4, 32, epoch=1)
        if ref is None:
            ref = got
        assert len(got) == len(ref) == math.ceil(math.ceil(TOTAL / 4) / 8)
        for a, b in zip(got, ref, strict=True):
            assert np.array_equal(a["user"], b["user"]) and np.array_equal(a["item"], b["item"])
            assert np.array_equal(a["click"], b["click"])
            assert np.array_equal(a["mask"], b["mask"]) and a["keys"] == b["keys"] and len(a["keys"]) == 4
            assert a["global_rows"] == b["global_rows"] == {int(a["mask"].sum())}
    real = Counter(
        (int(u), int(i)) for g in ref for u, i in zip(g["user"][g["mask"]], g["item"][g["mask"]], strict=True)
    )
    assert real == Counter(keys)


def test_shares_that_do_not_fit_are_refused(uneven):
    root, _ = uneven
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        _reader(root, rank=0, world_size=2, shares=3)
    with pytest.raises(ValueError, match="batch_size=16 must be a multiple of the 3 shares"):
        _reader(root, rank=0, world_size=1, shares=3)
