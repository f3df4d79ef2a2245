"""What is known about the official Ali-CCP release, and the checks that compare the raw files with it.

Why: a raw file cut short (an interrupted download or unpack) imports without complaint: its lines are
all good, only fewer, and the one line cut in the middle is quarantined like any stray bad line, far below
``--max-quarantine-fraction``. So the importer warns loudly where a file ends mid-line
(:func:`warn_unterminated`), and compares the files with what is known of the release
(:func:`check_release`), saying which figures it checked against.

Known figures:

* :data:`OFFICIAL_FILES`, the exact size and line count of each official file, is **empty**: the
  repository does not record them, and they are not to be guessed. Where they are known, an entry turns
  on an exact check of that file.
* :data:`PAPER_LINES`, the approximate line count of each skeleton file derived from the impression
  counts the repository does state (``docs/method.md §6``, the paper's Table 1: 38M train + 4.2M
  validation impressions cut from the train file, 43M test). A skeleton file with more than a tenth of
  that many lines is taken to be the release's (a hand-made sample or a test fixture is far smaller); if
  it then holds fewer than :data:`PAPER_TOLERANCE` of them, it looks cut and the import warns.

Both checks only warn: a user may cut a file on purpose (e.g. a quick run on its first lines).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cstwa_dist.data.quarantine import TRUNCATED_LINE, Quarantine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfficialFile:
    """The exact size of an official raw file (uncompressed bytes and lines)."""

    bytes: int
    lines: int


OFFICIAL_FILES: dict[str, OfficialFile] = {}  # file name -> exact figures; none recorded (see above)
PAPER_LINES = {"sample_skeleton_train.csv": 38_000_000 + 4_200_000, "sample_skeleton_test.csv": 43_000_000}
PAPER_TOLERANCE = 0.95  # the paper's figures are rounded to 2-3 digits


def official_name(path: Path) -> str:
    """The release's name of a raw file (``.gz`` dropped: a compressed copy holds the same lines)."""
    return path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name


def check_release(path: Path, n_lines: int) -> None:
    """Warns if ``path`` looks like an official file but is shorter (or, with exact figures, differs)."""
    name = official_name(path)
    exact = OFFICIAL_FILES.get(name)
    if exact is not None:
        if n_lines != exact.lines:
            logger.warning(
                "%s has %d lines; the official %s has %d: the file is cut or altered (an interrupted "
                "download or unpack?); unpack it again unless you cut it on purpose",
                path,
                n_lines,
                name,
                exact.lines,
            )
        else:
            logger.info("%s: %d lines, as in the official release", path, n_lines)
        return
    approx = PAPER_LINES.get(name)
    if approx is None or n_lines <= approx // 10:
        return  # not the release's size class: a sample or a fixture, nothing to compare with
    if n_lines < PAPER_TOLERANCE * approx:
        logger.warning(
            "%s has %d lines; this looks like the official Ali-CCP file, which has about %d (the paper's "
            "impression counts, docs/method.md §6; exact figures are not recorded): the file looks cut (an "
            "interrupted download or unpack?); unpack it again unless you cut it on purpose",
            path,
            n_lines,
            approx,
        )
    else:
        logger.info(
            "%s: %d lines, consistent with the official release's about %d (docs/method.md §6)",
            path,
            n_lines,
            approx,
        )


def warn_unterminated(path: Path, n_lines: int, ends_with_newline: bool, quarantine: Quarantine) -> None:
    """Warns loudly if ``path`` ends without a newline: cut mid-line if its last line was quarantined
    (:data:`TRUNCATED_LINE`), else possibly cut just after a complete line."""
    if ends_with_newline or n_lines == 0:
        return
    if quarantine.by_file.get(str(path), {}).get(TRUNCATED_LINE):
        logger.warning(
            "%s ends mid-line: its last line (%d) has no newline and fails the line checks, so the file "
            "is TRUNCATED (an interrupted download or unpack?); that line is quarantined as %s and the "
            "lines before it are imported: unpack the file again for the full data",
            path,
            n_lines,
            TRUNCATED_LINE,
        )
    else:
        logger.warning(
            "%s does not end with a newline; its last line (%d) is complete and imported, but a complete "
            "export ends with one: the file may be cut short; compare it with the source",
            path,
            n_lines,
        )
