"""Training samples from any corpus that `clipbeam embed` reads, in a reproducible shuffled order.

Training loops (clipbeam.models.train_clip / train_vqgan) see a corpus as a
`CorpusSamples`: `count()` usable records and `epoch(e, seed, skip)` records of
one epoch. Planning and reading are embed's own (plan_parts, read_part), so a
corpus that embeds also trains. Records come out undecoded (image bytes plus
the decoded caption): skipping the batches already trained when resuming then
costs a read, not a decode, and decode failures stay the loop's to count.

Order: each epoch shuffles the order of parts and then passes records through
a seeded shuffle buffer, both seeded by (seed, epoch), so a resumed run sees
exactly the records the interrupted one would have seen.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

from clipbeam.corpus.plan import ManifestColumns, PartSpec, plan_parts
from clipbeam.corpus.read import read_part
from clipbeam.errors import FieldError, UsageError
from clipbeam.models.images import DEFAULT_MAX_PIXELS, decode_caption, decode_image

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One usable training record: image bytes (decoded later) and its caption (None if it has none)."""

    id: str
    image: bytes
    caption: str | None


class CorpusSamples:
    """A corpus as an iterable of training records; picklable (no open files are held)."""

    def __init__(self, inputs: list[str], fmt: str = "auto", storage_options: dict | None = None,
                 need_caption: bool = True, shuffle_buffer: int = 4096,
                 columns: ManifestColumns | None = None, rows_per_part: int = 10_000,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if shuffle_buffer <= 0:
            raise FieldError("shuffle_buffer", f"{{field}} must be at least 1, not {shuffle_buffer}")
        self.inputs = list(inputs)
        self.storage_options = storage_options or {}
        self.need_caption = need_caption
        self.shuffle_buffer = shuffle_buffer
        self.columns = columns or ManifestColumns()
        self.max_pixels = max_pixels
        self.parts: list[PartSpec] = plan_parts(self.inputs, fmt, self.storage_options, rows_per_part, self.columns)
        if not self.parts:
            raise UsageError("the corpus holds no samples")
        self._count: int | None = None
        self.skipped: dict[str, int] = {}

    def _records(self, order: list[int]) -> Iterator[Record]:
        for index in order:
            for item in read_part(index, self.parts[index], self.storage_options, self.columns):
                if "stage" in item:
                    self._skip("unreadable")
                    continue
                caption, _ = decode_caption(item.get("caption"))
                if self.need_caption and caption is None:
                    self._skip("no caption")
                    continue
                yield Record(item["id"], item["image"], caption)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def decode(self, record: Record):
        """The record's RGB PIL image; raises DecodeError (a ValueError) for images embed would also reject."""
        return decode_image(record.image, self.max_pixels)

    def count(self) -> int:
        """Usable records (one pass over the corpus, without decoding images); cached."""
        if self._count is None:
            self._count = sum(1 for _ in self._records(list(range(len(self.parts)))))
            self.skipped = {}
        return self._count

    def epoch(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Record]:
        """The records of one epoch in their shuffled order, the first `skip` left out."""
        rng = random.Random(f"clipbeam-train/{seed}/{epoch}")
        order = list(range(len(self.parts)))
        rng.shuffle(order)
        buffer: list[Record] = []
        position = 0

        def emit(record: Record) -> Iterator[Record]:
            nonlocal position
            position += 1
            if position > skip:
                yield record

        for record in self._records(order):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            slot = rng.randrange(len(buffer))
            out, buffer[slot] = buffer[slot], record
            yield from emit(out)
        rng.shuffle(buffer)
        for out in buffer:
            yield from emit(out)
