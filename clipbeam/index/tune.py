"""Tuning search parameters to a recall target, measured against exact search.

The parameters that trade speed for recall (nprobe for inverted lists,
efSearch for HNSW graphs, quantizer_efSearch for HNSW coarse quantizers) are
tried cheapest first on held-out queries; the first setting whose recall@10
reaches the target wins. When recall stops improving before the target (PQ
codes cap it), the best setting is kept and the manifest says the target was
not reached. Queries are database vectors, so each query's own id is left out
of both the found and the true neighbours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from clipbeam.index.faiss_io import core_index
from clipbeam.index.sharded import apply_search_params, search_shards, shared_coarse
from clipbeam.index.topk import drop_self, recall_at_k

LOG = logging.getLogger(__name__)
PLATEAU = 0.002  # recall gained over two doublings below which more probing is not worth it


@dataclass
class TuneResult:
    params: str
    recall: float
    queries_per_second: float
    target_reached: bool
    curve: list[dict] = field(default_factory=list)


def parameter_ladder(index: faiss.Index, k: int) -> list[str]:
    """Candidate settings for this index type, cheapest first ([''] when nothing is tunable)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        hnsw_quantizer = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        ladder, nprobe = [], 1
        while True:
            nprobe = min(nprobe, ivf.nlist)
            params = f"nprobe={nprobe}"
            if hnsw_quantizer:
                params += f",quantizer_efSearch={max(2 * nprobe, 16)}"
            ladder.append(params)
            if nprobe >= ivf.nlist:
                return ladder
            nprobe *= 2
    if isinstance(core_index(index), faiss.IndexHNSW):
        ef, ladder = 16, []
        while ef <= 4096:
            if ef >= k:
                ladder.append(f"efSearch={ef}")
            ef *= 2
        return ladder
    return [""]


def tune(indexes: list[faiss.Index], metric: str, queries: np.ndarray, query_ids: np.ndarray,
         truth_ids: np.ndarray, k: int, target: float) -> TuneResult:
    """Walk the ladder until recall@k on `queries` reaches `target` (truth_ids: exact top k+1, self included)."""
    truth = drop_self(truth_ids, query_ids, k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    curve: list[dict] = []
    coarse = shared_coarse(indexes)
    for params in parameter_ladder(indexes[0], k):
        apply_search_params(indexes, params)
        start = time.perf_counter()
        _, found = search_shards(indexes, queries, k + 1, metric, coarse)
        seconds = max(time.perf_counter() - start, 1e-9)
        recall = recall_at_k(drop_self(found, query_ids, k), truth, k)
        curve.append({"params": params, "recall": round(recall, 4),
                      "queries_per_second": round(len(queries) / seconds, 1)})
        LOG.info("%s: recall@%d %.4f, %.0f queries/s", params or "(no parameters)", k, recall, len(queries) / seconds)
        if recall >= target:
            break
        if len(curve) >= 3 and recall - curve[-3]["recall"] < PLATEAU:
            break
    reached = curve[-1]["recall"] >= target
    if reached:
        best = curve[-1]
    else:
        top = max(point["recall"] for point in curve)
        best = next(point for point in curve if point["recall"] >= top - PLATEAU / 2)
    apply_search_params(indexes, best["params"])
    return TuneResult(best["params"], best["recall"], best["queries_per_second"], reached, curve)
