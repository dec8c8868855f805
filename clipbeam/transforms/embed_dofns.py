"""The DoFns of the embed pipeline before inference: read a part, decode samples, order captions.

Samples travel as lists, one model batch each: Beam's cost per element (a few
hundred microseconds through the fused steps) is then paid once per batch, not
once per sample, which on a fast model or a GPU worker is most of the CPU a
worker spends. Each DoFn has a main output and a `failures` output (a
dead-letter queue in Beam's terms) with one element per failed sample; counts
go to Beam metrics under the `clipbeam.embed` namespace, so remote runners
show them in their UI. The embed pipeline is a batch job in the global window,
so lists are emitted there.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from clipbeam.corpus.plan import PartSpec
from clipbeam.corpus.read import DEFAULT_LIMITS, ReadLimits, failure, read_part
from clipbeam.models.clip import ClipSpec, load_tokenizer, tokenize_texts
from clipbeam.models.images import DEFAULT_MAX_CAPTION_CHARS, TRUNCATED, decode_caption, failure_reason, sha256_hex
from clipbeam.models.ordered_pool import OrderedPool
from clipbeam.models.pixels import Decoded, decode_or_defer, uint8_transform
from clipbeam.transforms.clip_handler import DEFAULT_TUNING, NAMESPACE, EmbedTuning, pixel_recipe

FAILURES = "failures"
COUNTS = "counts"


class ReadPartDoFn(beam.DoFn):
    """(part index, PartSpec) -> lists of up to `batch_size` raw samples; read failures and the part's
    sample count tagged."""

    def __init__(self, storage_options: dict | None, columns=None, limits: ReadLimits = DEFAULT_LIMITS,
                 batch_size: int = 64) -> None:
        self._storage_options = storage_options
        self._columns = columns
        self._limits = limits
        self._batch_size = batch_size
        self._read = Metrics.counter(NAMESPACE, "samples_read")
        self._failed = Metrics.counter(NAMESPACE, "failed_read")

    def process(self, element: tuple[int, PartSpec]):
        index, spec = element
        count, batch = 0, []
        for record in read_part(index, spec, self._storage_options, self._columns, self._limits):
            count += 1
            if "stage" in record:
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(FAILURES, record)
                continue
            batch.append(record)
            if len(batch) == self._batch_size:
                self._read.inc(len(batch))
                yield batch
                batch = []
        if batch:
            self._read.inc(len(batch))
            yield batch
        yield beam.pvalue.TaggedOutput(COUNTS, (index, count))


def in_global_window(value) -> WindowedValue:
    """An output emitted outside `process` (the embed pipeline is a batch job in the global window)."""
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def _batches(samples: list[dict], size: int, final: bool):
    """Whole lists of `size` cut from the front of `samples` (in place), and with `final` the rest too."""
    while len(samples) >= size or (final and samples):
        batch = samples[:size]
        del samples[:size]
        yield in_global_window(batch)


class DecodeDoFn(beam.DoFn):
    """Lists of raw samples -> lists of `batch_size` samples with uint8 pixels (or JPEG bytes left for
    the GPU); a decode failure goes to `failures` alone.

    Decoding runs on a bounded pool of threads (PIL releases the GIL), at most
    a couple of batches ahead of the model; samples leave in the order they came.
    Given the model's `spec`, captions to embed are tokenised here too (`tokens`):
    tokenising is pure Python, and decode DoFns run in every SDK process of a
    worker, while the model may be one copy shared by all of them.
    """

    def __init__(self, preprocess_cfg: dict, max_pixels: int, embed_text: bool,
                 tuning: EmbedTuning = DEFAULT_TUNING, batch_size: int = 64, spec: ClipSpec | None = None,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> None:
        self._recipe = pixel_recipe(preprocess_cfg, max_pixels, tuning)
        self._embed_text = embed_text
        self._tuning = tuning
        self._batch_size = batch_size
        self._failed = Metrics.counter(NAMESPACE, "failed_decode")
        self._max_caption_chars = max_caption_chars
        self._truncated = Metrics.counter(NAMESPACE, "captions_truncated")
        self._pool: OrderedPool | None = None
        self._transform = None
        self._spec = spec
        self._tokenizer = None
        self._ready: list[dict] = []

    def setup(self) -> None:
        self._transform = uint8_transform(self._recipe)
        if self._embed_text and self._spec is not None:
            self._tokenizer = load_tokenizer(self._spec)
        self._pool = OrderedPool(self._decode, self._tuning.threads(), 2 * self._batch_size)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def start_bundle(self) -> None:
        self._ready = []

    def _decode(self, data: bytes) -> tuple[Decoded | Exception, str]:
        """Runs on a pool thread: never raises, the error travels back as a value."""
        try:
            decoded = decode_or_defer(data, self._recipe, self._transform, self._tuning.decode_device != "cpu")
        except Exception as exc:  # a transform error on a decodable image is still a decode failure
            decoded = exc
        return decoded, sha256_hex(data)

    def process(self, samples: list[dict]):
        for sample in samples:
            for original, result in self._pool.submit(sample.pop("image"), sample):
                yield from self._take(original, *result)
        yield from self._emit(final=False)

    def finish_bundle(self):
        for original, result in self._pool.drain():
            yield from self._take(original, *result)
        yield from self._emit(final=True)

    def _emit(self, final: bool):
        """Whole lists from `_ready`, their captions tokenised in one call per list."""
        for batch in _batches(self._ready, self._batch_size, final):
            texted = [s for s in batch.value if s["embed_text"]] if self._tokenizer is not None else []
            if texted:
                tokens = tokenize_texts(self._tokenizer, [s["caption"] for s in texted])
                for sample, row in zip(texted, tokens, strict=True):
                    sample["tokens"] = row
            yield batch

    def _take(self, sample: dict, decoded: Decoded | Exception, sha256: str):
        """A failure goes out at once; a decoded sample waits in `_ready` for its list to fill."""
        if isinstance(decoded, Exception):
            self._failed.inc()
            record = failure(sample["part"], sample["id"], sample["source"], "decode", failure_reason(decoded))
            yield beam.pvalue.TaggedOutput(FAILURES, in_global_window(record))
            return
        caption, note = decode_caption(sample.get("caption"), self._max_caption_chars)
        sample["caption"] = caption
        if note and note.startswith(TRUNCATED):
            self._truncated.inc()
        if note:
            sample["meta"] = dict(sample.get("meta") or {}, caption_note=note)
        sample["embed_text"] = self._embed_text and caption is not None
        sample["width"], sample["height"] = decoded.width, decoded.height
        sample["sha256"] = sha256
        sample["pixels"], sample["jpeg"] = decoded.pixels, decoded.jpeg
        self._ready.append(sample)


class OrderByCaptionLength(beam.DoFn):
    """Lists of decoded samples -> lists of `batch_size`, sorted by caption length across `window` samples.

    The model pads each group of captions to its longest (text_trim.py), so
    batches of captions of similar length do less work; the vectors are the
    same in any order (each part's rows are sorted by id when it is written).
    Memory stays bounded: at most `window` decoded samples wait here.
    """

    def __init__(self, window: int, batch_size: int) -> None:
        self._window = window
        self._batch_size = batch_size
        self._held: list[dict] = []

    def start_bundle(self) -> None:
        self._held = []

    def process(self, samples: list[dict]):
        self._held.extend(samples)
        if len(self._held) >= self._window:
            yield from self._release()

    def finish_bundle(self):
        yield from self._release()

    def _release(self):
        self._held.sort(key=_token_count)
        yield from _batches(self._held, self._batch_size, final=True)


def _token_count(sample: dict) -> int:
    tokens = sample.get("tokens")
    return int(np.count_nonzero(tokens)) if tokens is not None else 0
