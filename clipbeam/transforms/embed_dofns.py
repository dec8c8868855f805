"""The DoFns of the embed pipeline before inference: read a part, decode samples.

Each DoFn has a main output and a `failures` output (a dead-letter queue in
Beam's terms); counts go to Beam metrics under the `clipbeam.embed` namespace,
so remote runners show them in their UI.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from clipbeam.models.clip import ClipSpec, load_tokenizer, tokenize_texts
from clipbeam.models.images import DecodeError, decode_caption, sha256_hex
from clipbeam.models.ordered_pool import OrderedPool
from clipbeam.models.pixels import Decoded, decode_or_defer, uint8_transform
from clipbeam.transforms.clip_handler import DEFAULT_TUNING, NAMESPACE, EmbedTuning, pixel_recipe
from clipbeam.transforms.corpus_plan import PartSpec
from clipbeam.transforms.corpus_read import DEFAULT_LIMITS, ReadLimits, failure, read_part

FAILURES = "failures"
COUNTS = "counts"


class ReadPartDoFn(beam.DoFn):
    """(part index, PartSpec) -> raw samples; read failures and the part's sample count tagged."""

    def __init__(self, storage_options: dict | None, columns=None, limits: ReadLimits = DEFAULT_LIMITS) -> None:
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
    """Raw sample -> sample with uint8 pixels (or JPEG bytes left for the GPU), or a decode failure.

    Decoding runs on a bounded pool of threads (PIL releases the GIL), at most
    a couple of batches ahead of the model; samples leave in the order they came.
    Given the model's `spec`, captions to embed are tokenised here too (`tokens`):
    tokenising is pure Python, and decode DoFns run in every SDK process of a
    worker, while the model may be one copy shared by all of them.
    """

    def __init__(self, preprocess_cfg: dict, max_pixels: int, embed_text: bool,
                 tuning: EmbedTuning = DEFAULT_TUNING, batch_size: int = 64, spec: ClipSpec | None = None) -> None:
        self._recipe = pixel_recipe(preprocess_cfg, max_pixels, tuning)
        self._embed_text = embed_text
        self._tuning = tuning
        self._window = 2 * batch_size
        self._failed = Metrics.counter(NAMESPACE, "failed_decode")
        self._pool: OrderedPool | None = None
        self._transform = None
        self._spec = spec
        self._tokenizer = None

    def setup(self) -> None:
        self._transform = uint8_transform(self._recipe)
        if self._embed_text and self._spec is not None:
            self._tokenizer = load_tokenizer(self._spec)
        self._pool = OrderedPool(self._decode, self._tuning.threads(), self._window)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _decode(self, data: bytes) -> tuple[Decoded | Exception, str]:
        """Runs on a pool thread: never raises, the error travels back as a value."""
        try:
            decoded = decode_or_defer(data, self._recipe, self._transform, self._tuning.decode_device != "cpu")
        except Exception as exc:  # a transform error on a decodable image is still a decode failure
            decoded = exc
        return decoded, sha256_hex(data)

    def process(self, sample: dict, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        data = sample.pop("image")
        for where, result in self._pool.submit(data, (sample, timestamp, window)):
            yield self._emit(*where, *result)

    def finish_bundle(self):
        for where, result in self._pool.drain():
            yield self._emit(*where, *result)

    def _emit(self, sample: dict, timestamp, window, decoded: Decoded | Exception, sha256: str):
        if isinstance(decoded, Exception):
            self._failed.inc()
            reason = str(decoded) if isinstance(decoded, DecodeError) else f"{decoded.__class__.__name__}: {decoded}"
            record = failure(sample["part"], sample["id"], sample["source"], "decode", reason)
            return beam.pvalue.TaggedOutput(FAILURES, WindowedValue(record, timestamp, [window]))
        caption, note = decode_caption(sample.get("caption"))
        sample["caption"] = caption
        if note:
            sample["meta"] = dict(sample.get("meta") or {}, caption_note=note)
        sample["embed_text"] = self._embed_text and caption is not None
        if sample["embed_text"] and self._tokenizer is not None:
            sample["tokens"] = tokenize_texts(self._tokenizer, [caption])[0]
        sample["width"], sample["height"] = decoded.width, decoded.height
        sample["sha256"] = sha256
        sample["pixels"], sample["jpeg"] = decoded.pixels, decoded.jpeg
        return WindowedValue(sample, timestamp, [window])


class OrderByCaptionLength(beam.DoFn):
    """Decoded samples, reordered by caption length within windows of `window` samples.

    The model pads each group of captions to its longest (text_trim.py), so
    batches of captions of similar length do less work; the vectors are the
    same in any order (each part's rows are sorted by id when it is written).
    Memory stays bounded: at most `window` decoded samples wait here.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._held: list[tuple[int, WindowedValue]] = []

    def start_bundle(self) -> None:
        self._held = []

    def process(self, sample: dict, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        tokens = sample.get("tokens")
        length = int(np.count_nonzero(tokens)) if tokens is not None else 0
        self._held.append((length, WindowedValue(sample, timestamp, [window])))
        if len(self._held) >= self._window:
            yield from self._release()

    def finish_bundle(self):
        yield from self._release()

    def _release(self):
        held, self._held = self._held, []
        held.sort(key=lambda item: item[0])
        for _, value in held:
            yield value
