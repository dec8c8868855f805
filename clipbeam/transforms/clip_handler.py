"""The one RunInference ModelHandler for CLIP: images and captions in one batch.

The model is loaded once per worker (or shared across a worker's processes with
`--model-copies` on GPU machines). Batches are fixed in size, which keeps GPU
memory flat. A batch that fails is retried one sample at a time, so one bad
sample costs one failure row, not a whole batch.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from clipbeam.models.clip import ClipSpec, LoadedClip, encode_images, encode_texts, load_clip

LOG = logging.getLogger(__name__)


class ClipEmbedder:
    """A loaded CLIP behind one method, so that it can also be served to several
    processes through Beam's multi_process_shared proxy (`--model-copies`)."""

    def __init__(self, clip: LoadedClip) -> None:
        self.clip = clip

    def embed(self, pixels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        return encode_images(self.clip, torch.from_numpy(pixels)), encode_texts(self.clip, texts)


class ClipModelHandler(ModelHandler[dict, PredictionResult, ClipEmbedder]):
    """Embeds decoded samples: `pixels` always, `caption` where `embed_text` is set.

    Each PredictionResult's inference is {"image": vector, "text": vector|None}
    or {"error": message}.
    """

    def __init__(self, spec: ClipSpec, storage_options: dict | None = None, batch_size: int = 64,
                 model_copies: int = 1) -> None:
        super().__init__()
        self._spec = spec
        self._storage_options = storage_options
        self._batch_size = batch_size
        self._model_copies = model_copies

    def load_model(self) -> ClipEmbedder:
        clip = load_clip(self._spec, self._storage_options)
        LOG.info("loaded CLIP %s (%s) on %s", self._spec.model, clip.weights, clip.device)
        return ClipEmbedder(clip)

    def run_inference(self, batch: Sequence[dict], model: ClipEmbedder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        try:
            outputs = self._embed(batch, model)
        except Exception as exc:  # isolate the bad sample(s)
            LOG.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            outputs = []
            for sample in batch:
                try:
                    outputs.extend(self._embed([sample], model))
                except Exception as single:
                    outputs.append({"error": f"{single.__class__.__name__}: {single}"})
        return [PredictionResult(sample, output, self._spec.model) for sample, output in zip(batch, outputs)]

    @staticmethod
    def _embed(batch: Sequence[dict], model: ClipEmbedder) -> list[dict]:
        pixels = np.stack([sample["pixels"] for sample in batch])
        with_text = [i for i, sample in enumerate(batch) if sample.get("embed_text")]
        images, texts = model.embed(pixels, [batch[i]["caption"] for i in with_text])
        text_rows: list[np.ndarray | None] = [None] * len(batch)
        for row, i in enumerate(with_text):
            text_rows[i] = texts[row]
        return [{"image": images[i], "text": text_rows[i]} for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(sample["pixels"].nbytes for sample in batch)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._model_copies > 1

    def model_copies(self) -> int:
        return self._model_copies

    def get_metrics_namespace(self) -> str:
        return "clipbeam.embed"
