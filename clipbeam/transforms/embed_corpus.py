"""EmbedCorpus: the core of `clipbeam embed` as one composite PTransform.

(part number, PartSpec) -> read -> decode/preprocess -> [order by caption length] ->
RunInference(CLIP) -> row fragments -> group by part -> write the part's files
and done-marker. Between reading and the fragments, elements are lists of
samples, one model batch each (embed_dofns.py says why).
The output is the done-markers of the parts written. Everything the steps need
comes in one frozen EmbedCorpusConfig, so the transform can be built and
tested without the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from clipbeam.corpus.plan import ManifestColumns
from clipbeam.corpus.read import ReadLimits
from clipbeam.layout.embeddings.metadata import DEFAULT_MAX_METADATA_COLUMNS
from clipbeam.layout.ledger import UnitLedger
from clipbeam.models.clip import ClipSpec
from clipbeam.models.images import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_MAX_PIXELS
from clipbeam.transforms.clip_handler import ClipModelHandler, EmbedTuning
from clipbeam.transforms.embed_dofns import COUNTS, FAILURES, DecodeDoFn, OrderByCaptionLength, ReadPartDoFn
from clipbeam.transforms.embed_write import (
    FailedSample,
    PartInfo,
    SampleCount,
    SplitResultsDoFn,
    WritePartDoFn,
)

ORDER_WINDOW_BATCHES = 4  # captions are sorted by length across this many batches (see OrderByCaptionLength)


@dataclass(frozen=True)
class EmbedCorpusConfig:
    """Everything the embed pipeline's steps need (the command validates it before building)."""

    ledger: UnitLedger                 # the output folder, its storage options and the run's lease
    spec: ClipSpec
    dim: int
    preprocess: dict                   # models.clip.preprocess_config(spec)
    parts: dict[int, PartInfo]         # part number -> source and fingerprint, for the markers
    columns: ManifestColumns = ManifestColumns()
    limits: ReadLimits = ReadLimits()
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS
    embed_text: bool = True
    batch_size: int = 64
    model_copies: int = 1
    dtype: str = "float16"
    schema_meta: dict = field(default_factory=dict)
    accelerator: str | None = None
    tuning: EmbedTuning = EmbedTuning()  # decode threads and device, fast decode, caption cache, text trim

    @property
    def output(self) -> str:
        return self.ledger.root

    @property
    def storage_options(self) -> dict | None:
        return self.ledger.storage_options


def _failed(record: dict) -> tuple[int, FailedSample]:
    return record["part"], FailedSample(record)


def _counted(kv: tuple[int, int]) -> tuple[int, SampleCount]:
    return kv[0], SampleCount(kv[1])


class EmbedCorpus(beam.PTransform):
    """PCollection[(part number, PartSpec)] -> PCollection[done-marker dict], one per part written."""

    def __init__(self, config: EmbedCorpusConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, parts):
        cfg = self._config
        read = (
            parts
            | "SpreadParts" >> beam.Reshuffle()
            | "ReadPart" >> beam.ParDo(ReadPartDoFn(cfg.storage_options, cfg.columns, cfg.limits, cfg.batch_size))
            .with_outputs(FAILURES, COUNTS, main="samples")
        )
        decoded = read.samples | "Decode" >> beam.ParDo(
            DecodeDoFn(cfg.preprocess, cfg.max_pixels, cfg.embed_text, cfg.tuning, cfg.batch_size,
                       spec=cfg.spec, max_caption_chars=cfg.max_caption_chars)).with_outputs(FAILURES, main="decoded")
        samples = decoded.decoded
        if cfg.embed_text and cfg.tuning.trim_text:
            samples = samples | "ByCaptionLength" >> beam.ParDo(
                OrderByCaptionLength(ORDER_WINDOW_BATCHES * cfg.batch_size, cfg.batch_size))
        handler = ClipModelHandler(cfg.spec, cfg.storage_options, model_copies=cfg.model_copies,
                                   preprocess_cfg=cfg.preprocess, tuning=cfg.tuning, max_pixels=cfg.max_pixels)
        inference = RunInference(handler)
        if cfg.accelerator:  # only inference goes to GPU workers; reading, decoding, writing stay on CPUs
            inference = inference.with_resource_hints(accelerator=cfg.accelerator)
        split = (samples
                 | "Embed" >> inference
                 | "Split" >> beam.ParDo(SplitResultsDoFn(cfg.output, cfg.dim, cfg.dtype, cfg.storage_options,
                                                          max_metadata_columns=cfg.max_metadata_columns))
                 .with_outputs(FAILURES, main="rows"))
        return (
            (
                split.rows,
                read[FAILURES] | "ReadFailures" >> beam.Map(_failed),
                decoded[FAILURES] | "DecodeFailures" >> beam.Map(_failed),
                split[FAILURES] | "EmbedFailures" >> beam.Map(_failed),
                read[COUNTS] | "Counts" >> beam.Map(_counted),
            )
            | "All" >> beam.Flatten()
            | "ByPart" >> beam.GroupByKey()
            | "WritePart" >> beam.ParDo(WritePartDoFn(cfg.ledger, cfg.parts, cfg.schema_meta,
                                                      cfg.max_metadata_columns))
        )
