"""The DoFns of the embed pipeline after inference: embedded rows to fragments, fragments to parts.

What travels through the shuffle to a part's writer are small typed records
(PartItem): a fragment file's URL, one failed sample, or the number of
samples a part's reader saw. Never embeddings: those wait in fragment files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import apache_beam as beam
from apache_beam.metrics import Metrics

from clipbeam.corpus.read import failure
from clipbeam.layout.embeddings import fragments_name, part_name
from clipbeam.layout.embeddings.metadata import DEFAULT_MAX_METADATA_COLUMNS
from clipbeam.layout.embeddings.write import merge_fragments, write_fragment, write_part
from clipbeam.layout.ledger import UnitLedger
from clipbeam.layout.owned import remove_owned
from clipbeam.transforms.embed_dofns import FAILURES, NAMESPACE, in_global_window


@dataclass(frozen=True)
class FragmentFile:
    """A bundle's embedded rows of one part, waiting in a Parquet file."""

    url: str


@dataclass(frozen=True)
class FailedSample:
    """A failure row (id, source, stage, error), as corpus.read.failure makes it."""

    row: dict


@dataclass(frozen=True)
class SampleCount:
    """How many samples the part's reader saw (one per part): the accounting check's left side."""

    samples: int


PartItem = Union[FragmentFile, FailedSample, SampleCount]


@dataclass(frozen=True)
class PartInfo:
    """What the writer records about a part besides its counts (both go into its done-marker)."""

    source: str
    fingerprint: str


class SplitResultsDoFn(beam.DoFn):
    """PredictionResults (one per batch) -> (part, FragmentFile) for embedded rows, or embed-stage failure rows.

    Rows are buffered per part and written as a fragment every `flush_rows`
    rows and at the end of each bundle, so memory stays flat whatever the corpus size.
    """

    def __init__(self, output: str, dim: int, dtype: str, storage_options: dict | None,
                 flush_rows: int = 1024, max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS) -> None:
        self._max_metadata_columns = max_metadata_columns
        self._output = output
        self._dim = dim
        self._dtype = dtype
        self._storage_options = storage_options
        self._flush_rows = flush_rows
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._failed = {stage: Metrics.counter(NAMESPACE, f"failed_{stage}") for stage in ("decode", "embed")}
        self._buffers: dict[int, list[dict]] = {}

    def start_bundle(self) -> None:
        self._buffers = {}

    def process(self, result):
        """One PredictionResult holds a batch: its samples and one output each."""
        for sample, output in zip(result.example, result.inference, strict=True):
            if "error" in output:  # a JPEG the GPU path could not decode is a decode failure, counted so
                stage = output.get("stage", "embed")
                self._failed[stage].inc()
                yield beam.pvalue.TaggedOutput(FAILURES, failure(sample["part"], sample["id"], sample["source"],
                                                                 stage, output["error"]))
                continue
            self._embedded.inc()
            buffer = self._buffers.setdefault(sample["part"], [])
            buffer.append(embedded_row(sample, output))
            if len(buffer) >= self._flush_rows:
                yield self._flush(sample["part"])

    def finish_bundle(self):
        for part in list(self._buffers):
            yield in_global_window(self._flush(part))

    def _flush(self, part: int) -> tuple[int, FragmentFile]:
        rows = self._buffers.pop(part)
        url = write_fragment(self._output, part, rows, self._dim, self._dtype, self._storage_options,
                             self._max_metadata_columns)
        return part, FragmentFile(url)


def embedded_row(sample: dict, output: dict) -> dict:
    """One row of the embeddings contract from a decoded sample and its inference."""
    return {
        "id": sample["id"],
        "source": sample["source"],
        "caption": sample["caption"],
        "image_embedding": output["image"],
        "text_embedding": output["text"],
        "width": sample["width"],
        "height": sample["height"],
        "sha256": sample["sha256"],
        "source_offset": sample.get("source_offset"),
        "source_size": sample.get("source_size"),
        "meta": sample.get("meta") or {},
    }


class WritePartDoFn(beam.DoFn):
    """(part, [PartItem, ...]) -> the part's files, then its done-marker (which checks the lease)."""

    def __init__(self, ledger: UnitLedger, parts: dict[int, PartInfo], schema_meta: dict[str, str],
                 max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS) -> None:
        self._max_metadata_columns = max_metadata_columns
        self._ledger = ledger
        self._parts = parts
        self._schema_meta = schema_meta
        self._written = Metrics.counter(NAMESPACE, "parts_written")

    def process(self, element: tuple[int, list[PartItem]]):
        number, items = element
        fragments = [item.url for item in items if isinstance(item, FragmentFile)]
        failures = [item.row for item in items if isinstance(item, FailedSample)]
        samples_in = sum(item.samples for item in items if isinstance(item, SampleCount))
        out, so = self._ledger.root, self._ledger.storage_options
        table = merge_fragments(fragments, so)
        files = write_part(out, number, table, failures, samples_in, self._schema_meta, so,
                           self._max_metadata_columns)
        info = self._parts[number]
        marker = self._ledger.mark_done(part_name(number), {
            "part": number, "source": info.source, "fingerprint": info.fingerprint,
            "samples": files.samples, "rows": files.rows, "failures": files.failures,
            "failed_by_stage": files.failed_by_stage, "embeddings": files.embeddings,
            "failures_file": files.failures_file, "text_rows": files.text_rows,
            "metadata_folded": files.metadata_folded,
        }, files.files)
        remove_owned(out, fragments_name(number), so, recursive=True)  # never through a link
        self._written.inc()
        yield marker
