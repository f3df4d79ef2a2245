"""The dataset spec a dry run plans with: a data set's ``spec.yaml``, or the one a synth preset would write.

Why: ``cstwa-dist plan`` must answer before any data exists (a 30M-user data set is generated on the
cluster, not on the machine that plans it). A synth preset's spec follows from its sizes alone, so the
planner resolves it without generating anything; nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from cstwa_dist.data.spec import DatasetSpec, FieldSpec, SpecError, dataset_split_rows

__all__ = ["SYNTH_PREFIX", "resolve_spec", "split_rows", "synth_spec"]

#: Rows per split of every spec :func:`synth_spec` made (a synth preset's sizes follow from the
#: preset), so that :func:`split_rows` can answer for a data set that does not exist yet.
_PRESET_ROWS: dict[DatasetSpec, dict[str, int]] = {}

SYNTH_PREFIX = "synth:"
_PRESET_DIR = re.compile(r"^(?P<preset>.+?)(?:-(?P<scale>\d+(?:\.\d+)?))?$")


def synth_spec(preset: str, scale: float = 1.0) -> DatasetSpec:
    """The spec ``cstwa-dist synth --preset PRESET --scale SCALE`` writes, without generating anything.

    Mirrors ``synth.dataset_spec`` from the preset's sizes alone (building the synth world would draw
    30M user clusters); ``tests/unit/test_plan.py`` checks the two agree.
    """
    from cstwa_dist.data import synth

    if preset not in synth.PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; valid: {sorted(synth.PRESETS)}")
    sizes = synth.PRESETS[preset].sizes(scale)
    fields = [FieldSpec(name="user_id", side="user", vocab_size=sizes["num_users"])]
    fields += [FieldSpec(name=n, side="user", vocab_size=v) for n, v in synth.USER_PROFILE_VOCAB.items()]
    fields.append(FieldSpec(name="item_id", side="item", vocab_size=sizes["num_items"]))
    fields += [FieldSpec(name=n, side="item", vocab_size=v) for n, v in synth.ITEM_PROFILE_VOCAB.items()]
    fields += [FieldSpec(name=n, side="context", vocab_size=v) for n, v in synth.CONTEXT_VOCAB.items()]
    spec = DatasetSpec(fields=tuple(fields), user_id="user_id", item_id="item_id")
    _PRESET_ROWS[spec] = {split: sizes[split] for split in ("train", "val", "test")}
    return spec


def split_rows(spec: DatasetSpec, dataset: str | Path) -> dict[str, int] | None:
    """Rows of each split of the data set ``spec`` describes, or ``None`` when nothing says.

    ``<dataset>/stats.json`` when that folder's ``spec.yaml`` is ``spec`` (the data set the job will
    read), else the sizes of the synth preset ``spec`` was made from (:func:`synth_spec`). Why: the
    evaluation reserve (``train/reserves.py``) is sized by a split's rows, which the spec (fields
    and vocabularies) does not hold.
    """
    rows = dataset_split_rows(spec, dataset)
    if rows is not None:
        return rows
    rows = _PRESET_ROWS.get(spec)
    return dict(rows) if rows is not None else None


def _parse_synth(text: str) -> tuple[str, float]:
    preset, _, scale = text.partition(":")
    try:
        return preset, float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"--spec {SYNTH_PREFIX}{text}: scale {scale!r} is not a number") from None


def resolve_spec(spec_arg: str | None, dataset: str) -> tuple[DatasetSpec, str]:
    """The spec to plan with and where it came from; no data is read.

    ``spec_arg``: a ``spec.yaml``, a dataset folder, or ``synth:PRESET[:SCALE]``. Without it:
    ``<dataset>/spec.yaml`` when the data set exists, else the spec of the synth preset the folder is
    named after (``data/industrial-like`` → ``industrial-like``, ``data/aliccp-like-0.01`` →
    ``aliccp-like`` at scale 0.01), which is what ``cstwa-dist synth`` would write there.
    """
    if spec_arg is not None:
        if spec_arg.startswith(SYNTH_PREFIX):
            preset, scale = _parse_synth(spec_arg[len(SYNTH_PREFIX) :])
            return synth_spec(preset, scale), f"synth preset {preset} at scale {scale:g}"
        return DatasetSpec.load(spec_arg), str(spec_arg)
    path = Path(dataset) / "spec.yaml"
    if path.exists():
        return DatasetSpec.load(path), str(path)
    from cstwa_dist.data.synth import PRESETS

    m = _PRESET_DIR.match(Path(dataset).name)
    if m and m["preset"] in PRESETS:
        scale = float(m["scale"]) if m["scale"] else 1.0
        return (
            synth_spec(m["preset"], scale),
            f"synth preset {m['preset']} at scale {scale:g} ({path} does not exist)",
        )
    raise SpecError(
        f"{path} not found and {Path(dataset).name!r} names no synth preset ({sorted(PRESETS)}): "
        "give --spec FILE|DIR or --spec synth:PRESET[:SCALE]"
    )
