"""Small raw files in the Ali-CCP format, with known defects, for the importer's tests and benchmark.

Why: the real files need a manual download (Tianchi data set 408, ~20 GB), yet the importer's parsing,
join, filtering and validation must be tested and its speed and memory measured. The fixture follows the
format of method.md §6 (see :mod:`cstwa_dist.data.aliccp`): user features sit in the common-features file
(keyed by an md5 hex key), item/context/cross features on the sample; multi-valued fields (``109_14``...)
and a field that is sometimes missing (``216`` on samples, ``129`` in the common features) are present, so
the importer's field selection and 'missing -> 0' are exercised. Ids are drawn Zipf-like, so frequency
filtering removes a visible share of them.

With ``bad_lines=True`` each file gets lines of every defect the importer recognises, at random positions,
each made by one mutation of a good line so that it has exactly one reason. The returned
:class:`RawFixture` says which line of which file should be quarantined and why.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cstwa_dist.data.aliccp import FILES, MULTI_VALUED_FIELDS

logger = logging.getLogger(__name__)

SAMPLE_REASONS = (
    "wrong_column_count",
    "bad_label",
    "purchase_without_click",
    "bad_feature_list",
    "non_integer_id",
    "repeated_field",
    "unknown_common_key",
    "common_features_quarantined",
)
COMMON_REASONS = (
    "wrong_column_count",
    "bad_key",
    "bad_feature_list",
    "non_integer_id",
    "repeated_field",
    "duplicate_common_key",
)
_BASE = 1_000_000  # feature ids of field number f live in [f * _BASE, (f + 1) * _BASE): one global id space


def feature_id(field_name: str, local: int) -> int:
    """Global feature id of a field's ``local`` value, like Ali-CCP's single id space across fields."""
    return int(field_name.split("_")[0]) * _BASE * (2 if "_" in field_name else 1) + int(local)


def feature_list(entries: list[tuple[str, int | str]]) -> str:
    """``field\\x02id\\x03value`` entries joined by ``\\x01`` (value 1.0, as for Ali-CCP categoricals)."""
    return "\x01".join(f"{f}\x02{i}\x031.0" for f, i in entries)


def sample_line(
    sample_id: int, click: int, purchase: int, key: str, entries: list[tuple[str, int | str]]
) -> str:
    """One ``sample_skeleton`` line (no newline)."""
    return f"{sample_id},{click},{purchase},{key},{len(entries)},{feature_list(entries)}"


def common_line(key: str, entries: list[tuple[str, int | str]]) -> str:
    """One ``common_features`` line (no newline)."""
    return f"{key},{len(entries)},{feature_list(entries)}"


@dataclass
class RawFixture:
    """What a generated fixture contains: lines per file, and the bad lines the importer must find."""

    directory: Path
    lines: dict[str, int] = field(default_factory=dict)  # file name -> physical lines
    bad: dict[str, dict[int, str]] = field(default_factory=dict)  # file name -> {1-based line: reason}

    @property
    def quarantine(self) -> dict[str, dict[str, int]]:
        """Expected quarantine counts: file name -> {reason: count}."""
        return {name: dict(Counter(b.values())) for name, b in self.bad.items()}


class _World:
    """Users, items and their fixed features (functions of the id, so a user looks alike on every key)."""

    def __init__(self, rng: np.random.Generator, n_lines: int) -> None:
        self.rng = rng
        self.n_users = max(20, n_lines // 20)
        self.n_items = max(30, n_lines // 8)

    def zipf(self, n: int, size: int) -> np.ndarray:
        """Log-uniform ranks in [0, n) (P(r) ~ 1 / (r + 1)): a heavy head and a long tail of rare ids."""
        return np.minimum((n ** self.rng.random(size)).astype(np.int64) - 1, n - 1)

    def user_entries(self, user: int, key_rng: np.random.Generator) -> list[tuple[str, int | str]]:
        out: list[tuple[str, int | str]] = [("101", feature_id("101", user))]
        for name, card in (
            ("121", 97),
            ("122", 13),
            ("124", 2),
            ("125", 7),
            ("126", 3),
            ("127", 3),
            ("128", 2),
        ):
            out.append((name, feature_id(name, (user * 31 + card) % card)))
        if user % 5:  # 129 is missing for every 5th user
            out.append(("129", feature_id("129", user % 4)))
        for name in MULTI_VALUED_FIELDS:  # multi-valued: several entries of one field
            for v in key_rng.integers(0, 500, size=int(key_rng.integers(1, 4))):
                out.append((name, feature_id(name, int(v))))
        return out

    def sample_entries(self, item: int, user: int) -> list[tuple[str, int | str]]:
        out: list[tuple[str, int | str]] = [
            ("205", feature_id("205", item)),
            ("206", feature_id("206", item % 40)),
            ("207", feature_id("207", item % 300)),
            ("210", feature_id("210", item % 17)),
        ]
        if item % 10:  # 216 is missing on every 10th item
            out.append(("216", feature_id("216", item % 600)))
        out += [
            ("301", feature_id("301", (item + user) % 3)),
            ("508", feature_id("508", (item % 40) * 7 + user % 7)),
            ("509", feature_id("509", (item % 300) * 3 + user % 3)),
            ("702", feature_id("702", (item % 17) * 11 + user % 11)),
            ("853", feature_id("853", (item % 600) * 2 + user % 2)),
        ]
        return out


def _key(seed: int, split: str, i: int) -> str:
    return hashlib.md5(f"{seed}/{split}/{i}".encode()).hexdigest()


def _bad_positions(rng: np.random.Generator, n: int, reasons: tuple[str, ...], lo: int = 0) -> dict[int, str]:
    """0-based line positions in [lo, n) -> reason, ``max(1, n // 2000)`` of each reason when room allows."""
    each = max(1, n // 2000)
    room = n - lo
    if room < 2 * each * len(reasons):  # keep at least half the lines good
        each = room // (2 * len(reasons))
    if each == 0:
        return {}
    pos = rng.choice(np.arange(lo, n), size=each * len(reasons), replace=False)
    return {int(p): reasons[k // each] for k, p in enumerate(pos)}


def _write_pair(
    directory: Path, world: _World, split: str, n_lines: int, seed: int, bad_lines: bool, fixture: RawFixture
) -> None:
    rng = world.rng
    common_name = FILES[f"common_{split}"]
    skel_name = FILES[f"skeleton_{split}"]
    n_keys = max(4, n_lines // 6)
    common_bad = _bad_positions(rng, n_keys, COMMON_REASONS, lo=n_keys // 2) if bad_lines else {}
    users = world.zipf(world.n_users, n_keys)
    good_keys: list[str] = []
    key_users: list[int] = []
    bad_keys: list[str] = []  # keys of quarantined common lines (samples pointing at them are quarantined)
    bad_common: dict[int, str] = {}
    with open(directory / common_name, "w", encoding="utf-8", newline="\n") as f:
        for i in range(n_keys):
            key = _key(seed, split, i)
            entries = world.user_entries(int(users[i]), rng)
            reason = common_bad.get(i)
            if reason is None:
                line = common_line(key, entries)
                good_keys.append(key)
                key_users.append(int(users[i]))
            elif reason == "duplicate_common_key":
                line = common_line(good_keys[int(rng.integers(len(good_keys)))], entries)
            elif reason == "bad_key":
                line = common_line("", entries)
            else:
                bad_keys.append(key)
                if reason == "wrong_column_count":
                    line = f"{key},{len(entries)}"
                elif reason == "bad_feature_list":
                    line = f"{key},{len(entries) + 1},{feature_list(entries)}"
                elif reason == "non_integer_id":
                    line = common_line(key, [entries[0], ("121", "x17"), *entries[2:]])
                else:  # repeated_field: a single-valued kept field twice
                    line = common_line(key, [*entries, ("121", feature_id("121", 5))])
            if reason is not None:
                bad_common[i + 1] = reason
            f.write(line + "\n")
    fixture.lines[common_name] = n_keys
    fixture.bad[common_name] = bad_common

    skel_bad = _bad_positions(rng, n_lines, SAMPLE_REASONS) if bad_lines else {}
    if not bad_keys:
        skel_bad = {p: r for p, r in skel_bad.items() if r != "common_features_quarantined"}
    key_idx = world.zipf(len(good_keys), n_lines)
    items = world.zipf(world.n_items, n_lines)
    clicks = rng.random(n_lines) < 0.2
    purchases = clicks & (rng.random(n_lines) < 0.15)
    bad_skel: dict[int, str] = {}
    with open(directory / skel_name, "w", encoding="utf-8", newline="\n") as f:
        for i in range(n_lines):
            k = int(key_idx[i])
            key, user = good_keys[k], key_users[k]
            entries = world.sample_entries(int(items[i]), user)
            c, p = int(clicks[i]), int(purchases[i])
            reason = skel_bad.get(i)
            if reason is None:
                line = sample_line(i + 1, c, p, key, entries)
            elif reason == "wrong_column_count":
                line = "" if i % 2 else f"{i + 1},{c},{p},{key},{len(entries)}"
            elif reason == "bad_label":
                line = sample_line(i + 1, 2, 0, key, entries)
            elif reason == "purchase_without_click":
                line = sample_line(i + 1, 0, 1, key, entries)
            elif reason == "bad_feature_list":
                flist = feature_list(entries)
                line = f"{i + 1},{c},{p},{key},{len(entries)},{flist.replace(chr(3), '', 1)}"
            elif reason == "non_integer_id":
                line = sample_line(i + 1, c, p, key, [("205", "item7"), *entries[1:]])
            elif reason == "repeated_field":
                # alternately: 205 twice on the line, or 101 on the sample and in the common features
                extra = ("205", feature_id("205", 1)) if i % 2 else ("101", feature_id("101", user))
                line = sample_line(i + 1, c, p, key, [*entries, extra])
            elif reason == "unknown_common_key":
                line = sample_line(i + 1, c, p, _key(seed, "nowhere", i), entries)
            else:  # common_features_quarantined
                line = sample_line(i + 1, c, p, bad_keys[i % len(bad_keys)], entries)
            if reason is not None:
                bad_skel[i + 1] = reason
            f.write(line + "\n")
    fixture.lines[skel_name] = n_lines
    fixture.bad[skel_name] = bad_skel


def write_raw_aliccp_fixture(
    directory: Path, *, n_train_lines: int, n_test_lines: int, seed: int, bad_lines: bool = True
) -> RawFixture:
    """Writes the four raw Ali-CCP files into ``directory``; returns their expected quarantine.

    ``RawFixture.quarantine`` gives the expected counts per file and reason; ``RawFixture.bad`` the exact
    line numbers. About one common-features line per 6 samples (real Ali-CCP: ~1 per 60).
    """
    if n_train_lines < 1 or n_test_lines < 1:
        raise ValueError("the fixture needs at least one train and one test line")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = _World(rng, n_train_lines + n_test_lines)
    fixture = RawFixture(directory=directory)
    _write_pair(directory, world, "train", n_train_lines, seed, bad_lines, fixture)
    _write_pair(directory, world, "test", n_test_lines, seed, bad_lines, fixture)
    logger.debug("raw Ali-CCP fixture in %s: %s", directory, fixture.lines)
    return fixture
