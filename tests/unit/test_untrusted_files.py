"""Files on a shared volume are data, never code; signed checkpoints refuse tampering before torch reads.

Anyone who can write to a runs volume can plant files where ``train --resume auto`` or a graph load
looks. Shown here, mostly in one process on tiny tensors (one 2-rank check, one real CSTWA run):

* no source file of the project unpickles with pickle's full power (a grep over ``cstwa_dist/`` and
  ``launchers/``);
* a malicious pickle (whose unpickling would create a marker file) planted in every file a resume or a
  graph load reads is refused with an error naming the file, and the marker never appears; the pickled
  RNG file of the issue (``rng-rank0.pt``) is not even opened;
* with a signing key, a tampered file, a planted extra file, a ``meta.json`` copied from another
  checkpoint, a renamed folder, a wrong key and an unsigned checkpoint are each refused before DCP or
  torch opens anything; with the right key a signed checkpoint resumes its weights and RNG streams;
  on 2 ranks both reach rank 0's verdict; a real signed CSTWA run resumes through the CLI.
"""

from __future__ import annotations

import builtins
import json
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from cstwa_dist.distributed.env import DistEnv
from cstwa_dist.train import checkpoint as ckpt
from cstwa_dist.train.checkpoint import (
    KEY_ENV,
    KEY_FILE_ENV,
    META,
    Checkpointer,
    CheckpointRefused,
    TrainState,
)

ROOT = Path(__file__).resolve().parents[2]


# --- the tree ------------------------------------------------------------------------------------

#: unpickling that is allowed, and why: not a file anyone else can write
_ALLOWED = {
    # results of the harness's own child ranks, read from a pipe to the parent (no file)
    ("cstwa_dist/distributed/spawn.py", "pickle.loads("),
    # the allowlist unpickler for DCP's .metadata (refuses every global but DCP's metadata classes)
    ("cstwa_dist/train/checkpoint.py", "Unpickler"),
}
_FORBIDDEN = ("weights_only=False", "allow_pickle=True", "pickle.load(", "pickle.loads(", "Unpickler")
_FORBIDDEN += ("cloudpickle", "dill.load", "joblib.load", "marshal.load", "yaml.load(", "yaml.unsafe_load")


def _calls(text: str, fn: str) -> list[str]:
    """The argument text of every call ``fn(...)`` in ``text`` (parentheses balanced, across lines)."""
    out = []
    for m in re.finditer(re.escape(fn) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1])
    return out


