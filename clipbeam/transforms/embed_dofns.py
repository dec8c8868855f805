"""The DoFns of the embed pipeline before inference: read a part, decode samples.

Each DoFn has a main output and a `failures` output (a dead-letter queue in
Beam's terms); counts go to Beam metrics under the `clipbeam.embed` namespace,
so remote runners show them in their UI.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from clipbeam.models.clip import image_preprocessor
from clipbeam.transforms.corpus_plan import PartSpec
from clipbeam.transforms.corpus_read import ReadLimits, failure, read_part
from clipbeam.models.images import DecodeError, decode_caption, decode_image, sha256_hex

NAMESPACE = "clipbeam.embed"
FAILURES = "failures"
COUNTS = "counts"


class ReadPartDoFn(beam.DoFn):
    """(part index, PartSpec) -> raw samples; read failures and the part's sample count tagged."""

    def __init__(self, storage_options: dict | None, columns=None, limits: ReadLimits = ReadLimits()) -> None:
        self._storage_options = storage_options
        self._columns = columns
        self._limits = limits
        self._read = Metrics.counter(NAMESPACE, "samples_read")
        self._failed = Metrics.counter(NAMESPACE, "failed_read")

    def process(self, element: tuple[int, PartSpec]):
        index, spec = element
        count = 0
        for record in read_part(index, spec, self._storage_options, self._columns, self._limits):
            count += 1
            if "stage" in record:
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(FAILURES, record)
            else:
                self._read.inc()
                yield record
        yield beam.pvalue.TaggedOutput(COUNTS, (index, count))


class DecodeDoFn(beam.DoFn):
    """Raw sample -> sample with the model's preprocessed pixels, or a decode failure."""

    def __init__(self, preprocess_cfg: dict, max_pixels: int, embed_text: bool) -> None:
        self._cfg = preprocess_cfg
        self._max_pixels = max_pixels
        self._embed_text = embed_text
        self._failed = Metrics.counter(NAMESPACE, "failed_decode")
        self._preprocess = None

    def setup(self) -> None:
        self._preprocess = image_preprocessor(self._cfg)

    def process(self, sample: dict):
        data = sample.pop("image")
        try:
            image = decode_image(data, self._max_pixels)
            pixels = self._preprocess(image)
        except Exception as exc:  # a transform error on a decodable image is still a decode failure
            self._failed.inc()
            reason = str(exc) if isinstance(exc, DecodeError) else f"{exc.__class__.__name__}: {exc}"
            yield beam.pvalue.TaggedOutput(FAILURES, failure(sample["part"], sample["id"], sample["source"],
                                                             "decode", reason))
            return
        caption, note = decode_caption(sample.get("caption"))
        sample["caption"] = caption
        if note:
            sample["meta"] = dict(sample.get("meta") or {}, caption_note=note)
        sample["embed_text"] = self._embed_text and caption is not None
        sample["width"], sample["height"] = image.size
        sample["sha256"] = sha256_hex(data)
        sample["pixels"] = pixels
        yield sample
