"""Loading an exported model folder (``cstwa-dist export``'s output) for scoring.

Trust boundary: a model folder is data a serving process reads, possibly copied from a shared
volume. ``torch.export.load`` unpickles three kinds of archive members (weights or constants saved
``use_pickle``, custom/opaque objects, and sample inputs when they fail a ``weights_only`` load), so
:func:`load_model` never hands it an archive it has not checked: every file's sha256 must match
``manifest.json`` (a changed or swapped file fails), and ``program.pt2`` is opened as a zip first and
refused, before ``torch.export.load`` reads it, when a weights/constants config asks for a pickled
payload, when it holds a member outside the layout ``torch.export.save`` writes for a plain program
(no AOTInductor, no custom objects), or when its sample inputs do not load with ``weights_only=True``.
The hashes catch accidents and tampering of single files; whoever can rewrite the manifest as well
can swap weights (a forged model), but cannot make the loader unpickle anything.

Memory: the program's weights (the export's tables and towers) once, plus one file's read buffer
while hashing.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cstwa_dist.fs import sha256_file

if TYPE_CHECKING:
    import torch

    from cstwa_dist.data.spec import DatasetSpec
    from cstwa_dist.data.vocab import Vocabulary

FORMAT = 1
MANIFEST = "manifest.json"
PROGRAM = "program.pt2"
SPEC_FILE = "spec.yaml"
VOCAB_DIR = "vocab"

# what torch.export.save writes for one plain program (paths under the archive's root folder)
_MEMBERS = (
    r"\.data/version",
    r"\.data/serialization_id",
    r"archive_format",
    r"archive_version",
    r"byteorder",
    r"models/[A-Za-z0-9_]+\.json",
    r"data/weights/[A-Za-z0-9_]+_weights_config\.json",
    r"data/weights/weight_[0-9]+",
    r"data/constants/[A-Za-z0-9_]+_constants_config\.json",
    r"data/constants/tensor_[0-9]+",
    r"data/sample_inputs/[A-Za-z0-9_]+\.pt",
    r"extra/[A-Za-z0-9_.]+",
)
_MEMBER_RE = re.compile("|".join(f"(?:{m})" for m in _MEMBERS))


class ExportError(ValueError):
    """A model folder that is not exported, not whole, or not safe to load; the message names the
    file and what to do."""


@dataclass
class ExportedModel:
    """A loaded model folder: ``predict`` scores rows of ids in the spec's field order."""

    path: Path
    manifest: dict[str, Any]
    spec: DatasetSpec
    vocab: Vocabulary
    module: torch.nn.Module  # program.module()

    @property
    def outputs(self) -> list[str]:
        return list(self.manifest["outputs"])

    def predict(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` int64 rows (``-1``: unseen, reads zeros) → ``[B, len(outputs)]`` float32."""
        import torch

        if ids.dim() != 2 or ids.shape[1] != len(self.spec.names):
            raise ExportError(
                f"{self.path}: ids must be [B, {len(self.spec.names)}] (fields {self.spec.names}), "
                f"got {list(ids.shape)}"
            )
        if ids.shape[0] == 0:
            return torch.zeros(0, len(self.outputs), dtype=torch.float32)
        with torch.no_grad():
            return self.module(ids.to(torch.int64))


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` of a model folder (JSON only), checked for the keys a loader needs."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path}: not found; pass a folder written by `cstwa-dist export`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path}: not JSON ({e}); the folder is damaged, export it again") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    for key in ("model", "fields", "outputs", "files"):
        if key not in manifest:
            raise ExportError(f"{path}: no {key!r}; not written by `cstwa-dist export`")
    return manifest


def verify_files(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its sha256; no file is missing from the list."""
    files = manifest["files"]
    if not isinstance(files, dict) or PROGRAM not in files:
        raise ExportError(f"{model_dir / MANIFEST}: 'files' lists no {PROGRAM}")
    root = model_dir.resolve()
    for rel, digest in sorted(files.items()):
        path = (model_dir / rel).resolve()
        if root not in path.parents:
            raise ExportError(f"{model_dir / MANIFEST}: file {rel!r} lies outside the model folder")
        if not path.is_file():
            raise ExportError(f"{path}: listed in the manifest but missing; export the model again")
        if sha256_file(path) != digest:
            raise ExportError(
                f"{path}: sha256 differs from the manifest's; the file was changed or damaged after export "
                "— refused (export the model again)"
            )
    listed = set(files) | {MANIFEST}
    extra = sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.relative_to(model_dir).as_posix() not in listed
    )
    if extra:
        raise ExportError(f"{model_dir}: files not in the manifest: {extra[:5]}; refused")


def check_program_archive(path: Path) -> None:
    """Refuses a ``program.pt2`` whose loading would unpickle anything (see the module docstring)."""
    import torch

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ExportError(f"{path}: not a torch.export archive ({e})") from None
    with zf:
        names = zf.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise ExportError(f"{path}: not one archive folder ({sorted(roots)[:3]}); refused")
        root = roots.pop()
        rel = [n.split("/", 1)[1] for n in names]
        odd = [n for n in rel if n and not _MEMBER_RE.fullmatch(n)]
        if odd:
            raise ExportError(
                f"{path}: holds members a plain exported program does not ({odd[:3]}); refused unread"
            )
        for n in rel:
            if n.endswith("_weights_config.json") or n.endswith("_constants_config.json"):
                try:
                    config = json.loads(zf.read(f"{root}/{n}"))
                except ValueError as e:
                    raise ExportError(f"{path}: {n} is not JSON ({e}); refused") from None
                for fqn, meta in (config.get("config") or {}).items():
                    if (
                        not isinstance(meta, dict)
                        or meta.get("use_pickle")
                        or meta.get("tensor_meta") is None
                    ):
                        raise ExportError(
                            f"{path}: {n} asks for a pickled payload for {fqn!r}; refused unread "
                            "(export writes plain tensors only)"
                        )
                    pname = str(meta.get("path_name", ""))
                    if not re.fullmatch(r"(weight|tensor)_[0-9]+", pname):
                        raise ExportError(f"{path}: {n} names payload {pname!r} for {fqn!r}; refused")
            elif n.startswith("data/sample_inputs/"):
                data = zf.read(f"{root}/{n}")
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception as e:  # noqa: BLE001 - any failure means torch would unpickle it
                        raise ExportError(
                            f"{path}: {n} does not load as plain tensors ({type(e).__name__}); refused unread"
                        ) from None


def load_model(model_dir: str | Path) -> ExportedModel:
    """Loads a model folder: hashes, archive check, then ``torch.export.load`` (see module docstring)."""
    import torch

    from cstwa_dist.data.spec import DatasetSpec

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    program = model_dir / PROGRAM
    check_program_archive(program)
    spec = DatasetSpec.load(model_dir / SPEC_FILE)
    if spec.names != list(manifest["fields"]):
        raise ExportError(f"{model_dir}: spec.yaml's fields {spec.names} differ from the manifest's")
    vocab = _load_vocab(model_dir / VOCAB_DIR, spec)
    ep = torch.export.load(program)
    return ExportedModel(path=model_dir, manifest=manifest, spec=spec, vocab=vocab, module=ep.module())


def _load_vocab(folder: Path, spec: DatasetSpec) -> Vocabulary:
    from cstwa_dist.data.vocab import Vocabulary

    return Vocabulary.load(folder, spec)
