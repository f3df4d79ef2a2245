"""Byte-range chunks of whole lines: the unit of work of the importer, in-process or as a Ray task.

Why byte ranges rather than ``ray.data.read_text``: a text dataset's rows do not carry their line numbers,
which both the quarantine and the validation split need. A chunk is planned with one seek and one
``readline`` (never a scan of the file), and numbered afterwards by a cheap newline count per chunk, so
every chunk knows the number of its first line and can be processed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chunk:
    """Whole lines ``[start, end)`` (bytes) of a file; ``first_line`` is the 1-based number of the first."""

    path: str
    start: int
    end: int
    first_line: int = 0


def plan_chunks(path: Path, chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of about ``chunk_bytes``, each cut just after a newline (one seek + readline each)."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target)
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            if pos > bounds[-1]:
                bounds.append(pos)
            target = max(pos, target) + chunk_bytes
    bounds.append(size)
    return [Chunk(str(path), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def read_chunk(chunk: Chunk) -> bytes:
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        return f.read(chunk.end - chunk.start)


def lines_in(data: bytes) -> int:
    """Physical lines in ``data`` (a last line without newline counts)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def split_lines(data: bytes) -> list[str]:
    """The lines of ``data`` as text, without newlines or a trailing ``\\r``; bytes that are not UTF-8
    survive (``surrogateescape``) so a quarantined line's ``raw`` is what the file holds."""
    text = data.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_line_at(path: Path, offset: int) -> str:
    """The line starting at byte ``offset`` (for the raw text of a line found late, e.g. a duplicate)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline().rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
