"""What classify and export share: one per-part transform over the embeddings parts not done yet.

Both jobs make one output unit per embeddings part and name it by the part's
number, so a rerun (after a failure, or after the corpus grew) only runs the
parts without a done-marker for the same embeddings file and row count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from clipbeam.commands.common import run_pipeline
from clipbeam.layout import OutputFolder, UnitLedger
from clipbeam.layout.embeddings import part_name
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart

LOG = logging.getLogger(__name__)


def pending_parts(parts: list[EmbeddingsPart], done: dict[str, dict]) -> list[EmbeddingsPart]:
    """The parts without a done-marker for the same embeddings file and row count (a re-embedded part is redone)."""
    def finished(part: EmbeddingsPart) -> bool:
        marker = done.get(part_name(part.number))
        return marker is not None and (marker.get("source"), marker.get("rows_in")) == (part.file.url, part.file.rows)

    return [part for part in parts if not finished(part)]


@dataclass(frozen=True)
class PartsRun:
    """How many parts were done before this run, how many it ran, and its exit code (0, or 1: rerun to resume)."""

    done_before: int
    ran: int
    code: int

    def summary(self, total: int) -> str:
        return f"{total} ({self.done_before} done already, {self.ran} run now)"


def run_parts(out: OutputFolder, parts: list[EmbeddingsPart], options: PipelineOptions, command: str,
              transform: Callable[[UnitLedger], beam.PTransform]) -> PartsRun:
    """Run `transform(ledger)` over the pending parts, if any; the workers mark each part done."""
    pending = pending_parts(parts, out.done_units())
    LOG.info("%d parts done already, %d to run", len(parts) - len(pending), len(pending))
    code = 0
    if pending:
        pipeline = beam.Pipeline(options=options)
        _ = pipeline | "Parts" >> beam.Create(pending) | transform(out.ledger)
        code = run_pipeline(pipeline, command)
    return PartsRun(len(parts) - len(pending), len(pending), code)
