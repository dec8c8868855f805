"""Row boundaries of CSV and JSONL manifests, so that a part reads only its own bytes.

Planning reads a text manifest once, a part's bytes at a time (`parts`),
and records the byte offset of every part's first row; a part then reads [its offset, the next part's offset) and
parses only that (with the CSV header in front), instead of reading the file
from the start. A CSV record may span lines (a quoted field holding a
newline), so a line ends a record only where the quotes before it balance
(RFC 4180 escapes a quote as "", which keeps the count even); a JSON line
never holds a raw newline. Blank lines are not rows, as for pyarrow's readers.
No Beam here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Iterator


@dataclass(frozen=True)
class TextPart:
    """`rows` consecutive records of a text manifest: bytes [start, stop) of the file."""

    start: int
    stop: int
    rows: int
    data: bytes


def _blank(record: bytes, quoted: bool) -> bool:
    return record in (b"\n", b"\r\n", b"\r") if quoted else not record.strip()


def records(handle: IO[bytes], quoted: bool) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of every non-blank record from the handle's position, one at a time."""
    offset = handle.tell()
    pending: list[bytes] = []
    start, parity = offset, 0
    for line in handle:
        if not pending:
            start = offset
        offset += len(line)
        pending.append(line)
        if quoted:
            parity ^= line.count(b'"') & 1
        if parity:
            continue
        record = pending[0] if len(pending) == 1 else b"".join(pending)
        pending = []
        if not _blank(record, quoted):
            yield start, record
    if pending:  # an unbalanced quote at the end: one last (malformed) record, for the parser to refuse
        yield start, b"".join(pending)


def parts(handle: IO[bytes], quoted: bool, header: bool, every: int) -> Iterator[TextPart]:
    """The file cut into parts of `every` records (after the header, when there is one), in one pass
    from the start: planning parses each part as it comes, and holds one part's bytes at a time."""
    handle.seek(0)
    found = records(handle, quoted)
    if header:
        next(found, None)
    chunk: list[bytes] = []
    start = end = 0
    for offset, record in found:
        if not chunk:
            start = offset
        chunk.append(record)
        end = offset + len(record)
        if len(chunk) == every:
            yield TextPart(start, end, len(chunk), b"".join(chunk))
            chunk = []
    if chunk:
        yield TextPart(start, end, len(chunk), b"".join(chunk))


def header_record(handle: IO[bytes]) -> bytes:
    """A CSV file's first non-blank record (its column names)."""
    handle.seek(0)
    return next(records(handle, quoted=True), (0, b""))[1]


def read_range(handle: IO[bytes], start: int, stop: int) -> bytes:
    """The bytes [start, stop) of the file: whole records, when the offsets came from `scan`."""
    handle.seek(start)
    return handle.read(stop - start)