def test_nothing_in_the_tree_unpickles_files():
    sources = [p for d in ("cstwa_dist", "launchers") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    problems = []
    for p in sources:
        rel, text = p.relative_to(ROOT).as_posix(), p.read_text()
        problems += [f"{rel}: {bad}" for bad in _FORBIDDEN if bad in text and (rel, bad) not in _ALLOWED]
        problems += [
            f"{rel}: torch.load({a})" for a in _calls(text, "torch.load") if "weights_only=True" not in a
        ]
        for fn in ("np.load", "numpy.load"):
            problems += [f"{rel}: {fn}({a})" for a in _calls(text, fn) if "allow_pickle=False" not in a]
    assert not problems, (
        "unpickling of files (use JSON, weights_only=True, allow_pickle=False):\n" + "\n".join(problems)
    )


# --- a bomb ---------------------------------------------------------------------------------------


class _Bomb:
    """Unpickling it creates ``marker`` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _bomb_bytes(marker: Path) -> bytes:
    return pickle.dumps(_Bomb(marker))


def _torch_bomb(path: Path, marker: Path) -> None:
    torch.save({"payload": _Bomb(marker)}, path)


def test_the_bomb_is_live(tmp_path):
    """The planted payloads below would run: plain unpickling creates the marker."""
    marker = tmp_path / "marker"
    pickle.loads(_bomb_bytes(marker)).close()
    assert marker.exists()
    marker.unlink()
    _torch_bomb(tmp_path / "b.pt", marker)
    torch.load(tmp_path / "b.pt", weights_only=False)["payload"].close()
    assert marker.exists()


# --- a 1-process checkpoint -----------------------------------------------------------------------


class _Net(torch.nn.Module):
    """A layer with extra state (as the Curse Escaper's window rides along): a non-tensor DCP item."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.window = b"\x01\x02"

    def get_extra_state(self) -> bytes:
        return self.window

    def set_extra_state(self, state: bytes) -> None:
        self.window = state


class _Optim:
    """What the checkpointer asks of the trainer's optimizer (``init_state`` creates Adam's state)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.opt = torch.optim.Adam(net.parameters(), lr=0.01)
        self.net = net

    def init_state(self) -> None:
        if not self.opt.state:
            self.net.lin(torch.ones(1, 4)).sum().backward()
            self.opt.step()
            self.opt.zero_grad()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd)


def _env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _save(root: Path, step: int, seed: int = 0) -> tuple[Path, _Net]:
    torch.manual_seed(seed)
    net = _Net()
    opt = _Optim(net)
    opt.init_state()
    path = Checkpointer(root, _env(), keep=5).save(net, opt, TrainState(global_step=step, step=step))
    return path, net


def _load(path: Path) -> tuple[TrainState, _Net]:
    torch.manual_seed(99)
    net = _Net()
    net.window = b""
    return Checkpointer(path.parent, _env(), keep=5).load(net, _Optim(net), path), net


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def test_unsigned_checkpoint_round_trip_with_json_rng(tmp_path, no_key):
    path, net = _save(tmp_path, 3)
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", META, "rng-rank0.json"]
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt.atomic_write_json(path / "rng-rank0.json", ckpt._rng_state(), sort_keys=False)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    state, back = _load(path)
    assert state.global_step == 3
    assert torch.equal(back.lin.weight, net.lin.weight) and back.window == b"\x01\x02"
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


# --- planted pickles ------------------------------------------------------------------------------


def _planted(tmp_path: Path, name: str) -> tuple[Path, Path]:
    path, _ = _save(tmp_path / "run", 4)
    marker = tmp_path / "marker"
    (path / name).write_bytes(_bomb_bytes(marker))
    return path, marker


@pytest.mark.parametrize("name", [META, "rng-rank0.json", ".metadata", "__0_0.distcp"])
def test_planted_pickle_in_a_checkpoint_file_is_refused(tmp_path, no_key, name):
    path, marker = _planted(tmp_path, name)
    with pytest.raises(Exception) as err:
        if name == META:
            Checkpointer(path.parent, _env(), keep=5).find("auto")
        _load(path)
    assert not marker.exists()
    msg = str(err.value)
    assert name in msg or str(path) in msg, msg
    assert re.search(r"refused|Weights only load failed", msg), msg


def test_metadata_reader_refuses_setting_attributes_of_an_admitted_class(tmp_path):
    """``BUILD`` on a class (here ``pathlib.PosixPath``) would patch it for the whole process."""
    (tmp_path / ".metadata").write_bytes(b"cpathlib\nPosixPath\nN}S'x'\nI1\ns\x86b.")
    with pytest.raises(CheckpointRefused, match="sets attributes of a class"):
        ckpt.read_dcp_metadata(tmp_path / ".metadata")
    assert not hasattr(Path, "x")


def test_planted_non_tensor_item_is_refused(tmp_path, no_key):
    """An attacker's own DCP save whose extra state is a bomb: DCP's default planner would unpickle it."""
    path, net = _save(tmp_path, 4)
    marker = tmp_path / "marker"
    shutil.rmtree(path)
    path.mkdir()
    opt = _Optim(net)
    opt.init_state()
    model = {k: (_Bomb(marker) if k.endswith("_extra_state") else v) for k, v in net.state_dict().items()}
    dcp.save({"model": model, "optim": opt.state_dict()}, checkpoint_id=str(path))
    (path / META).write_text(json.dumps(asdict(TrainState(global_step=4))))
    with pytest.raises(Exception, match="refused") as err:
        _load(path)
    assert "_extra_state" in str(err.value)
    assert not marker.exists()


def test_the_issues_pickled_rng_file_is_never_opened(tmp_path, no_key, caplog):
    path, _ = _save(tmp_path, 4)
    (path / "rng-rank0.json").unlink()
    marker = tmp_path / "marker"
    _torch_bomb(path / "rng-rank0.pt", marker)
    state, _ = _load(path)
    assert state.global_step == 4 and not marker.exists()
    assert "old pickled format are not read" in caplog.text


def test_planted_pickles_in_graph_files_are_refused(tmp_path):
    from cstwa_dist.bench.knn import representation_dims
    from cstwa_dist.config import StructureConfig
    from cstwa_dist.fs import sha256_file
    from cstwa_dist.structure.graph import load_graph, save_graph
    from cstwa_dist.structure.migrator import pretrained_rows
    from cstwa_dist.structure.representations import save_representations
    from cstwa_dist.structure.sharded_graph import load_graph_rows, save_graph_shard, shard_of

    marker = tmp_path / "marker"
    a = torch.eye(4).to_sparse_csr()
    save_graph(tmp_path / "g.pt", a)
    _torch_bomb(tmp_path / "g.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_graph(tmp_path / "g.pt")

    save_graph_shard(tmp_path, "user", shard_of(a, 0, 4), [(0, 4)])
    parts = sorted((tmp_path / "user_graph").glob("part-*.npy"))
    assert len(parts) == 3
    for part in parts:
        saved = part.read_bytes()
        part.write_bytes(_bomb_bytes(marker))
        with pytest.raises(ValueError, match=re.escape(part.name)):
            load_graph_rows(tmp_path, "user", 0, 4)
        part.write_bytes(saved)
    assert load_graph_rows(tmp_path, "user", 0, 4).nnz == 4
    (tmp_path / "user_graph" / "manifest.json").write_bytes(_bomb_bytes(marker))
    with pytest.raises(ValueError, match="manifest.json"):
        load_graph_rows(tmp_path, "user", 0, 4)

    reps = tmp_path / "user_representations.npy"  # the old single-file layout: refused unopened
    reps.write_bytes(_bomb_bytes(marker))
    with pytest.raises(FileNotFoundError, match="old single-file layout"):
        pretrained_rows(StructureConfig(graph_dir=str(tmp_path)), "user", 4, 0, 4, 2)
    with pytest.raises(ValueError, match="pickled"):
        representation_dims(reps)
    save_representations(tmp_path, "user", np.zeros((4, 2), np.float32), [(0, 4)])
    rep_dir = tmp_path / "user_representations"
    part = rep_dir / "part-00000-of-00001.npy"
    part.write_bytes(_bomb_bytes(marker))
    m = json.loads((rep_dir / "manifest.json").read_text())  # listed as if genuine: np.load is reached
    m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_file(part))
    (rep_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="pickled"):
        pretrained_rows(StructureConfig(graph_dir=str(tmp_path)), "user", 4, 0, 4, 2)
    (rep_dir / "manifest.json").write_bytes(_bomb_bytes(marker))
    with pytest.raises(ValueError, match="manifest.json: unreadable manifest"):
        pretrained_rows(StructureConfig(graph_dir=str(tmp_path)), "user", 4, 0, 4, 2)
    from cstwa_dist.config import RunConfig
    from cstwa_dist.train.pretrain import structure_mismatch

    (tmp_path / "structure.json").write_bytes(_bomb_bytes(marker))
    with pytest.raises(ValueError, match="structure.json: not the JSON"):
        structure_mismatch(tmp_path, RunConfig())
    assert not marker.exists()


# --- signed checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def key(monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(KEY_ENV, "a-secret-only-the-job-knows")


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test if DCP or torch is asked to read anything."""

    def fail(*args, **kwargs):
        raise AssertionError("a checkpoint file was read before the signature was checked")

    monkeypatch.setattr(ckpt.dcp, "load", fail)
    monkeypatch.setattr(torch, "load", fail)


def test_signed_checkpoint_resumes_with_the_right_key(tmp_path, key):
    path, net = _save(tmp_path, 2)
    sig = json.loads((path / META).read_text())["signature"]
    assert set(sig["files"]) == {".metadata", "__0_0.distcp", "rng-rank0.json"}
    state, back = _load(path)
    assert state.global_step == 2 and torch.equal(back.lin.weight, net.lin.weight)


def test_key_from_a_mounted_file(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "key").write_text("from-a-secret\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "key"))
    path, _ = _save(tmp_path / "run", 2)
    assert ckpt.signing_key() == b"from-a-secret"
    _load(path)
    monkeypatch.setenv(KEY_ENV, "x")
    with pytest.raises(ValueError, match="set one of them"):
        ckpt.signing_key()


def _tamper(path: Path) -> None:
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[-10] ^= 1
    (path / "__0_0.distcp").write_bytes(bytes(data))


def _plant(path: Path) -> None:
    (path / "rng-rank1.json").write_text("{}")


def _copy_meta(path: Path) -> None:
    other, _ = _save(path.parent, 1, seed=1)
    shutil.copy(other / META, path / META)


def _edit_meta(path: Path) -> None:
    meta = json.loads((path / META).read_text())
    meta["epoch"] = 7
    (path / META).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_tamper, "__0_0.distcp differs from what was signed"),
        (_plant, "rng-rank1.json is not in the signature"),
        (lambda p: (p / ".metadata").unlink(), ".metadata is missing"),
        (_copy_meta, "does not verify"),
        (_edit_meta, "does not verify"),
    ],
    ids=["tampered", "planted", "missing", "copied-meta", "edited-meta"],
)
def test_signature_that_does_not_verify_is_refused_before_any_read(tmp_path, key, no_reads, spoil, reason):
    path, _ = _save(tmp_path, 2)
    spoil(path)
    with pytest.raises(CheckpointRefused, match=re.escape(reason)) as err:
        _load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_renamed_copy_wrong_key_and_unsigned_are_refused(tmp_path, monkeypatch, key, no_reads):
    path, _ = _save(tmp_path, 2)
    moved = shutil.copytree(path, tmp_path / "step-000000009")
    with pytest.raises(CheckpointRefused, match="does not verify"):
        _load(moved)
    monkeypatch.setenv(KEY_ENV, "another-key")
    with pytest.raises(CheckpointRefused, match="does not verify"):
        _load(path)
    meta = json.loads((path / META).read_text())
    del meta["signature"]
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointRefused, match="unsigned checkpoint.*with both variables unset"):
        _load(path)


