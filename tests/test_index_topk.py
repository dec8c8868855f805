"""Ground truth for tuning: ExactTopK over batches equals faiss' exact search over all the vectors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipbeam.index import topk


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_topk_over_batches_and_blocks_equals_faiss_knn(metric, monkeypatch):
    monkeypatch.setattr(topk, "BLOCK_ROWS", 37)  # many blocks per batch, and a last block shorter than k
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    ids = np.arange(1000, 1500)
    exact = topk.ExactTopK(queries, 11, metric)
    for start, stop in ((0, 3), (3, 200), (200, 500)):  # a batch smaller than k, then two uneven ones
        exact.add(vectors[start:stop], ids[start:stop])
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    scores, local = faiss.knn(queries, vectors, 11, metric=faiss_metric)
    assert np.array_equal(exact.ids, ids[local])
    assert np.allclose(exact.scores, scores, rtol=1e-4, atol=1e-4)
