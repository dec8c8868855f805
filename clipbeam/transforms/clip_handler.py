"""The one RunInference ModelHandler for CLIP: images and captions in one batch.

The model is loaded once per worker (or shared across a worker's processes with
`--model-copies` on GPU machines). Batches arrive made, as lists of at most
`--batch-size` samples (DecodeDoFn), which keeps GPU memory flat. A batch
that fails is retried one sample at a time, so one bad sample costs one
failure row, not a whole batch. Repeated captions are served
from a per-worker LRU cache (models/caption_cache.py); its hits and misses, and
the JPEGs that fell back from GPU to CPU decoding, are Beam metrics.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from clipbeam.models.caption_cache import CaptionCache
from clipbeam.models.clip import ClipSpec, load_clip
from clipbeam.models.embedder import ClipEmbedder
from clipbeam.models.images import DEFAULT_MAX_PIXELS
from clipbeam.models.pixels import DEFAULT_FAST_DECODE, PixelRecipe

LOG = logging.getLogger(__name__)
NAMESPACE = "clipbeam.embed"
DECODE_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class EmbedTuning:
    """How embed runs fast. Only `fast_decode` changes the vectors by design (slightly; see README), so
    only it belongs in the resume fingerprint; GPU decoding differs from the CPU path by float rounding
    and resampling only (cosine >= 0.999); the rest change speed and memory, never results."""

    decode_threads: int = 0         # threads decoding in each worker; 0: the worker's cores
    decode_device: str = "cpu"      # "cuda": JPEGs decoded in batches on the model's GPU
    fast_decode: bool = DEFAULT_FAST_DECODE  # reduced-scale JPEG decoding of images >= 2x the model's input
    caption_cache_mb: int = 64      # per-worker caption -> embedding cache; 0 turns it off
    trim_text: bool = True          # captions encoded without their padding where that is exact

    def threads(self) -> int:
        if self.decode_threads:
            return self.decode_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DEFAULT_TUNING = EmbedTuning()


def pixel_recipe(preprocess_cfg: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                 tuning: EmbedTuning = DEFAULT_TUNING) -> PixelRecipe:
    return PixelRecipe(preprocess_cfg, max_pixels, tuning.fast_decode)


class ClipModelHandler(ModelHandler[list, PredictionResult, ClipEmbedder]):
    """Embeds lists of decoded samples, one list per model batch (DecodeDoFn makes them): `pixels` (uint8)
    or `jpeg` (bytes for the GPU) always, `caption` (from its `tokens` where DecodeDoFn attached them)
    where `embed_text` is set.

    Each PredictionResult holds one list: its example is the samples, its
    inference one output per sample, {"image": vector, "text": vector|None}
    or {"error": message}.
    """

    def __init__(self, spec: ClipSpec, storage_options: dict | None = None, model_copies: int = 1,
                 preprocess_cfg: dict | None = None, tuning: EmbedTuning = DEFAULT_TUNING,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        self._max_pixels = max_pixels  # for JPEGs the GPU could not decode, decoded here on the CPU
        self._spec = spec
        self._storage_options = storage_options
        self._model_copies = model_copies
        self._preprocess_cfg = preprocess_cfg
        self._tuning = tuning
        self._cache: CaptionCache | None = None
        self._hits = Metrics.counter(NAMESPACE, "caption_cache_hits")
        self._misses = Metrics.counter(NAMESPACE, "caption_cache_misses")
        self._fallbacks = Metrics.counter(NAMESPACE, "gpu_decode_fallbacks")

    def load_model(self) -> ClipEmbedder:
        from clipbeam.models.clip import preprocess_config

        clip = load_clip(self._spec, self._storage_options, cpu_autocast=True)
        LOG.info("loaded CLIP %s (%s) on %s", self._spec.model, clip.weights, clip.device)
        cfg = self._preprocess_cfg or preprocess_config(self._spec)
        return ClipEmbedder(clip, pixel_recipe(cfg, self._max_pixels, self._tuning), trim_text=self._tuning.trim_text)

    def run_inference(self, batch: Sequence[list[dict]], model: ClipEmbedder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        if self._cache is None:  # one per worker process, beside the model (or its proxy)
            self._cache = CaptionCache(self._tuning.caption_cache_mb << 20)
        return [PredictionResult(samples, self._embed_isolated(samples, model), self._spec.model)
                for samples in batch]

    def _embed_isolated(self, samples: list[dict], model: ClipEmbedder) -> list[dict]:
        """One output per sample; a batch that fails is retried sample by sample, to find the bad ones.
        Only the attempts whose outputs are kept count in the metrics (a failed batch counts nothing)."""
        try:
            return self._embed(samples, model)
        except Exception as exc:
            LOG.warning("batch of %d failed (%s); retrying one by one", len(samples), exc)
            outputs = []
            for sample in samples:
                try:
                    outputs.extend(self._embed([sample], model))
                except Exception as single:
                    outputs.append({"error": f"{single.__class__.__name__}: {single}"})
            return outputs

    def _embed(self, batch: Sequence[dict], model: ClipEmbedder) -> list[dict]:
        """Outputs for a batch; its metrics are counted once it has all of them."""
        items = [sample["pixels"] if sample.get("pixels") is not None else sample["jpeg"] for sample in batch]
        images = model.embed_images(items)
        with_text = [i for i, sample in enumerate(batch) if sample.get("embed_text")]
        text_rows: list[np.ndarray | None] = [None] * len(batch)
        hits, misses = self._cache.hits, self._cache.misses
        if with_text:  # no call to the model (maybe a proxy in another process) for a batch without captions
            texts = self._cache.embed([batch[i]["caption"] for i in with_text],
                                      _caption_encoder([batch[i] for i in with_text], model))
            for row, i in enumerate(with_text):
                text_rows[i] = texts[row]
        self._fallbacks.inc(images.fallbacks)
        self._hits.inc(self._cache.hits - hits)
        self._misses.inc(self._cache.misses - misses)
        return [{"error": images.failed[i], "stage": "decode"} if i in images.failed
                else {"image": images.vectors[i], "text": text_rows[i]} for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[list[dict]]) -> int:
        return sum(s["pixels"].nbytes if s.get("pixels") is not None else len(s["jpeg"])
                   for samples in batch for s in samples)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 1}  # each element is already a model batch

    def share_model_across_processes(self) -> bool:
        return self._model_copies > 1

    def model_copies(self) -> int:
        return self._model_copies

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def _caption_encoder(samples: Sequence[dict], model: ClipEmbedder):
    """captions -> vectors for the cache's misses: from the token ids DecodeDoFn attached (tokenising is
    pure Python and would hold the model's thread), from the text where a sample has none."""
    tokens = {sample["caption"]: sample.get("tokens") for sample in samples}

    def encode(captions: list[str]) -> np.ndarray:
        rows = [tokens.get(caption) for caption in captions]
        if not rows or any(row is None for row in rows):
            return model.embed_texts(captions)
        return model.embed_tokens(np.stack(rows))

    return encode


def inference_summary(result) -> list[tuple[str, object]]:
    """Summary rows from a finished pipeline's metrics: the caption cache's hit rate, GPU decode
    fallbacks. Empty where the runner does not report metrics."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # runners without metrics support
        return []
    totals: dict[str, int] = {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    rows: list[tuple[str, object]] = []
    lookups = totals.get("caption_cache_hits", 0) + totals.get("caption_cache_misses", 0)
    if lookups:
        rows.append(("caption cache hits", f"{totals.get('caption_cache_hits', 0) / lookups:.1%} of {lookups}"))
    if totals.get("captions_truncated"):
        rows.append(("captions truncated", f"{totals['captions_truncated']} (caption_note says from what length)"))
    if totals.get("gpu_decode_fallbacks"):
        rows.append(("GPU decode fell back", f"{totals['gpu_decode_fallbacks']} JPEGs decoded on CPU"))
    return rows
