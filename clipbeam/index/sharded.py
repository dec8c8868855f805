"""Searching many shards as one index.

`ShardedIndex.open` reads index.json, opens every shard (memory-mapped when
local, through fsspec otherwise), checks each against the manifest (a missing
or altered shard is an error, never silently fewer results; `verify=True` also
checks every file's SHA-256) and re-applies the tuned search parameters.
`search` asks every shard for the top-k of a whole query batch (assigning the
batch to inverted lists once when the shards share their quantizer, as
clipbeam's do, and scanning IVF-Flat shards' lists in one faiss call) and
merges them exactly in numpy; `lookup` turns global ids back into rows of the
id tables.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.index.checksum import verify_index
from clipbeam.index.errors import IndexInputError
from clipbeam.index.faiss_io import read_index
from clipbeam.index.manifest import read_manifest
from clipbeam.index.topk import merge_topk


def apply_search_params(indexes: list[faiss.Index], params: str) -> None:
    """Set faiss ParameterSpace parameters ('nprobe=16,efSearch=64') on every shard."""
    if not params:
        return
    space = faiss.ParameterSpace()
    for index in indexes:
        space.set_index_parameters(index, params)


@dataclass(frozen=True)
class SharedCoarse:
    """Shards that are inverted-list indexes over one trained quantizer (and one transform in front).

    Every shard of a clipbeam index starts from the same trained empty index, so a query batch is
    assigned to its lists once and each shard only scans them: searching S shards then costs one
    coarse quantization, not S (with few probes, quantization is most of an IVF search).
    `stacked`, when set, scans every shard's lists in one faiss call (see StackedLists).
    """

    transform: faiss.IndexPreTransform | None
    cores: tuple[faiss.IndexIVF, ...]
    stacked: "StackedLists | None" = None


class StackedLists:
    """Every shard's inverted lists behind one IVF-Flat index, without copying them.

    List j of shard s is list s * nlist + j of a faiss VStackInvertedLists, so a query assigned to
    list j probes j, nlist + j, ... in one search_preassigned call: one parallel region and faiss's
    own top-k heap for the whole batch, instead of one scan per shard and a merge in numpy. Only for
    IVF-Flat, whose scanner needs nothing of a list but its codes (residual and precomputed-table
    scanners look the list number up in the quantizer). Shards hold global ids, so none are mapped.
    """

    def __init__(self, cores: tuple[faiss.IndexIVF, ...]) -> None:
        first = cores[0]
        self._pointers = faiss.InvertedListsPtrVector()  # kept: the stack and the index only borrow them
        for core in cores:
            self._pointers.push_back(core.invlists)
        self._lists = faiss.VStackInvertedLists(self._pointers.size(), self._pointers.data())
        self.index = faiss.IndexIVFFlat(first.quantizer, first.d, self._lists.nlist, first.metric_type)
        self.index.replace_invlists(self._lists, False)
        self.index.ntotal = sum(core.ntotal for core in cores)
        self.index.is_trained = True
        self.index.parallel_mode = first.parallel_mode
        self._offsets = np.arange(len(cores), dtype=np.int64) * first.nlist
        self._cores = cores  # the quantizer and the lists belong to them

    @staticmethod
    def fits(cores: tuple[faiss.IndexIVF, ...]) -> bool:
        return all(type(faiss.downcast_index(core)) is faiss.IndexIVFFlat for core in cores)

    def search(self, x: np.ndarray, k: int, assigned: np.ndarray, assigned_scores: np.ndarray):
        """Top-k of every shard at once, from one coarse assignment [n, nprobe]."""
        keys = np.where(assigned[:, :, None] < 0, -1, assigned[:, :, None] + self._offsets)
        keys = keys.reshape(len(x), -1)
        self.index.nprobe = keys.shape[1]
        scores = np.repeat(assigned_scores, len(self._offsets), axis=1)
        return self.index.search_preassigned(x, k, keys, scores)


def _ivf_core(index: faiss.Index) -> tuple[faiss.IndexPreTransform | None, faiss.IndexIVF | None]:
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    return (outer if inner is not outer else None), (inner if isinstance(inner, faiss.IndexIVF) else None)


def _fingerprint(index: faiss.Index) -> list[np.ndarray] | None:
    """What an IVF shard's coarse assignment depends on: its transforms' matrices and its centroids."""
    pre, core = _ivf_core(index)
    if core is None:
        return None
    arrays = []
    for i in range(pre.chain.size() if pre is not None else 0):
        step = faiss.downcast_VectorTransform(pre.chain.at(i))
        if not isinstance(step, faiss.LinearTransform):
            return None
        arrays += [faiss.vector_to_array(step.A), faiss.vector_to_array(step.b)]
    try:
        return [*arrays, core.quantizer.reconstruct_n(0, core.quantizer.ntotal)]
    except RuntimeError:  # a quantizer that cannot give its centroids back: the shards search on their own
        return None


def shared_coarse(indexes: list[faiss.Index]) -> SharedCoarse | None:
    """The shards' common quantizer, checked to be the same in every shard; None when they have none."""
    first = _fingerprint(indexes[0]) if indexes else None
    if first is None:
        return None
    for index in indexes[1:]:
        other = _fingerprint(index)
        if other is None or len(other) != len(first) or not all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other, strict=True)):
            return None
    cores = tuple(_ivf_core(index)[1] for index in indexes)
    return SharedCoarse(_ivf_core(indexes[0])[0], cores, StackedLists(cores) if StackedLists.fits(cores) else None)


