"""The core of `clipbeam classify`: embeddings parts in, one labels part out per part.

Each part is streamed in row batches (memory stays one batch whatever the part
size), labelled with the zero-shot math of models/zero_shot.py, and written
under a temporary name that is renamed into place, so a labels part that
exists is complete. Parts are independent: Beam spreads them over workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.layout import UnitLedger
from clipbeam.layout.embeddings import part_name
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart
from clipbeam.layout.embeddings.read import iter_batches
from clipbeam.layout.labels import SCHEMA, labels_file
from clipbeam.models.zero_shot import zero_shot


@dataclass(frozen=True)
class ClassifyConfig:
    """What every part needs, decided before the pipeline starts.

    `classes` holds one unit vector per label; `ledger` marks each finished
    part done (None in tests that only look at the rows).
    """

    output: str
    storage_options: dict
    column: str
    dim: int
    labels: tuple[str, ...]
    classes: np.ndarray
    top_k: int
    batch_rows: int
    ledger: UnitLedger | None


@dataclass(frozen=True)
class LabelsPart:
    """A finished labels part: its path under the output, rows written, null vectors skipped.

    `source` and `rows_in` name the embeddings file it came from, so that a
    rerun redoes a part whose embeddings changed since.
    """

    number: int
    path: str
    rows: int
    skipped: int
    source: str
    rows_in: int


def labels_table(ids: pa.Array, labels: np.ndarray, top: np.ndarray, probs: np.ndarray) -> pa.Table:
    """One batch's rows: the best label and score, then the top-k labels and scores as lists."""
    n, k = top.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.table({
        "id": ids,
        "label": pa.array(labels[top[:, 0]].tolist(), pa.string()),
        "score": pa.array(probs[:, 0].astype(np.float32)),
        "top_labels": pa.ListArray.from_arrays(offsets, pa.array(labels[top].ravel().tolist(), pa.string())),
        "top_scores": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel().astype(np.float32))),
    }, schema=SCHEMA)


def classify_part(part: EmbeddingsPart, config: ClassifyConfig) -> LabelsPart:
    """Label every row of one embeddings part; rows with a null vector are counted as skipped."""
    name = labels_file(part.number)
    url = storage.join(config.output, name)
    labels = np.array(config.labels, dtype=object)
    rows = skipped = 0
    with storage.atomic_open(url, "wb", config.storage_options) as handle, \
            pq.ParquetWriter(handle, SCHEMA) as writer:
        for batch in iter_batches(part.file, config.column, "id", [], config.dim, batch_rows=config.batch_rows,
                                  storage_options=config.storage_options):
            top, probs = zero_shot(batch.vectors, config.classes, config.top_k)
            writer.write_table(labels_table(batch.metadata.column("id"), labels, top, probs))
            rows += len(top)
            skipped += batch.skipped
    result = LabelsPart(part.number, name, rows, skipped, part.file.url, part.file.rows)
    if config.ledger is not None:
        config.ledger.mark_done(part_name(part.number), asdict(result), files=[name])
    return result


class ClassifyParts(beam.PTransform):
    """PCollection[EmbeddingsPart] -> PCollection[LabelsPart], parts spread over workers."""

    def __init__(self, config: ClassifyConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, parts):
        return (parts
                | "Spread" >> beam.Reshuffle()
                | "Classify" >> beam.Map(classify_part, self.config))
