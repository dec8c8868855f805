"""Which clusters a vector is compared in, and the block pairs each cluster is cut into.

SemDeDup's idea: duplicates are close, so they share a k-means cluster, and
exact all-pairs search inside each cluster finds them at a fraction of the
cost of all-pairs search over everything. A vector next to a cluster boundary
can have its duplicate in the neighbouring cluster; with `probe` N it is also
compared with the members of its N-1 next nearest clusters.

A cluster is cut into blocks of about `block_rows` members (the count comes
from the sample's cluster sizes), and the unit of work is a pair of blocks,
so no worker ever holds more than two blocks of one cluster, whatever its
size. Block membership is a hash of the row's global id: deterministic, so a
rerun routes every row to the same units and finds their links cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

MEMBERS, PROBES = 0, 1   # unit kinds: members x members of one cluster, probers x members
QUERY, TARGET = 0, 1     # the two sides of a unit
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Quantizer:
    """Cluster centroids (and the index's pre-transform, e.g. OPQ, when it has one), picklable."""

    centroids: np.ndarray
    metric: int = faiss.METRIC_INNER_PRODUCT
    transform: bytes | None = None  # a serialised faiss IndexPreTransform whose chain maps vectors first

    @property
    def count(self) -> int:
        return len(self.centroids)

    def assign(self, vectors: np.ndarray, probe: int) -> np.ndarray:
        """[n, min(probe, count)] nearest clusters per vector, nearest first."""
        x = np.ascontiguousarray(vectors, np.float32)
        if self.transform is not None:
            owner = faiss.deserialize_index(np.frombuffer(self.transform, np.uint8))
            chain = faiss.downcast_index(owner)  # `owner` frees the chain: it stays referenced while used
            for i in range(chain.chain.size()):
                x = np.ascontiguousarray(chain.chain.at(i).apply(x), np.float32)
        flat = faiss.IndexFlat(self.centroids.shape[1], self.metric)
        flat.add(self.centroids)
        _, nearest = flat.search(x, min(probe, self.count))
        return nearest


def train_quantizer(sample: np.ndarray, clusters: int, seed: int) -> Quantizer:
    """Spherical k-means on the sample (faiss), `clusters` centroids (at most one per 40 sample rows)."""
    k = max(1, min(clusters, len(sample) // 40 or 1))
    if k == 1:
        centroid = sample.mean(axis=0, keepdims=True)
        return Quantizer((centroid / max(np.linalg.norm(centroid), 1e-12)).astype(np.float32))
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return Quantizer(np.ascontiguousarray(kmeans.centroids, np.float32))


def index_quantizer(index: faiss.Index) -> Quantizer | None:
    """The coarse quantizer of a trained IVF index (with its pre-transform), or None when it has none."""
    layers = [faiss.downcast_index(index)]  # every layer stays referenced: faiss frees sub-indexes with their owner
    while isinstance(layers[-1], (faiss.IndexIDMap, faiss.IndexPreTransform)):
        layers.append(faiss.downcast_index(layers[-1].index))
    pre = next((layer for layer in layers if isinstance(layer, faiss.IndexPreTransform)), None)
    transform = faiss.serialize_index(pre).tobytes() if pre is not None else None
    ivf = faiss.try_extract_index_ivf(layers[-1])
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal).astype(np.float32)
    return Quantizer(centroids, int(ivf.metric_type), transform)


def block_counts(sample_clusters: np.ndarray, count: int, total_rows: int, block_rows: int) -> np.ndarray:
    """Blocks per cluster, from the sample's primary assignments scaled to the input (with 25% headroom)."""
    sizes = np.bincount(sample_clusters, minlength=count) * (total_rows / max(len(sample_clusters), 1))
    return np.maximum(1, np.ceil(sizes * 1.25 / block_rows)).astype(np.int64)


def _hash(gids: np.ndarray) -> np.ndarray:
    return ((gids.astype(np.uint64) * _GOLDEN) >> np.uint64(33)).astype(np.int64)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row r repeated counts[r] times, with x = 0..counts[r]-1 beside each copy."""
    rows = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.arange(len(rows)) - starts


@dataclass(frozen=True)
class Routed:
    """Rows `rows` of a batch go to unit `key` (cluster, kind, a, b) on `side`."""

    key: tuple[int, int, int, int]
    side: int
    rows: np.ndarray


def route(gids: np.ndarray, nearest: np.ndarray, blocks: np.ndarray) -> list[Routed]:
    """The units each row of a batch goes to.

    MEMBERS (c, 0, a, b), a <= b: the members of blocks a and b of cluster c (a == b: one block with itself).
    PROBES (c, 1, p, b): rows whose p-th prober block is c's (queries) against the members of c's block b.
    """
    h, c0 = _hash(gids), nearest[:, 0]
    own = h % blocks[c0]
    parts = []
    r, x = _expand(blocks[c0])
    lo, hi = np.minimum(own[r], x), np.maximum(own[r], x)
    parts.append((c0[r], np.full(len(r), MEMBERS), lo, hi, np.where(own[r] <= x, QUERY, TARGET), r))
    if nearest.shape[1] > 1:
        parts.append((c0[r], np.full(len(r), PROBES), x, own[r], np.full(len(r), TARGET), r))
        for j in range(1, nearest.shape[1]):
            cj = nearest[:, j]
            valid = np.flatnonzero((cj >= 0) & (cj != c0))
            r2, x2 = _expand(blocks[cj[valid]])
            rows = valid[r2]
            parts.append((cj[rows], np.full(len(rows), PROBES), (h[rows] % blocks[cj[rows]]), x2,
                          np.full(len(rows), QUERY), rows))
    cols = [np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(6)]
    order = np.lexsort(cols[4::-1])
    cols = [c[order] for c in cols]
    keys = np.stack(cols[:5], axis=1)
    starts = np.flatnonzero(np.append(True, np.any(keys[1:] != keys[:-1], axis=1)))
    ends = np.append(starts[1:], len(order))
    return [Routed(tuple(int(v) for v in keys[s, :4]), int(keys[s, 4]), cols[5][s:e])
            for s, e in zip(starts, ends, strict=True)]


def default_clusters(rows: int, cluster_size: int) -> int:
    return max(1, math.ceil(rows / cluster_size))
