"""Synthetic embeddings in the embed job's output format, for index, classify and export tests.

Clustered vectors (uniform random ones have no neighbour structure, so recall
measured on them means nothing), L2-normalised, written as
OUT/manifest.json + OUT/embeddings/part-NNNNN.parquet exactly as the
embeddings contract says, or as plain Parquet with a fixed_size_list column.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered(n: int, dim: int, clusters: int = 20, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """n L2-normalised vectors around `clusters` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _list_array(vectors: np.ndarray | None, n: int, dim: int, dtype, mask=None) -> pa.Array:
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    if vectors is None:
        return pa.nulls(n, pa.list_(value_type))
    values = pa.array(vectors.astype(dtype).ravel(), value_type)
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    arr = pa.ListArray.from_arrays(offsets, values)
    if mask is not None:
        arr = pa.ListArray.from_arrays(offsets, values, mask=pa.array(mask))
    return arr


def write_embed_output(out: str, vectors: np.ndarray, parts: int = 3, dtype=np.float16, model: str = "clipbeam-tiny",
                       pretrained: str = "none", seed: int = 0, text: np.ndarray | None = None,
                       captions: list | None = None, prefix: str = "s") -> list[str]:
    """OUT/manifest.json + OUT/embeddings/part-NNNNN.parquet (rows split evenly); returns the ids."""
    n, dim = vectors.shape
    os.makedirs(os.path.join(out, "embeddings"), exist_ok=True)
    ids = [f"{prefix}{i // 1000:05d}-{i:06d}" for i in range(n)]
    captions = captions if captions is not None else [f"caption {i}" for i in range(n)]
    bounds = np.linspace(0, n, parts + 1).astype(int)
    entries = []
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        source = f"{out}/shards/{p:05d}.tar"
        text_mask = None if text is None else np.array([captions[i] is None for i in range(lo, hi)])
        table = pa.table({
            "id": pa.array(ids[lo:hi], pa.string()),
            "source": pa.array([source] * (hi - lo), pa.string()),
            "caption": pa.array(captions[lo:hi], pa.string()),
            "image_embedding": _list_array(vectors[lo:hi], hi - lo, dim, dtype),
            "text_embedding": _list_array(None if text is None else text[lo:hi], hi - lo, dim, dtype, text_mask),
            "width": pa.array(np.full(hi - lo, 64, np.int32)),
            "height": pa.array(np.full(hi - lo, 48, np.int32)),
            "sha256": pa.array([f"{i:064x}" for i in range(lo, hi)], pa.string()),
            "label": pa.array([f"l{i % 7}" for i in range(lo, hi)], pa.string()),
        }).replace_schema_metadata({b"clipbeam.dim": str(dim).encode()})
        path = f"embeddings/part-{p:05d}.parquet"
        pq.write_table(table, os.path.join(out, path), row_group_size=max(1, (hi - lo) // 2))
        entries.append({"path": path, "rows": int(hi - lo), "failures": 0, "source": source})
    manifest = {"model": model, "pretrained": pretrained, "seed": seed, "weights": f"random(seed={seed})",
                "dim": dim, "dtype": "float16" if dtype == np.float16 else "float32", "precision": "fp32",
                "parts": entries, "clipbeam_version": "0.1.0"}
    with open(os.path.join(out, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    return ids


def write_plain_parquet(folder: str, vectors: np.ndarray, files: int = 2, column: str = "embedding",
                        id_column: str = "key") -> list[str]:
    """Plain Parquet files with a fixed_size_list<float32> column and an integer id column."""
    n, dim = vectors.shape
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        values = pa.array(vectors[lo:hi].ravel(), pa.float32())
        table = pa.table({id_column: pa.array(np.arange(lo, hi, dtype=np.int64)),
                          column: pa.FixedSizeListArray.from_arrays(values, dim),
                          "source": pa.array([f"file{f}"] * (hi - lo))})
        pq.write_table(table, os.path.join(folder, f"data-{f:03d}.parquet"))
    return [str(i) for i in range(n)]


@contextlib.contextmanager
def unreadable_pages(path: str):
    """Garble a Parquet file's first data page while the block lasts (its footer still reads).

    Up-front checks (schema, row counts) pass, and the failure comes from
    inside the pipeline, where reading the rows fails: a worker failure.
    """
    with open(path, "rb") as handle:
        original = handle.read()
    garbled = bytearray(original)
    garbled[4:104] = b"\xff" * 100
    with open(path, "wb") as handle:
        handle.write(bytes(garbled))
    try:
        yield
    finally:
        with open(path, "wb") as handle:
            handle.write(original)
