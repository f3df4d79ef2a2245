"""Byte-range chunks of whole lines: the unit of work of the importer, in-process or as a Ray task.

Why byte ranges rather than ``ray.data.read_text``: a text dataset's rows do not carry their line numbers,
which both the quarantine and the validation split need. A chunk is planned with one seek and one
``readline`` (never a scan of the file), and numbered afterwards by a cheap newline count per chunk, so
every chunk knows the number of its first line and can be processed alone.

A gzip file (Ali-CCP is distributed compressed; found by its magic bytes) cannot be read at an offset, so
its chunks are cut during one sequential decompression (whole lines of about ``chunk_bytes``, offsets in
the decompressed text), and each pass decompresses it once more, in order, handing every chunk its bytes
(:func:`with_data`, :attr:`Chunk.data`): a task never reopens the file, and memory stays one chunk per
task in flight.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cstwa_dist.data.quarantine import damaged_gzip, is_gzip, open_input

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which some tools put before a file's first line


@dataclass(frozen=True)
class Chunk:
    """Whole lines ``[start, end)`` (bytes) of a file; ``first_line`` is the 1-based number of the first."""

    path: str
    start: int
    end: int
    first_line: int = 0
    data: bytes | None = None  # the chunk's bytes, for a file that cannot be read at an offset (gzip)


def gzip_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Chunks of a gzip file's decompressed text, with their bytes: whole lines of about ``chunk_bytes``
    (a chunk ends at the last newline of what was read, or at the end of the text)."""
    start, rest = 0, b""
    try:
        with open_input(path) as f:
            while True:
                block = f.read(chunk_bytes)
                buf = rest + block
                cut = buf.rfind(b"\n") + 1 if block else len(buf)
                if cut:
                    yield Chunk(str(path), start, start + cut, 0, buf[:cut])
                    start += cut
                rest = buf[cut:]
                if not block:
                    return
    except (EOFError, OSError, zlib.error) as e:
        raise damaged_gzip(path, e) from e


def with_data(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """The chunks, each carrying its bytes if its file is gzip (one sequential decompression, cut at the
    planned offsets); a plain file's chunks pass as they are (a task reads its own byte range)."""
    todo = list(chunks)
    if not todo or not is_gzip(Path(todo[0].path)):
        yield from todo
        return
    path = Path(todo[0].path)
    try:
        with open_input(path) as f:
            for c in todo:
                data = f.read(c.end - c.start)
                if len(data) != c.end - c.start:
                    raise EOFError(f"the text ended at byte {c.start + len(data)}, planned up to {c.end}")
                yield replace(c, data=data)
    except (EOFError, OSError, zlib.error) as e:
        raise damaged_gzip(path, e) from e


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
    """The chunk's bytes: carried (gzip) or read from its byte range."""
    if chunk.data is not None:
        return chunk.data
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        return f.read(chunk.end - chunk.start)


def lines_in(data: bytes) -> int:
    """Physical lines in ``data`` (a last line without newline counts)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def strip_bom(data: bytes, start: int) -> tuple[bytes, int]:
    """``data`` (at byte ``start`` of its file) without a leading byte-order mark at the file's start,
    and its new start: the first line's first key must not carry three invisible bytes."""
    if start == 0 and data.startswith(BOM):
        return data[len(BOM) :], len(BOM)
    return data, start


def split_lines(data: bytes) -> list[str]:
    """The lines of ``data`` as text, without newlines or a trailing ``\\r``; bytes that are not UTF-8
    survive (``surrogateescape``) so a quarantined line's ``raw`` is what the file holds."""
    text = data.decode("utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_lines_at(path: Path, offsets: list[int]) -> list[str]:
    """The lines starting at bytes ``offsets`` (ascending), for the raw text of lines found late (e.g.
    duplicates); one open file, read forward, so a gzip file is decompressed at most once."""
    out = []
    with open_input(path) as f:
        for offset in offsets:
            f.seek(offset)
            out.append(f.readline().rstrip(b"\r\n").decode("utf-8", errors="surrogateescape"))
    return out
