"""The DoFns of the embed pipeline after inference: embedded rows to fragments, fragments to parts."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from clipbeam.storage import get_fs
from clipbeam.transforms.corpus_read import failure
from clipbeam.transforms.embed_dofns import FAILURES, NAMESPACE
from clipbeam.transforms.parquet_sink import fragments_dir, merge_fragments, write_fragment, write_part


class SplitResultsDoFn(beam.DoFn):
    """PredictionResults -> fragment files of embedded rows, or embed-stage failures.

    Rows are buffered per part and written as a fragment every `flush_rows`
    rows and at the end of each bundle; only (part, ("fragment", url)) goes on
    to the shuffle, so memory stays flat whatever the corpus size.
    """

    def __init__(self, output: str, dim: int, dtype: str, storage_options: dict | None,
                 flush_rows: int = 1024) -> None:
        self._output = output
        self._dim = dim
        self._dtype = dtype
        self._storage_options = storage_options
        self._flush_rows = flush_rows
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._failed = Metrics.counter(NAMESPACE, "failed_embed")
        self._buffers: dict[int, list[dict]] = {}

    def start_bundle(self) -> None:
        self._buffers = {}

    def process(self, result):
        sample, output = result.example, result.inference
        if "error" in output:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure(sample["part"], sample["id"], sample["source"],
                                                             "embed", output["error"]))
            return
        self._embedded.inc()
        buffer = self._buffers.setdefault(sample["part"], [])
        buffer.append({
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
        })
        if len(buffer) >= self._flush_rows:
            yield self._flush(sample["part"])

    def finish_bundle(self):
        for part in list(self._buffers):
            yield WindowedValue(self._flush(part), MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self, part: int):
        rows = self._buffers.pop(part)
        url = write_fragment(self._output, part, rows, self._dim, self._dtype, self._storage_options)
        return part, ("fragment", url)


class WritePartDoFn(beam.DoFn):
    """(part, [("fragment", url) | ("fail", f) | ("count", n)]) -> the part's files and marker."""

    def __init__(self, output: str, parts: dict[int, tuple[str, str]], schema_meta: dict[str, str],
                 storage_options: dict | None) -> None:
        self._output = output
        self._parts = parts
        self._schema_meta = schema_meta
        self._storage_options = storage_options
        self._written = Metrics.counter(NAMESPACE, "parts_written")

    def process(self, element):
        index, items = element
        fragments, failures, samples_in = [], [], 0
        for kind, value in items:
            if kind == "fragment":
                fragments.append(value)
            elif kind == "fail":
                failures.append(value)
            else:
                samples_in += value
        source, fingerprint = self._parts[index]
        table = merge_fragments(fragments, self._storage_options)
        marker = write_part(self._output, index, source, fingerprint, table, failures, samples_in,
                            self._schema_meta, self._storage_options)
        fs, folder = get_fs(fragments_dir(self._output, index), self._storage_options)
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
        self._written.inc()
        yield marker
