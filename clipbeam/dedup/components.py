"""Connected components of duplicate links, mergeable from partial results in any order.

Every worker reduces the links it found to a star forest (each node points at
the smallest node of its component), so what travels and what is merged is
bounded by the nodes that have a duplicate, not by the pairs: a logo copied
10,000 times is 10,000 edges, not 50 million. Merging two forests and
reducing again gives the components of the union of their links, which is
why a group spanning several parts, clusters or workers comes out whole.
"""

from __future__ import annotations

import numpy as np


def star_forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The components of the graph with edges (a[i], b[i]): (nodes sorted, the smallest node of each one's component).

    Label propagation with pointer jumping, vectorised: labels only decrease and
    always name a node of the same component, so at the fixed point every
    component carries its smallest node.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if len(a) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[ia], label[ib])
        before = label.copy()
        np.minimum.at(label, ia, low)
        np.minimum.at(label, ib, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return nodes, nodes[label]


def merge_forests(forests: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One star forest from several (each a set of edges node -> root)."""
    forests = [f for f in forests if len(f[0])]
    if not forests:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(forests) == 1:
        return forests[0]
    return star_forest(np.concatenate([f[0] for f in forests]), np.concatenate([f[1] for f in forests]))


class Forests:
    """Star forests per threshold: the accumulator of the components step (picklable, mergeable)."""

    def __init__(self, thresholds: tuple[float, ...]) -> None:
        self.thresholds = thresholds
        self.pending: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {t: [] for t in thresholds}
        self.size = 0

    def add(self, forests: dict[float, tuple[np.ndarray, np.ndarray]]) -> "Forests":
        for t, forest in forests.items():
            self.pending[t].append(forest)
            self.size += len(forest[0])
        if self.size > 1_000_000:  # reduce now and then, so the pending list stays near the node count
            self.reduce()
        return self

    def merge(self, other: "Forests") -> "Forests":
        for t in self.thresholds:
            self.pending[t].extend(other.pending[t])
        self.size += other.size
        return self

    def reduce(self) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        result = {t: merge_forests(self.pending[t]) for t in self.thresholds}
        self.pending = {t: [f] for t, f in result.items()}
        self.size = sum(len(f[0]) for f in result.values())
        return result
