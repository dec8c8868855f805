"""Which FAISS index to build for a collection, and memory budgets.

`choose_factory` is the whole `--index-factory auto` rule, in one function so
that it can be read top to bottom: exact search while it is cheap, a graph
(HNSW) while vectors fit in memory and the collection is small enough to build
one fast, inverted lists (IVF) as it grows, and product quantization (PQ, with
an OPQ rotation when each sub-quantizer would see many dimensions) when full
vectors no longer fit the memory budget. Budgets are written the way autofaiss
writes them ("4GB", "512MB").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from clipbeam.errors import FieldError
from clipbeam.index.errors import IndexInputError

FLAT_MAX_VECTORS = 10_000  # below this, exact search answers in well under a millisecond per query
HNSW_MAX_VECTORS = 100_000  # above this, building an HNSW graph is slower than training IVF and adding
HNSW_M = 32
HNSW_QUANTIZER_MIN_LISTS = 65_536  # with this many lists a flat coarse quantizer dominates query time
MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
PQ_TRAIN_POINTS = 65_536  # 256 centroids x 256 points per PQ sub-quantizer
ID_BYTES = 8

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_memory(text: str | int) -> int:
    """'4GB', '512M', '1.5GiB' or a byte count -> bytes (binary units, like autofaiss)."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = _MEMORY.match(text)
        if not match or match.group(2).upper() not in _UNITS:
            raise IndexInputError(f"cannot read memory size {text!r}: use e.g. 4GB, 512MB or a number of bytes")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise IndexInputError(f"memory size must be positive, not {text!r}")
    return size


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TB"


@dataclass(frozen=True)
class FactoryChoice:
    """A faiss factory string, the memory it is expected to need, and why it was chosen."""

    factory: str
    estimated_bytes: int
    reason: str


def ivf_lists(n: int) -> int:
    """Number of inverted lists: a power of two near 4*sqrt(n), with at least 39 points per list."""
    target = max(1.0, 4 * math.sqrt(n))
    lists = 1 << int(math.floor(math.log2(target)))
    while lists > 1 and lists * MIN_POINTS_PER_LIST > n:
        lists //= 2
    return max(1, min(lists, 1 << 20))


def choose_factory(n: int, dim: int, max_memory: int) -> FactoryChoice:
    """The `auto` rule: the most accurate index that fits `max_memory` and builds fast for `n` vectors."""
    flat = n * (dim * 4 + ID_BYTES)
    if n <= FLAT_MAX_VECTORS and flat <= max_memory:
        return FactoryChoice("Flat", flat, f"{n} vectors <= {FLAT_MAX_VECTORS}: exact search is fast enough")
    hnsw = n * (dim * 4 + HNSW_M * 2 * 4 + ID_BYTES)
    if n <= HNSW_MAX_VECTORS and hnsw <= max_memory:
        return FactoryChoice(f"HNSW{HNSW_M}", hnsw,
                             f"{n} vectors <= {HNSW_MAX_VECTORS} and full vectors plus graph fit "
                             f"{format_bytes(max_memory)}: graph search, no training")
    lists = ivf_lists(n)
    coarse = lists * dim * 4
    quantizer = f"IVF{lists}"
    if lists >= HNSW_QUANTIZER_MIN_LISTS:
        coarse += lists * HNSW_M * 2 * 4
        quantizer += f"_HNSW{HNSW_M}"
    ivf_flat = flat + coarse
    if ivf_flat <= max_memory:
        return FactoryChoice(f"{quantizer},Flat", ivf_flat,
                             f"{n} vectors: inverted lists over full vectors fit {format_bytes(max_memory)}")
    per_vector = (max_memory - coarse) / n - ID_BYTES
    if per_vector < 4:
        need = coarse + n * (4 + ID_BYTES)
        raise FieldError("max_index_memory", f"{{field}} {format_bytes(max_memory)} is too small for {n} vectors of "
                              f"dimension {dim}: the smallest index (PQ4) needs about {format_bytes(need)}")
    m = 1 << int(math.floor(math.log2(min(per_vector, max(4, dim // 2), 256))))
    pq = coarse + n * (m + ID_BYTES)
    if dim <= 4 * m and dim % m == 0:
        return FactoryChoice(f"{quantizer},PQ{m}x8", pq,
                             f"full vectors ({format_bytes(ivf_flat)}) exceed {format_bytes(max_memory)}: "
                             f"{m}-byte product-quantized codes, {dim // m} dimensions per sub-quantizer")
    rotated = min(4 * m, (dim // m) * m)
    why = (f"{dim} is not a multiple of {m}" if dim % m else
           f"each of the {m} sub-quantizers would otherwise see {dim // m} dimensions")
    return FactoryChoice(f"OPQ{m}_{rotated},{quantizer},PQ{m}x8", pq,
                         f"full vectors ({format_bytes(ivf_flat)}) exceed {format_bytes(max_memory)}: "
                         f"{m}-byte codes; an OPQ rotation to {rotated} dimensions first, as {why}")


def default_train_sample(factory: str, n: int) -> int:
    """Training vectors: 64 per inverted list, and enough for PQ's 256-centroid codebooks."""
    want = 0
    match = re.search(r"IVF(\d+)", factory)
    if match:
        want = max(want, 64 * int(match.group(1)))
    if "PQ" in factory or "SQ" in factory or "LSH" in factory:
        want = max(want, PQ_TRAIN_POINTS)
    return min(n, want)