def test_resume_of_a_folder_not_named_step_says_so(tmp_path, no_key):
    path, _ = _save(tmp_path, 2)
    renamed = path.rename(tmp_path / "best")
    with pytest.raises(ValueError, match="holds meta.json, but a checkpoint folder is named step-"):
        Checkpointer(tmp_path, _env(), keep=5).find(str(renamed))
    (renamed / META).unlink()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        Checkpointer(tmp_path, _env(), keep=5).find(str(renamed))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Checkpointer(tmp_path, _env(), keep=5).find(str(tmp_path / "nowhere"))


# --- a real run -----------------------------------------------------------------------------------


def test_signed_cstwa_run_resumes(tmp_path, tiny_dataset):
    """The real checkpoint of a TorchRec model (sharded tables, fused optimizer state, the Curse
    Escaper's extra state) passes the allowlist reader and planner, and the signature end to end
    (the refusals above take the same path through ``Checkpointer.load``)."""
    from tests.e2e.test_cli import BIN, _config, _run

    cfg = _config(
        tmp_path,
        tiny_dataset,
        models={"cstwa": {"info_layer": [8], "structure_migrator": False}},
        train={"epochs": 1, "checkpoint_every": 4},
    )
    run = tmp_path / "runs"
    env = {KEY_ENV: "job-secret"}
    train = [str(BIN / "cstwa-dist"), "train", "--config", str(cfg), "--model", "cstwa", "--resume", "auto"]
    _run(train, env_extra=env)
    newest = ckpt.list_checkpoints(run / "cstwa" / "checkpoints")[-1]
    assert "signature" in json.loads((newest / META).read_text())
    out = _run([*train, "--set", "train.epochs=2"], env_extra=env)
    log = out.stdout + out.stderr
    assert f"signature of {newest} verified" in log and f"resumed from {newest}" in log, log[-3000:]


