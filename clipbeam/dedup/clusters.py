"""Which clusters a vector is compared in, and the block pairs each cluster is cut into.

SemDeDup's idea: duplicates are close, so they share a k-means cluster, and
exact all-pairs search inside each cluster finds them at a fraction of the
cost of all-pairs search over everything. A vector next to a cluster boundary
can have its duplicate in the neighbouring cluster; with `probe` N it is also
compared with the members of its N-1 next nearest clusters.

A cluster is cut into blocks of about `block_rows` members (the count comes
from the sample's cluster sizes), and the unit of work is a pair of blocks
(or one block and a share of the rows probing the cluster), so no worker
ever holds more than two blocks' worth of one cluster, whatever its size. Block
membership is a hash of the row's global id: deterministic, so a rerun
routes every row to the same units and finds their links cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

QUERY, TARGET, PROBER = 0, 1, 2  # the sides of a unit: its two member blocks, and rows probing the cluster
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
    """Rows `rows` of a batch go to unit `key` (cluster, block a, block b, prober share p) on `side`."""

    key: tuple[int, int, int, int]
    side: int
    rows: np.ndarray


def route(gids: np.ndarray, nearest: np.ndarray, blocks: np.ndarray) -> list[Routed]:
    """The units each row of a batch goes to.

    Unit (c, a, b, 0), a <= b, compares the members of blocks a and b of cluster c (a == b: the block
    with itself). The rows probing cluster c are split into as many shares p as c has blocks, and share
    p meets block x of c in unit (c, x, x, p): every prober meets every member of c once, a unit holds
    one block and one share, and a cluster of one block (the usual case) sends its members nowhere twice.
    """
    h, c0 = _hash(gids), nearest[:, 0]
    own = h % blocks[c0]
    r, x = _expand(blocks[c0])
    parts = [(c0[r], np.minimum(own[r], x), np.maximum(own[r], x), np.zeros(len(r)),
              np.where(own[r] <= x, QUERY, TARGET), r)]
    if nearest.shape[1] > 1:
        r1, p1 = _expand(blocks[c0] - 1)  # the other prober shares meet this row's block in their own units
        parts.append((c0[r1], own[r1], own[r1], p1 + 1, np.full(len(r1), QUERY), r1))
    for j in range(1, nearest.shape[1]):
        cj = nearest[:, j]
        valid = np.flatnonzero((cj >= 0) & (cj != c0))
        r2, x2 = _expand(blocks[cj[valid]])
        rows = valid[r2]
        parts.append((cj[rows], x2, x2, h[rows] % blocks[cj[rows]], np.full(len(rows), PROBER), rows))
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
