"""Measuring what a model learned on the shapes corpus: zero-shot accuracy, search precision, render hue.

Plain numpy over embeddings from clipbeam.models.clip, so the same numbers come
out of the benchmark script (benchmarks/shipped_models_quality.py, which adds
tests/ to its path) and the tests of the shipped models. It lives with the
tests because clipbeam itself never evaluates models.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from clipbeam.models.shapes import COLORS, class_names, class_prompts


@dataclass(frozen=True)
class ZeroShotReport:
    accuracy: float
    color_accuracy: float
    shape_accuracy: float
    confusion: np.ndarray  # [24, 24] counts, rows = true class, columns = predicted class
    precision_at_k: float  # mean over the 24 prompts of the share of the top-k images that are of that class
    k: int


def embed_heldout(clip, images: list, batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings [N, D] through the model's own preprocessing."""
    import torch

    from clipbeam.models.clip import encode_images

    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([clip.preprocess(image) for image in images[start:start + batch_size]])
        out.append(encode_images(clip, pixels))
    return np.concatenate(out)


def zero_shot_report(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, labels: np.ndarray,
                     k: int = 10) -> ZeroShotReport:
    """Top-1 over the 24 prompts, per-attribute accuracies, confusion, and text->image precision@k."""
    labels = np.asarray(labels)
    similarity = image_embeddings @ prompt_embeddings.T  # [N, 24]
    predicted = similarity.argmax(axis=1)
    n_classes = prompt_embeddings.shape[0]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    n_shapes = len(class_names()) // len(COLORS)
    top_k = np.argsort(-similarity.T, axis=1)[:, :k]  # [24, k] image indices per prompt
    precision = float(np.mean([(labels[row] == c).mean() for c, row in enumerate(top_k)]))
    return ZeroShotReport(
        accuracy=float((predicted == labels).mean()),
        color_accuracy=float((predicted // n_shapes == labels // n_shapes).mean()),
        shape_accuracy=float((predicted % n_shapes == labels % n_shapes).mean()),
        confusion=confusion,
        precision_at_k=precision,
        k=k,
    )


def evaluate_clip(clip, per_class: int, seed: int, k: int = 10) -> ZeroShotReport:
    """Zero-shot report of a loaded CLIP on a freshly drawn balanced held-out set."""
    from clipbeam.models.clip import encode_texts
    from clipbeam.models.shapes import heldout_set

    items = heldout_set(per_class, seed)
    images = embed_heldout(clip, [image for image, _ in items])
    labels = np.array([sample.label for _, sample in items])
    return zero_shot_report(images, encode_texts(clip, class_prompts()), labels, k=k)


def hue(rgb) -> float:
    """Hue in [0, 1) of an RGB triple in 0..255."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0]


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def saturated_mean_hue(pixels: np.ndarray, min_saturation: float = 0.25) -> float | None:
    """The circular mean hue of an image's saturated pixels (gray background left out); None if none are."""
    rgb = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0)
    chosen = rgb[(saturation >= min_saturation) & (high >= 0.2)]
    if len(chosen) == 0:
        return None
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in chosen])
    angle = hsv[:, 0] * 2 * np.pi
    weights = hsv[:, 1]
    mean = np.arctan2((np.sin(angle) * weights).sum(), (np.cos(angle) * weights).sum())
    return float((mean / (2 * np.pi)) % 1.0)


def nearest_color(h: float) -> str:
    """The corpus color whose hue is nearest to h."""
    return min(COLORS, key=lambda name: hue_distance(h, hue(COLORS[name])))
