"""Measuring what a model learned on the shapes corpus: zero-shot accuracy, search precision, render hue.

Plain numpy over embeddings from clipbeam.models.clip, so the same numbers come
out of the benchmark script (benchmarks/shipped_models_quality.py, which adds
tests/ to its path) and the tests of the shipped models. It lives with the
tests because clipbeam itself never evaluates models.
"""

from __future__ import annotations

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
