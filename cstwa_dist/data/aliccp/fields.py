"""Which Ali-CCP fields are kept, which side each belongs to, and the four raw file names.

The AITM protocol (which the paper follows, ``docs/method.md §6``) keeps the single-valued fields
:data:`DEFAULT_FIELDS`; a multi-valued field (one that appears more than once per sample, e.g. ``109_14``)
is not kept, because the layout holds one id per field and row. Sides: 1xx fields are the user (``101`` =
user id), 2xx the item (``205`` = item id), ``301`` and the crosses ``508 509 702 853`` the context — a
cross mixes a user-side and an item-side field, so it belongs to neither tower's representation
``r_u`` / ``r_i`` and is treated as part of the impression's context. Column names are the raw field
names (``"101"``, ``"205"``...), so a column traces back to the raw data.
"""

from __future__ import annotations

from collections.abc import Iterable

USER_ID_FIELD = "101"
ITEM_ID_FIELD = "205"
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
ITEM_FIELDS = ("205", "206", "207", "210", "216")
CONTEXT_FIELDS = ("301", "508", "509", "702", "853")
DEFAULT_FIELDS: tuple[str, ...] = USER_FIELDS + ITEM_FIELDS + CONTEXT_FIELDS
MULTI_VALUED_FIELDS = ("109_14", "110_14", "127_14", "150_14")
FILES = {
    "skeleton_train": "sample_skeleton_train.csv",
    "common_train": "common_features_train.csv",
    "skeleton_test": "sample_skeleton_test.csv",
    "common_test": "common_features_test.csv",
}
MISSING = -1  # raw ids are non-negative, so -1 marks 'field absent' until the remap turns it into 0


def field_side(name: str) -> str:
    """Side of an Ali-CCP field: 1xx user, 2xx item, everything else (301, crosses 5xx-8xx) context."""
    head = name.split("_", 1)[0]
    if head.startswith("1"):
        return "user"
    if head.startswith("2"):
        return "item"
    return "context"


def resolve_fields(fields: Iterable[str] | None) -> tuple[str, ...]:
    """The fields to keep (``None``: :data:`DEFAULT_FIELDS`), checked against the documented Ali-CCP field
    ids and what the layout can hold."""
    out = tuple(str(f) for f in (DEFAULT_FIELDS if fields is None else fields))
    unknown = [f for f in out if f not in DEFAULT_FIELDS and f not in MULTI_VALUED_FIELDS]
    if unknown:  # an unknown id would import as a column of constant 0: refuse it, with the valid ones
        raise ValueError(
            f"--fields {unknown}: not Ali-CCP field ids (docs/method.md §6); fields that can be kept: "
            f"{' '.join(DEFAULT_FIELDS)} (multi-valued, not importable: {' '.join(MULTI_VALUED_FIELDS)})"
        )
    if len(set(out)) != len(out):
        raise ValueError(f"fields has duplicates: {list(out)}")
    multi = [f for f in out if f in MULTI_VALUED_FIELDS]
    if multi:
        raise ValueError(f"fields {multi} are multi-valued; the layout holds one id per field and row")
    for need in (USER_ID_FIELD, ITEM_ID_FIELD):
        if need not in out:
            raise ValueError(f"fields must include {need!r} (user id 101, item id 205); got {list(out)}")
    if not any(field_side(f) == "context" for f in out):
        raise ValueError(f"fields need at least one context field (301 or a cross); got {list(out)}")
    return out
