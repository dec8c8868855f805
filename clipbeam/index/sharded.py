"""Searching many shards as one index.

`ShardedIndex.open` reads index.json, opens every shard (memory-mapped when
local, through fsspec otherwise), checks each against the manifest (a missing
or altered shard is an error, never silently fewer results; `verify=True` also
checks every file's SHA-256) and re-applies the tuned search parameters.
`search` asks every shard for its top-k and merges them exactly; `lookup`
turns global ids back into rows of the id tables.
"""

from __future__ import annotations

import bisect
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


def search_shards(indexes: list[faiss.Index], queries: np.ndarray, k: int,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's top-k, merged exactly into the global top-k."""
    scores, ids = [], []
    for index in indexes:
        s, i = index.search(queries, k)
        scores.append(s)
        ids.append(i)
    return merge_topk(scores, ids, k, metric)


class ShardedIndex:
    """A clipbeam index folder, searchable as one index."""

    def __init__(self, url: str, manifest: dict[str, Any], shards: list[faiss.Index],
                 storage_options: dict | None = None) -> None:
        self.url = url
        self.manifest = manifest
        self.shards = shards
        self.storage_options = storage_options or {}
        self._starts = [int(s["id_start"]) for s in manifest["shards"]]
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
        return search_shards(self.shards, queries, k, self.metric)

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
        """The id-table rows (id, caption, source, ...) for global faiss ids; None for -1 or unknown ids."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out: list[dict[str, Any] | None] = [None] * len(flat)
        wanted: dict[int, list[tuple[int, int]]] = {}  # shard -> [(position in ids, row in its id table)]
        for position, faiss_id in enumerate(flat):
            shard = bisect.bisect_right(self._starts, int(faiss_id)) - 1
            if faiss_id < 0 or shard < 0:
                continue
            self._ids_table(shard)
            column = self._faiss_ids[shard]
            row = int(np.searchsorted(column, faiss_id))
            if row < len(column) and column[row] == faiss_id:
                wanted.setdefault(shard, []).append((position, row))
        # One take per shard: converting rows one by one costs more than the search (serve's hot path).
        for shard, pairs in wanted.items():
            rows = self._ids_tables[shard].take([row for _, row in pairs]).to_pylist()
            for (position, _), row in zip(pairs, rows, strict=True):
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
