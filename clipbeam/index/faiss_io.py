"""Creating, training, writing and reading FAISS indexes through fsspec.

Every shard starts as a copy of one trained empty index and receives vectors
with global ids, so shards can be searched together and merged (or combined
with faiss's merge_into). Index types that cannot take ids themselves (Flat,
HNSW, PQ) are wrapped in IndexIDMap. Files are plain `faiss.write_index`
output, streamed through fsspec (any URL) and memory-mapped when local; their
SHA-256 is computed while they are written, for index.json (see checksum.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from clipbeam import storage
from clipbeam.index.errors import IndexInputError

LOG = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def faiss_metric(metric: str) -> int:
    try:
        return METRICS[metric]
    except KeyError:
        raise IndexInputError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}") from None


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """An empty index for a factory string; raises IndexInputError for one faiss cannot build."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss_metric(metric))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise IndexInputError(f"unknown or invalid index factory {factory!r} for dimension {dim}: {detail}") from None
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)
    return index


def train_index(index: faiss.Index, vectors: np.ndarray, use_gpu: bool | None = None) -> dict:
    """Train in place; k-means of the inverted lists runs on all GPUs when faiss-gpu sees any."""
    start = time.monotonic()
    device = "cpu"
    if index.is_trained:
        return {"samples": 0, "seconds": 0.0, "device": device}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    ivf = faiss.try_extract_index_ivf(index)
    if (use_gpu if use_gpu is not None else gpus > 0) and gpus > 0 and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        device = f"cuda x{gpus}"
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    if ivf is not None:
        ivf.clustering_index = None
    seconds = time.monotonic() - start
    LOG.info("trained on %d vectors in %.1fs (%s)", len(vectors), seconds, device)
    return {"samples": int(len(vectors)), "seconds": round(seconds, 3), "device": device}


@dataclass(frozen=True)
class WrittenFile:
    """What index.json records of a file just written: its size and SHA-256."""

    bytes: int
    sha256: str


def write_index(index: faiss.Index, url: str, storage_options: dict | None = None) -> WrittenFile:
    """Write `index` atomically to `url`, streamed (no second copy in memory) and hashed on the way."""
    written = 0
    digest = hashlib.sha256()

    with storage.atomic_open(url, "wb", storage_options) as handle:
        def sink(data: bytes) -> None:
            nonlocal written
            handle.write(data)
            digest.update(data)
            written += len(data)

        writer = faiss.PyCallbackIOWriter(sink)
        faiss.write_index(index, writer)
        del writer
    return WrittenFile(written, digest.hexdigest())


def read_index(url: str, storage_options: dict | None = None, mmap: bool = True,
               expected_bytes: int | None = None) -> faiss.Index:
    """Read an index file: memory-mapped when local, streamed through fsspec otherwise.

    A missing, truncated or corrupt file raises IndexInputError (never fewer results).
    """
    fs, path = storage.get_fs(url, storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise IndexInputError(f"index file {url} is missing") from None
    if expected_bytes is not None and size != expected_bytes:
        raise IndexInputError(f"index file {url} is corrupt: {size} bytes, index.json says {expected_bytes}")
    local = storage.local_path(url)
    try:
        if local is not None:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            return faiss.read_index(local, flags)
        with fs.open(path, "rb") as handle:
            reader = faiss.PyCallbackIOReader(handle.read)
            index = faiss.read_index(reader)
            del reader
            return index
    except Exception as exc:  # faiss raises RuntimeError with a C++ trace for unreadable data
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else exc.__class__.__name__
        raise IndexInputError(f"index file {url} is corrupt or unreadable: {detail}") from None


def core_index(index: faiss.Index) -> faiss.Index:
    """The index under IDMap and pre-transform (OPQ) wrappers, downcast to its real type."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index
