"""Every table starts from ``(seed, table, global row)``: the same values on 1 process and on 2 ranks.

ESMM (table-wise field tables) and CSTWA (plus its row-wise ``sm__`` structure tables) are built
through ``build_sharded`` on 1 process and on 2 gloo ranks; each rank returns its local shards with
their global offsets, the test reassembles every table (each element covered exactly once) and asserts
the two worlds bitwise equal, inside TorchRec's bounds (``distributed/init.py``). A single-process
case covers what the tiny tables cannot: tables of several blocks, and shards that split rows and
columns at arbitrary places.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from cstwa_dist.distributed.spawn import spawn_ranks
from tests.distributed.common import WORLD, rank_setup

MODELS = ("esmm", "cstwa")


def _tables_worker(rank: int, world: int, dataset: str) -> dict[str, Any]:
    """Per model: every table's local blocks ``(row, col, values)``, shape, bounds and number of shards,
    and the dense tensors of the state dict."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from cstwa_dist.distributed.tables import local_blocks, table_configs, table_keys
    from cstwa_dist.train.trainer import build_sharded

    out: dict[str, Any] = {}
    for model in MODELS:
        cfg, env, spec = rank_setup(dataset)
        sharded = build_sharded(cfg, model, env, spec)
        state = sharded.dmp.state_dict()
        keys = table_keys(state)
        configs = table_configs(sharded.dmp)
        tables = {}
        for table, key in keys.items():
            value = state[key]
            c = configs[table]
            tables[table] = {
                "shape": (c.num_embeddings, c.embedding_dim),
                "bounds": (c.get_weight_init_min(), c.get_weight_init_max()),
                "shards": len(value.metadata().shards_metadata) if isinstance(value, ShardedTensor) else 1,
                "blocks": [(r, col, v.detach().float().clone()) for r, col, v in local_blocks(value)],
            }
        dense = {
            k: v.detach().clone()
            for k, v in state.items()
            if k not in keys.values() and isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)
        }
        out[model] = {"tables": tables, "dense": dense}
    return out


def _assemble(ranks: list[dict[str, Any]], model: str) -> dict[str, torch.Tensor]:
    """Every table of ``model`` whole, from all ranks' blocks; each element must come exactly once."""
    full: dict[str, torch.Tensor] = {}
    for table, info in ranks[0][model]["tables"].items():
        t = torch.zeros(info["shape"])
        seen = torch.zeros(info["shape"], dtype=torch.int32)
        for r in ranks:
            for row, col, v in r[model]["tables"][table]["blocks"]:
                t[row : row + v.shape[0], col : col + v.shape[1]] = v
                seen[row : row + v.shape[0], col : col + v.shape[1]] += 1
        assert bool((seen == 1).all()), (model, table, "blocks do not cover the table exactly once")
        full[table] = t
    return full


@pytest.fixture(scope="module")
def worlds(tiny_dataset) -> dict[int, list[dict[str, Any]]]:
    return {w: spawn_ranks(_tables_worker, w, str(tiny_dataset)) for w in (1, WORLD)}


@pytest.mark.parametrize("model", MODELS)
def test_tables_start_equal_on_1_process_and_2_ranks(worlds, model):
    one, two = _assemble(worlds[1], model), _assemble(worlds[WORLD], model)
    assert set(one) == set(two)
    differ = [t for t in one if not torch.equal(one[t], two[t])]
    assert not differ, f"{model}: tables {differ} start differently on 1 and {WORLD} ranks"
    for table, values in one.items():
        low, high = worlds[1][0][model]["tables"][table]["bounds"]
        rows = values.shape[0]
        assert low == pytest.approx(-math.sqrt(1.0 / rows)) and high == pytest.approx(math.sqrt(1.0 / rows))
        assert float(values.min()) >= low and float(values.max()) < high, table
        if values.numel() >= 400:  # drawn over the whole range, not a constant or a corner of it
            assert float(values.std()) == pytest.approx((high - low) / math.sqrt(12.0), rel=0.25), table
    if model == "cstwa":  # the structure tables are row-wise: split over the ranks
        row_wise = [t for t, i in worlds[WORLD][0][model]["tables"].items() if i["shards"] == WORLD]
        assert {"sm__user", "sm__item"} <= set(row_wise), row_wise


@pytest.mark.parametrize("model", MODELS)
def test_dense_layers_start_equal_on_every_rank_and_world(worlds, model):
    ref = worlds[1][0][model]["dense"]
    assert ref
    for w, ranks in worlds.items():
        for rank, r in enumerate(ranks):
            dense = r[model]["dense"]
            assert set(dense) == set(ref), (w, rank)
            differ = [k for k in ref if not torch.equal(ref[k], dense[k])]
            assert not differ, f"{model}: world {w} rank {rank}: dense {differ[:5]} differ from 1 process"


def test_blocks_are_the_same_whatever_the_split():
    """A table of several blocks, written whole and as shards cut at arbitrary rows and columns
    (as row-wise, column-wise and table-wise plans cut it), holds the same values; another seed or
    table name gives other values; the first rows keep their values when the table grows."""
    from cstwa_dist.distributed.init import BLOCK_ROWS, fill_block

    rows, width, low, high = 2 * BLOCK_ROWS + 123, 6, -0.1, 0.1
    whole = torch.empty(rows, width)
    fill_block(whole, 0, 0, 7, "t", width, low, high)
    cuts = [(0, 5000, 0, width), (5000, BLOCK_ROWS + 17, 0, 4), (5000, BLOCK_ROWS + 17, 4, width)]
    cuts += [(BLOCK_ROWS + 17, rows, 0, 1), (BLOCK_ROWS + 17, rows, 1, width)]
    pieced = torch.full((rows, width), float("nan"))
    for r0, r1, c0, c1 in cuts:
        shard = torch.empty(r1 - r0, c1 - c0)
        fill_block(shard, r0, c0, 7, "t", width, low, high)
        pieced[r0:r1, c0:c1] = shard
    assert torch.equal(whole, pieced)
    assert float(whole.min()) >= low and float(whole.max()) < high
    grown = torch.empty(rows + BLOCK_ROWS, width)
    fill_block(grown, 0, 0, 7, "t", width, low, high)
    assert torch.equal(grown[:rows], whole)
    for seed, name in ((8, "t"), (7, "u")):
        other = torch.empty(rows, width)
        fill_block(other, 0, 0, seed, name, width, low, high)
        assert not torch.equal(other, whole)


def test_stable_seed_is_not_salted():
    """The seeds are fixed numbers (BLAKE2b), not Python's per-process salted ``hash``: pinned, since a
    change would change every model's starting weights (and the README's measured figures)."""
    from cstwa_dist.distributed.init import stable_seed, step_seed

    assert stable_seed("cstwa-table-init-v1", 0, "ctr__user_id", 0) == 419322619815035862
    assert step_seed(0, 0, 0, 0) == 2340513067027716560
    assert len({step_seed(0, e, r, s) for e in range(2) for r in range(2) for s in range(3)}) == 12
