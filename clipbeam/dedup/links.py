"""Exact cosine links inside one block pair of a cluster, in bounded memory.

Vectors are L2-normalised, so a dot product is the cosine. Queries are taken
`chunk_rows` at a time against all targets (a block holds at most a few
thousand rows), so the similarity matrix in memory is chunk_rows x block rows
whatever the size of the cluster. Each chunk's links are reduced to a star
forest per threshold at once (components.py), and the nearest-neighbour
similarity of every row seen is kept for the histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipbeam.dedup.components import merge_forests, star_forest

CHUNK_ROWS = 1024
SAME_CHUNK_ROWS = 256  # a block with itself: small chunks, so the triangle skips more


@dataclass
class BlockLinks:
    """What one block pair found: a star forest per threshold, and each row's best similarity there."""

    forests: dict[float, tuple[np.ndarray, np.ndarray]]
    nn_ids: np.ndarray
    nn_max: np.ndarray


def block_links(q_ids: np.ndarray, queries: np.ndarray, t_ids: np.ndarray, targets: np.ndarray,
                thresholds: tuple[float, ...], same: bool, chunk_rows: int = CHUNK_ROWS) -> BlockLinks:
    """Links of every query to every target at or above each threshold.

    `same`: queries and targets are one block, so only pairs i < j count and a row is not its own neighbour;
    a chunk of rows [start, stop) then meets targets [start, ...) only (the upper triangle, in smaller
    chunks: about 60% of the square's multiply-adds).
    """
    low = min(thresholds)
    pieces: dict[float, list] = {t: [] for t in thresholds}
    q_best = np.full(len(q_ids), -np.inf, np.float32)
    t_best = np.full(len(t_ids), -np.inf, np.float32)
    step = SAME_CHUNK_ROWS if same else chunk_rows
    for start in range(0, len(q_ids), step):
        stop = min(start + step, len(q_ids))
        first = start if same else 0  # targets before `first` meet this chunk nowhere
        sims = queries[start:stop] @ targets[first:].T
        if same:  # only the upper triangle: j > i
            sims[np.arange(first, len(t_ids))[None, :] <= np.arange(start, stop)[:, None]] = -np.inf
        if not sims.size:
            continue
        row_best = sims.max(axis=1)
        q_best[start:stop] = np.maximum(q_best[start:stop], row_best)
        t_best[first:] = np.maximum(t_best[first:], sims.max(axis=0))
        linked = np.flatnonzero(row_best >= low)  # most rows have no duplicate: search only the others
        qi, ti = np.nonzero(sims[linked] >= low)
        if len(qi):
            qi = linked[qi]
            values = sims[qi, ti]
            for t in thresholds:
                keep = values >= t
                if keep.any():
                    pieces[t].append(star_forest(q_ids[start + qi[keep]], t_ids[first + ti[keep]]))
    forests = {t: merge_forests(pieces[t]) for t in thresholds}
    ids = np.concatenate([q_ids, t_ids]) if not same else q_ids
    best = np.concatenate([q_best, t_best]) if not same else np.maximum(q_best, t_best)
    seen = np.isfinite(best)
    return BlockLinks(forests, ids[seen].astype(np.int64), best[seen])


def best_per_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest value per id (ids sorted, unique)."""
    if len(ids) == 0:
        return ids.astype(np.int64), values.astype(np.float32)
    order = np.lexsort((values, ids))
    ids, values = ids[order], values[order]
    last = np.append(ids[1:] != ids[:-1], True)
    return ids[last], values[last]