def _transformed(pre: faiss.IndexPreTransform | None, x: np.ndarray) -> np.ndarray:
    for i in range(pre.chain.size() if pre is not None else 0):
        x = pre.chain.at(i).apply(x)
    return x


def search_shards(indexes: list[faiss.Index], queries: np.ndarray, k: int, metric: str,
                  coarse: SharedCoarse | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's top-k for the whole batch, merged exactly into the global top-k.

    With `coarse` (see shared_coarse) the batch is assigned to inverted lists once for all shards;
    the result is the same as each shard's own search.
    """
    nprobe = {core.nprobe for core in coarse.cores} if coarse is not None else set()
    if len(nprobe) != 1 or next(iter(nprobe)) > coarse.cores[0].nlist:  # else each shard's search clamps it
        return _merged([index.search(queries, k) for index in indexes], k, metric)
    slices = _slices(len(queries), faiss.omp_get_max_threads())
    if len(slices) == 1:
        return _search_assigned(coarse, queries, k, metric, next(iter(nprobe)))
    found = list(_pool(len(slices)).map(
        lambda rows: _search_assigned(coarse, queries[rows], k, metric, next(iter(nprobe))), slices))
    return np.concatenate([s for s, _ in found]), np.concatenate([i for _, i in found])


MIN_SLICE_ROWS = 16  # queries per thread below which one thread does the whole batch
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process, threads): a forked child starts its own


def _slices(rows: int, threads: int) -> list[slice]:
    """The batch cut into one slice per thread, as faiss's own IVF search cuts it."""
    count = max(1, min(threads, rows // MIN_SLICE_ROWS))
    bounds = np.linspace(0, rows, count + 1).astype(int)
    return [slice(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads that each run faiss (and its BLAS) on one thread: the coarse quantizer's matrix product
    called outside a parallel region, on all threads, cost as much as the scan it prepares."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="clipbeam-search",
                                         initializer=faiss.omp_set_num_threads, initargs=(1,))
    return _POOLS[key]


def _search_assigned(coarse: SharedCoarse, queries: np.ndarray, k: int, metric: str,
                     nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """One coarse assignment of `queries`, then every shard's lists scanned."""
    x = _transformed(coarse.transform, queries)
    assigned_scores, assigned = coarse.cores[0].quantizer.search(x, nprobe)
    if coarse.stacked is not None:
        return _search_stacked(coarse, x, k, metric, assigned, assigned_scores)
    return _merged([core.search_preassigned(x, k, assigned, assigned_scores) for core in coarse.cores], k, metric)


def _merged(found: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    return merge_topk([scores for scores, _ in found], [ids for _, ids in found], k, metric)


def _search_stacked(coarse: SharedCoarse, x: np.ndarray, k: int, metric: str, assigned: np.ndarray,
                    assigned_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scan of all shards; rows whose k-th and (k+1)-th scores tie are redone shard by shard.

    faiss's heap settles equal scores by the order it meets them, merge_topk by the smaller id; a
    row whose (k+1)-th result scores below its k-th holds every candidate for the k-th place, so
    merge_topk orders it exactly. The others (duplicates at the cut) take the per-shard path.
    """
    scores, ids = coarse.stacked.search(x, k + 1, assigned, assigned_scores)
    top_scores, top_ids = merge_topk([scores], [ids], k, metric)
    tied = np.flatnonzero((ids[:, k] >= 0) & (scores[:, k - 1] == scores[:, k]))
    if len(tied):
        redo = [core.search_preassigned(x[tied], k, assigned[tied], assigned_scores[tied]) for core in coarse.cores]
        top_scores[tied], top_ids[tied] = _merged(redo, k, metric)
    return top_scores, top_ids


class ShardedIndex:
    """A clipbeam index folder, searchable as one index."""

    def __init__(self, url: str, manifest: dict[str, Any], shards: list[faiss.Index],
                 storage_options: dict | None = None) -> None:
        self.url = url
        self.manifest = manifest
        self.shards = shards
        self.storage_options = storage_options or {}
        self._starts = np.array([int(s["id_start"]) for s in manifest["shards"]], dtype=np.int64)
        self._coarse = shared_coarse(shards)
        self._ids_tables: dict[int, Any] = {}
        self._faiss_ids: dict[int, np.ndarray] = {}
        self.search_params = ""
        self.set_search_params(manifest.get("search_params", ""))

    @classmethod
    def open(cls, path_or_url: str, storage_options: dict | None = None, mmap: bool = True,
             verify: bool = False) -> "ShardedIndex":
        """Open an index folder (local path or any fsspec URL) with its tuned search parameters applied.

        Sizes and vector counts are always checked; `verify=True` also reads every file once to check
        the SHA-256 that index.json records (same-size corruption), at the cost of reading the whole index.
        """
        manifest = read_manifest(path_or_url, storage_options)
        if verify:
            verify_index(path_or_url, manifest, storage_options)
        shards = []
        for entry in manifest["shards"]:
            ids_url = storage.join(path_or_url, entry["ids"])
            if not storage.exists(ids_url, storage_options):
                raise IndexInputError(f"id table {ids_url} is missing")
            index = read_index(storage.join(path_or_url, entry["index"]), storage_options, mmap=mmap,
                               expected_bytes=entry.get("bytes"))
            if index.d != manifest["dim"] or index.ntotal != entry["ntotal"]:
                raise IndexInputError(f"shard {entry['index']} holds {index.ntotal} vectors of dimension {index.d}; "
                                      f"index.json says {entry['ntotal']} of dimension {manifest['dim']}")
            shards.append(index)
        return cls(path_or_url, manifest, shards, storage_options)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def set_search_params(self, params: str) -> None:
        """Override the stored parameters, e.g. 'nprobe=64' for more recall at lower speed."""
        try:
            apply_search_params(self.shards, params)
        except RuntimeError as exc:
            raise IndexInputError(f"cannot apply search parameters {params!r}: {str(exc).strip()}") from None
        self.search_params = params

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, global ids) for each query row; scores are inner products or squared L2 distances."""
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexInputError(f"queries have shape {tuple(queries.shape)}; this index needs [n, {self.dim}]")
        if k < 1:
            raise IndexInputError(f"k must be at least 1, not {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return search_shards(self.shards, queries, k, self.metric, self._coarse)

    def _ids_table(self, shard: int):
        table = self._ids_tables.get(shard)
        if table is None:
            entry = self.manifest["shards"][shard]
            url = storage.join(self.url, entry["ids"])
            try:
                with storage.open_input(url, self.storage_options) as handle:
                    table = large_strings(pq.read_table(handle))
            except FileNotFoundError:
                raise IndexInputError(f"id table {url} is missing") from None
            self._ids_tables[shard] = table
            self._faiss_ids[shard] = table.column("faiss_id").to_numpy()
        return table

    def lookup(self, ids) -> list[dict[str, Any] | None]:
        """The id-table rows (id, caption, source, ...) for global faiss ids; None for -1 or unknown ids.

        Vectorised: ids find their shard and row with searchsorted, and each shard's rows come out of
        its id table in one take (serve looks up a whole batch of results at once).
        """
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out: list[dict[str, Any] | None] = [None] * len(flat)
        shard_of = np.searchsorted(self._starts, flat, side="right") - 1
        shard_of[flat < 0] = -1
        for shard in np.unique(shard_of[shard_of >= 0]).tolist():
            self._ids_table(shard)
            column = self._faiss_ids[shard]
            if not len(column):
                continue
            positions = np.flatnonzero(shard_of == shard)
            rows = np.minimum(np.searchsorted(column, flat[positions]), len(column) - 1)
            found = column[rows] == flat[positions]
            taken = self._ids_tables[shard].take(rows[found]).to_pylist()
            for position, row in zip(positions[found].tolist(), taken, strict=True):
                out[position] = row
        return out


def large_strings(table: pa.Table) -> pa.Table:
    """String and binary columns as their large (64-bit offset) types: a take() of rows whose text adds
    up past 2 GB (one long caption asked for many times) overflows 32-bit offsets."""
    def widen(kind: pa.DataType) -> pa.DataType:
        if pa.types.is_string(kind):
            return pa.large_string()
        return pa.large_binary() if pa.types.is_binary(kind) else kind

    return table.cast(pa.schema([f.with_type(widen(f.type)) for f in table.schema], metadata=table.schema.metadata))
