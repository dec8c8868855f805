"""Row boundaries of CSV and JSONL manifests, so that a part reads only its own bytes.

Planning scans a text manifest once and records the byte offset of every
part's first row; a part then reads [its offset, the next part's offset) and
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
class TextLayout:
    """Where the rows of a text manifest are: `offsets[k]` is the byte offset of row k * every,
    and the last entry is the end of the file."""

    rows: int
    offsets: tuple[int, ...]


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


def scan(handle: IO[bytes], quoted: bool, header: bool, every: int) -> TextLayout:
    """Count the rows (after the header, when there is one) and note where every `every`-th one starts."""
    offsets: list[int] = []
    rows, end = 0, 0
    found = records(handle, quoted)
    if header:
        next(found, None)
    for start, record in found:
        if rows % every == 0:
            offsets.append(start)
        rows += 1
        end = start + len(record)
    return TextLayout(rows, tuple(offsets) + (end,))


def header_record(handle: IO[bytes]) -> bytes:
    """A CSV file's first non-blank record (its column names)."""
    handle.seek(0)
    return next(records(handle, quoted=True), (0, b""))[1]


def read_range(handle: IO[bytes], start: int, stop: int) -> bytes:
    """The bytes [start, stop) of the file: whole records, when the offsets came from `scan`."""
    handle.seek(start)
    return handle.read(stop - start)
