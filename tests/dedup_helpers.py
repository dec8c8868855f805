"""Synthetic vectors with planted near-duplicates, the exact all-pairs answer, and readers of a dedup output."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
from synthetic_embeddings import clustered


def planted(n: int, dim: int, copies: int, noise: tuple[float, ...] = (0.01, 0.03, 0.06), seed: int = 0
            ) -> np.ndarray:
    """`n` clustered vectors, then `copies` near-duplicates of random ones at known noise levels (normalised)."""
    rng = np.random.default_rng(seed)
    base = clustered(n, dim, clusters=12, spread=0.6, seed=seed)
    sources = rng.choice(n, copies, replace=False)
    scale = np.array([noise[i % len(noise)] for i in range(copies)], np.float32)[:, None]
    dups = base[sources] + scale * rng.standard_normal((copies, dim)).astype(np.float32)
    vectors = np.concatenate([base, dups / np.linalg.norm(dups, axis=1, keepdims=True)])
    return vectors[rng.permutation(len(vectors))].astype(np.float32)


def exact_groups(vectors: np.ndarray, ids: list[str], threshold: float) -> set[frozenset[str]]:
    """Connected components (size >= 2) of all pairs at cosine >= threshold, by brute force and union-find."""
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sims = vectors @ vectors.T
    for i, j in zip(*np.nonzero(np.triu(sims >= threshold, k=1)), strict=True):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, set[str]] = {}
    for i, name in enumerate(ids):
        groups.setdefault(find(i), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def read_groups(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "groups", "part-*.parquet"))):
        rows += pq.read_table(path).to_pylist()
    return rows


def groups_at(rows: list[dict], threshold: float) -> set[frozenset[str]]:
    found: dict[int, set[str]] = {}
    for row in rows:
        if abs(row["threshold"] - threshold) < 1e-6:
            found.setdefault(row["group"], set()).add(row["id"])
    return {frozenset(g) for g in found.values()}


def pairs(groups: set[frozenset[str]]) -> set[tuple[str, str]]:
    return {(a, b) for g in groups for a in g for b in g if a < b}


def pair_recall(found: set[frozenset[str]], truth: set[frozenset[str]]) -> float:
    want = pairs(truth)
    return len(want & pairs(found)) / len(want) if want else 1.0


def manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as handle:
        return json.load(handle)
