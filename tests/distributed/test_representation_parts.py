"""The pre-trained representations as one part per rank plus a manifest (issue 19).

Why: ``sm_init=pretrained`` starts ``U``/``I`` from these rows, and the old layout (every rank writing
its rows of one shared ``.npy`` through a memory map) could lose rows on network volumes. Two real
gloo ranks write parts of a known array with uneven shares; one process then reads ranges that
straddle the part boundaries, the whole array and the blocks of a 3-rank world, and every planted
defect (missing, short, reshaped, pickled or altered part; missing manifest; the old single file)
must be refused with an error naming the file, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cstwa_dist.config import ConfigError, StructureConfig
from cstwa_dist.distributed.spawn import spawn_ranks
from cstwa_dist.fs import sha256_file
from cstwa_dist.structure.ivf import even_ranges
from cstwa_dist.structure.representations import (
    read_representation_manifest,
    representation_rows,
    representation_shape,
    representations_dir,
    save_representations,
)

N, W = 23, 4


def pretrained_rows(*args: object) -> torch.Tensor:
    """``migrator.pretrained_rows``, imported here only: the spawned ranks import this module and need
    only the representations module, not the migrator's TorchRec."""
    from cstwa_dist.structure.migrator import pretrained_rows as rows

    return rows(*args)


#: side -> the 2 ranks' shares: uneven, and an empty first share
SHARES = {"user": [(0, 5), (5, N)], "item": [(0, 0), (0, N)]}


def known(n: int = N, w: int = W) -> np.ndarray:
    """Distinct, non-integer values, so a row read from the wrong place cannot compare equal."""
    return (np.arange(n * w, dtype=np.float32).reshape(n, w) + 0.25) / 7.0


def _write_worker(rank: int, world: int, out: str) -> str:
    from cstwa_dist.distributed.env import init_distributed

    init_distributed()
    full = known()
    for side, ranges in SHARES.items():
        lo, hi = ranges[rank]
        save_representations(out, side, full[lo:hi], ranges)
    # ranks that disagree on the width raise together, before anything is written
    lo, hi = SHARES["user"][rank]
    block = full[lo:hi] if rank == 0 else full[lo:hi, :3]
    try:
        save_representations(out, "bad_width", block, SHARES["user"])
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reps")
    errors = spawn_ranks(_write_worker, 2, str(out))
    assert all("different widths [4, 3]" in e for e in errors), errors
    assert not (out / "bad_width_representations" / "manifest.json").exists()
    return out


def test_two_ranks_write_one_part_each_and_a_manifest(written):
    full = known()
    for side, ranges in SHARES.items():
        folder, m = read_representation_manifest(written, side)
        assert folder == written / f"{side}_representations"
        assert (m["world_size"], m["n_total"], m["width"], m["dtype"]) == (2, N, W, "float32")
        assert [(p["lo"], p["hi"]) for p in m["parts"]] == ranges
        for p in m["parts"]:
            part = folder / p["file"]
            assert p["bytes"] == part.stat().st_size and p["sha256"] == sha256_file(part)
            assert np.array_equal(np.load(part, allow_pickle=False), full[p["lo"] : p["hi"]])
        assert sorted(f.name for f in folder.iterdir()) == [
            "manifest.json",
            "part-00000-of-00002.npy",
            "part-00001-of-00002.npy",
        ]
        assert representation_shape(written, side) == (N, W)


@pytest.mark.parametrize("side", sorted(SHARES))
def test_any_range_and_any_world_size_reads_the_written_rows(written, side):
    full = known()
    for lo, hi in [(0, N), (3, 8), (4, 6), (5, 5), (0, 1), (22, N), (N, N), (1, 22)]:
        got = representation_rows(written, side, lo, hi)
        assert got.dtype == np.float32 and np.array_equal(got, full[lo:hi]), (lo, hi)
    three = [representation_rows(written, side, lo, hi) for lo, hi in even_ranges(N, 3)]
    assert [b.shape[0] for b in three] == [7, 8, 8] and np.array_equal(np.concatenate(three), full)
    cfg = StructureConfig(graph_dir=str(written), sm_init="pretrained")
    assert torch.equal(pretrained_rows(cfg, side, N, 4, 9, W), torch.from_numpy(full[4:9]))
    with pytest.raises(ValueError, match=r"rows \[20, 24\) outside \[0, 23\)"):
        representation_rows(written, side, 20, 24)


def test_one_rank_rewrite_replaces_the_parts(written, tmp_path):
    """Re-mining at another world size (no process group: world size 1) leaves only its own part."""
    shutil.copytree(written / "user_representations", tmp_path / "user_representations")
    new = known() * 2
    save_representations(tmp_path, "user", new, [(0, N)])
    names = sorted(f.name for f in (tmp_path / "user_representations").iterdir())
    assert names == ["manifest.json", "part-00000-of-00001.npy"]
    assert np.array_equal(representation_rows(tmp_path, "user", 2, 19), new[2:19])


