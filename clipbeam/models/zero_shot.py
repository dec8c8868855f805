"""Zero-shot classification math, as in the CLIP paper (no Beam, no I/O).

Each label's prompt templates are encoded with the model the image embeddings
came from, averaged and renormalised (prompt ensembling); an image's class
probabilities are the softmax of 100 x cosine similarity, 100 being CLIP's
learned logit scale at the end of training. Kept apart from the Beam job so a
notebook can label vectors it already holds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clipbeam.models.clip import LoadedClip, encode_texts

DEFAULT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0


def label_embeddings(clip: LoadedClip, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One unit vector per label: the mean of its templates' text embeddings, renormalised."""
    out = []
    for label in labels:
        mean = encode_texts(clip, [t.format(label) for t in templates]).mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out).astype(np.float32)


def zero_shot(vectors: np.ndarray, classes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top label indices [n, k], their probabilities [n, k]) from softmax(100 x cosine).

    The max logit is subtracted before exp so that the softmax cannot overflow;
    ties keep the label order (stable sort), so reruns give the same labels.
    """
    logits = LOGIT_SCALE * vectors @ classes.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return top, np.take_along_axis(probs, top, axis=1)