def _two_rank_worker(rank: int, world: int, root: str) -> list[tuple[str, str]]:
    """Both ranks save two signed checkpoints, rank 0 tampers with rank 1's data file in the second,
    both ranks load each: the verdicts, per checkpoint."""
    from cstwa_dist.distributed.env import init_distributed

    env = init_distributed()
    torch.manual_seed(0)  # replicated parameters: DCP stores one copy
    net = _Net()
    opt = _Optim(net)
    opt.init_state()
    c = Checkpointer(root, env, keep=5)
    out = []
    for step in (1, 2):
        path = c.save(net, opt, TrainState(global_step=step, world_size=world))
        if step == 2 and rank == 0:
            data = bytearray((path / "__1_0.distcp").read_bytes())
            data[-10] ^= 1
            (path / "__1_0.distcp").write_bytes(bytes(data))
        torch.distributed.barrier()
        back = _Net()
        try:
            c.load(back, _Optim(back), path)
            out.append(("ok", str(torch.equal(back.lin.weight, net.lin.weight))))
        except CheckpointRefused as e:
            out.append(("refused", str(e)))
    return out


def test_two_ranks_reach_the_same_verdict(tmp_path, key):
    from cstwa_dist.distributed.spawn import spawn_ranks

    ranks = spawn_ranks(_two_rank_worker, 2, str(tmp_path), backend="gloo", timeout_s=300)
    assert ranks[0] == ranks[1], ranks
    good, bad = ranks[0]
    assert good == ("ok", "True")
    assert bad[0] == "refused" and "__1_0.distcp differs from what was signed" in bad[1], bad