def _bad_copy(written: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
    folder = tmp_path / "user_representations"
    shutil.copytree(written / "user_representations", folder)
    return folder, folder / "part-00000-of-00002.npy", json.loads((folder / "manifest.json").read_text())


def _relist(folder: Path, m: dict, part: Path) -> None:
    """Make the manifest agree with a planted part's size and digest, so the content checks run."""
    entry = next(p for p in m["parts"] if p["file"] == part.name)
    entry["bytes"], entry["sha256"] = part.stat().st_size, sha256_file(part)
    (folder / "manifest.json").write_text(json.dumps(m))


class _Bomb:
    """Unpickling it would create a folder: the proof that a part was loaded with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_planted_bad_parts_are_refused_by_name(written, tmp_path):
    folder, part, m = _bad_copy(written, tmp_path)
    full = known()
    # rows only of part 1 do not open part 0: a reader touches just the parts its range overlaps
    part.unlink()
    assert np.array_equal(representation_rows(tmp_path, "user", 5, N), full[5:])
    with pytest.raises(FileNotFoundError, match=r"part-00000-of-00002\.npy: listed in .* but missing"):
        representation_rows(tmp_path, "user", 3, 8)

    np.save(part, full[:5], allow_pickle=False)
    part.write_bytes(part.read_bytes()[:-9])  # short
    with pytest.raises(ValueError, match=r"part-00000-of-00002\.npy: \d+ bytes but the manifest lists"):
        representation_rows(tmp_path, "user", 0, 5)

    np.save(part, full[:5] + 1, allow_pickle=False)  # same size, other rows
    with pytest.raises(ValueError, match=r"part-00000-of-00002\.npy: content does not match .* sha256"):
        representation_rows(tmp_path, "user", 0, 5)

    np.save(part, full[:4], allow_pickle=False)  # wrong shape, listed as if it were right
    _relist(folder, m, part)
    with pytest.raises(
        ValueError, match=r"expected rows \[0, 5\) as a \[5, 4\] float32 array, found shape \(4, 4\)"
    ):
        representation_rows(tmp_path, "user", 0, 5)

    np.save(part, full[:5].astype(np.float64), allow_pickle=False)
    _relist(folder, m, part)
    with pytest.raises(ValueError, match="found shape \\(5, 4\\) float64"):
        representation_rows(tmp_path, "user", 0, 5)

    marker = tmp_path / "marker"
    np.save(part, np.array([[_Bomb(marker)] * W] * 5, dtype=object), allow_pickle=True)
    _relist(folder, m, part)
    with pytest.raises(ValueError, match=r"part-00000-of-00002\.npy: unreadable part file"):
        representation_rows(tmp_path, "user", 0, 5)
    with pytest.raises(ValueError, match="unreadable part file"):
        pretrained_rows(StructureConfig(graph_dir=str(tmp_path)), "user", N, 0, 5, W)
    assert not marker.exists()

    (folder / "manifest.json").write_bytes(b"\x80\x04K\x01.")  # a pickle, not JSON
    with pytest.raises(ValueError, match="manifest.json: unreadable manifest"):
        representation_rows(tmp_path, "user", 0, 5)


def test_missing_manifest_and_the_old_single_file_layout(written, tmp_path):
    cfg = StructureConfig(graph_dir=str(tmp_path), sm_init="pretrained")
    with pytest.raises(FileNotFoundError, match="save_representations=true.*or use structure.sm_init=fields"):
        pretrained_rows(cfg, "user", N, 0, 5, W)
    legacy = tmp_path / "user_representations.npy"
    np.save(legacy, known(), allow_pickle=False)
    for call in (
        lambda: pretrained_rows(cfg, "user", N, 0, 5, W),
        lambda: representation_rows(tmp_path, "user", 0, 5),
    ):
        with pytest.raises(FileNotFoundError, match="old single-file layout") as e:
            call()
        assert str(legacy) in str(e.value) and "re-mine" in str(e.value)

    folder, _, _ = _bad_copy(written, tmp_path)  # a part folder whose manifest never came
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="old single-file layout"):
        representation_rows(tmp_path, "user", 0, 5)
    legacy.unlink()
    with pytest.raises(FileNotFoundError, match=r"user_representations/manifest\.json not found"):
        representation_rows(tmp_path, "user", 0, 5)


def test_width_and_n_must_be_what_the_model_needs(written):
    cfg = StructureConfig(graph_dir=str(written), sm_init="pretrained")
    manifest = str(representations_dir(written, "user") / "manifest.json")
    with pytest.raises(ConfigError, match="width 4 but the user structure table's rows have width 6") as e:
        pretrained_rows(cfg, "user", N, 0, 5, 6)
    assert manifest in str(e.value)
    with pytest.raises(ValueError, match="lists 23 rows but the dataset has 24 users") as e:
        pretrained_rows(cfg, "user", 24, 0, 5, W)
    assert manifest in str(e.value)
