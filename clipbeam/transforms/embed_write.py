"""The DoFns of the embed pipeline after inference: split results, write parts."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from clipbeam.transforms.corpus_read import failure
from clipbeam.transforms.embed_dofns import FAILURES, NAMESPACE
from clipbeam.transforms.parquet_sink import write_part


class SplitResultsDoFn(beam.DoFn):
    """PredictionResult -> (part, ("row", row)) or an embed-stage failure."""

    def __init__(self) -> None:
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._failed = Metrics.counter(NAMESPACE, "failed_embed")

    def process(self, result):
        sample, output = result.example, result.inference
        if "error" in output:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, failure(sample["part"], sample["id"], sample["source"],
                                                             "embed", output["error"]))
            return
        self._embedded.inc()
        row = {
            "id": sample["id"],
            "source": sample["source"],
            "caption": sample["caption"],
            "image_embedding": output["image"],
            "text_embedding": output["text"],
            "width": sample["width"],
            "height": sample["height"],
            "sha256": sample["sha256"],
            "meta": sample.get("meta") or {},
        }
        yield sample["part"], ("row", row)


class WritePartDoFn(beam.DoFn):
    """(part, [("row", r) | ("fail", f) | ("count", n)]) -> the part's files and marker."""

    def __init__(self, output: str, parts: dict[int, tuple[str, str]], dim: int, dtype: str,
                 schema_meta: dict[str, str], storage_options: dict | None) -> None:
        self._output = output
        self._parts = parts
        self._dim = dim
        self._dtype = dtype
        self._schema_meta = schema_meta
        self._storage_options = storage_options
        self._written = Metrics.counter(NAMESPACE, "parts_written")

    def process(self, element):
        index, items = element
        rows, failures, samples_in = [], [], 0
        for kind, value in items:
            if kind == "row":
                rows.append(value)
            elif kind == "fail":
                failures.append(value)
            else:
                samples_in += value
        source, fingerprint = self._parts[index]
        marker = write_part(self._output, index, source, fingerprint, rows, failures, samples_in, self._dim,
                            self._dtype, self._schema_meta, self._storage_options)
        self._written.inc()
        yield marker
