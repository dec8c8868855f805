"""Finding and streaming embedding vectors from Parquet, with stable global ids.

Input is an embed output folder (its manifest.json lists the parts in order)
or any Parquet files with a list / fixed-size-list float column. A vector's
global id is its file's first id plus its row number in the file, with files
in manifest order (or sorted by path), and the file -> id range mapping is
written into index.json: ids never depend on listing order at read time.
Vectors are read in row batches, a row group at a time, so memory stays
bounded by the batch size whatever the size of the input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.errors import FieldError, InputError
from clipbeam.layout.embeddings.schema import DEFAULT_KEEP_COLUMNS, DIM_METADATA_KEY

LOG = logging.getLogger(__name__)
EMBED_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class InputFile:
    """One Parquet file, its row count, the global id of its first row and its row-group sizes.

    `row_groups` lets sampling pick whole row groups from the plan alone (empty: one group of `rows`).
    """

    url: str
    rows: int
    id_start: int
    row_groups: tuple[int, ...] = ()


@dataclass
class EmbeddingsInput:
    """Resolved input: files in id order, vector dimension, the columns to read."""

    url: str
    files: list[InputFile]
    dim: int
    column: str
    id_column: str
    metadata_columns: list[str]
    manifest: dict | None = None
    schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def _is_float_list(kind: pa.DataType) -> bool:
    return ((pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))
            and pa.types.is_floating(kind.value_type))


def list_parquet(url: str, storage_options: dict | None = None) -> tuple[list[str], dict | None]:
    """The Parquet files of an input (embed folder, folder, glob or file) in id order, and the embed manifest."""
    try:
        fs, path = storage.get_fs(url, storage_options)
    except Exception as exc:
        raise InputError(f"cannot open {url}: {exc}") from None
    if storage.has_magic(path):
        return [storage.unstrip(fs, url, p) for p in sorted(fs.glob(path)) if p.endswith(".parquet")], None
    if not fs.exists(path):
        raise InputError(f"embeddings input {url} does not exist")
    if fs.isfile(path):
        return [url], None
    manifest_url = storage.join(url, EMBED_MANIFEST)
    if fs.exists(storage.join(path, EMBED_MANIFEST)):
        manifest = storage.read_json(manifest_url, storage_options)
        parts = manifest.get("parts")
        if not isinstance(parts, list):
            raise InputError(f"{manifest_url} has no list of parts: not an embed output")
        return [storage.join(url, p["path"]) for p in parts if int(p.get("rows", 1)) > 0], manifest
    if fs.exists(storage.join(path, "embeddings")):
        raise InputError(f"{url} has no {EMBED_MANIFEST}: the embed job has not finished (rerun it to complete)")
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    return [storage.unstrip(fs, url, p) for p in files], None


def _footer(file_url: str, storage_options: dict | None) -> pq.FileMetaData:
    """A Parquet file's footer; InputError (one line) when it is missing or not Parquet."""
    try:
        with storage.open_input(file_url, storage_options) as handle:
            return pq.ParquetFile(handle).metadata
    except FileNotFoundError:
        raise InputError(f"embeddings part {file_url} is missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{file_url} is not a readable Parquet file: {exc}") from None


def check_indexed_parts(manifest: dict[str, Any], storage_options: dict | None = None) -> int:
    """Every embeddings part an index.json lists still exists with the rows it had when it was indexed
    (its faiss ids are those rows); the number checked, else InputError naming the first that
    changed."""
    checked = 0
    for source in manifest.get("embeddings") or []:
        for listed in source.get("files") or []:
            rows = int(_footer(listed["url"], storage_options).num_rows)
            if rows != int(listed["rows"]):
                raise FieldError("overwrite", f"embeddings part {listed['url']} has {rows} rows; it had "
                                              f"{listed['rows']} when it was indexed: rebuild the index with {{field}}")
            checked += 1
    return checked


def resolve_embeddings(url: str, column: str = "image_embedding", id_column: str = "id",
                       metadata_columns: list[str] | None = None, storage_options: dict | None = None,
                       first_id: int = 0) -> EmbeddingsInput:
    """Check an input up front (files, columns, dimension, non-empty) and assign global id ranges.

    `metadata_columns=None` keeps DEFAULT_KEEP_COLUMNS where present; named columns must exist.
    """
    urls, manifest = list_parquet(url, storage_options)
    if not urls:
        raise InputError(f"no Parquet files in {url}")
    files: list[InputFile] = []
    schema = None
    dim = int(manifest["dim"]) if manifest and manifest.get("dim") else None
    next_id = first_id
    for file_url in urls:
        meta = _footer(file_url, storage_options)
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = file_schema
            _check_columns(file_url, schema, column, id_column, metadata_columns)
        elif column not in file_schema.names or file_schema.field(column).type != schema.field(column).type:
            raise InputError(f"{file_url}: column {column!r} is missing or has another type than in {urls[0]}")
        if dim is None:
            dim = _dim_from_schema(file_schema, column)
        if meta.num_rows:
            groups = tuple(int(meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
            files.append(InputFile(file_url, int(meta.num_rows), next_id, groups))
            next_id += int(meta.num_rows)
    if not files:
        raise InputError(f"embeddings input {url} is empty: {len(urls)} file(s), 0 rows")
    if dim is None:
        dim = _dim_from_rows(files[0].url, column, storage_options)
    if metadata_columns is None:
        metadata_columns = [c for c in DEFAULT_KEEP_COLUMNS if c in schema.names]
    return EmbeddingsInput(url, files, dim, column, id_column, list(metadata_columns), manifest, schema)


def _check_columns(file_url: str, schema: pa.Schema, column: str, id_column: str,
                   metadata_columns: list[str] | None) -> None:
    if column not in schema.names:
        raise InputError(f"{file_url} has no column {column!r} (columns: {', '.join(schema.names)})")
    if not _is_float_list(schema.field(column).type):
        raise InputError(f"column {column!r} in {file_url} is {schema.field(column).type}, not a list of floats")
    if id_column not in schema.names:
        raise FieldError("id_column", f"{file_url} has no id column {id_column!r} (use {{field}})")
    for name in metadata_columns or []:
        if name not in schema.names:
            raise InputError(f"{file_url} has no column {name!r} to keep")


def _dim_from_schema(schema: pa.Schema, column: str) -> int | None:
    kind = schema.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return int(kind.list_size)
    if schema.metadata and DIM_METADATA_KEY in schema.metadata:
        return int(schema.metadata[DIM_METADATA_KEY])
    return None


def _dim_from_rows(file_url: str, column: str, storage_options: dict | None) -> int:
    with storage.open_input(file_url, storage_options) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024, columns=[column]):
            lengths = pc.list_value_length(batch.column(0)).drop_null()
            if len(lengths):
                return int(lengths[0].as_py())
    raise InputError(f"{file_url}: every {column!r} value is null; cannot tell the dimension")


def to_matrix(values: pa.Array, dim: int, where: str = "", dtype=np.float32) -> np.ndarray:
    """A list / fixed-size-list float column without nulls -> contiguous [n, dim] of `dtype`
    (None: the stored float type, a view of the column's values where they are contiguous)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            raise ValueError(f"{where}row {bad[0]} has {lengths[bad[0]]} values, expected {dim}")
    elif values.type.list_size != dim:
        raise ValueError(f"{where}vectors have {values.type.list_size} values, expected {dim}")
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=dtype)


@dataclass
class VectorBatch:
    """Vectors of one batch with their global ids and metadata rows (rows with null vectors left out)."""

    ids: np.ndarray
    vectors: np.ndarray
    metadata: pa.Table
    skipped: int


@dataclass(frozen=True)
class StoredVectors:
    """One file's whole vector column, read once: [rows with a vector, dim] in its stored float type.

    For builds on one machine whose stored vectors fit the memory budget: the sample and the shards
    take their rows from here instead of decoding the file twice.
    """

    vectors: np.ndarray
    valid: np.ndarray  # per row of the file: has a vector
    position: np.ndarray  # per row of the file: its row in `vectors` (meaningless where not valid)

    def take(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Vectors of local rows that are valid, as `dtype` (None: the stored type)."""
        found = self.vectors[self.position[rows]]
        return found if dtype is None else found.astype(dtype)


def read_vectors(file: InputFile, column: str, dim: int, storage_options: dict | None = None) -> StoredVectors:
    """A file's vector column as one flat array (row groups decoded in parallel by Arrow)."""
    with storage.open_input(file.url, storage_options) as handle:
        values = pq.ParquetFile(handle).read(columns=[column]).column(0).combine_chunks()
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    vectors = to_matrix(values.filter(valid) if values.null_count else values, dim, where=f"{file.url}: ", dtype=None)
    return StoredVectors(vectors, valid, np.cumsum(valid) - 1)


def iter_batches(file: InputFile, column: str, id_column: str | None, metadata_columns: list[str], dim: int,
                 row_start: int = 0, row_end: int | None = None, batch_rows: int = 65_536,
                 storage_options: dict | None = None, exclude: frozenset[str] = frozenset(),
                 stored: StoredVectors | None = None, dtype=np.float32) -> Iterator[VectorBatch]:
    """Stream rows [row_start, row_end) of one file, reading only the row groups that overlap it.

    Metadata holds the id column (renamed `id`, as strings) and `metadata_columns`; none when id_column is None.
    Rows whose id is in `exclude` (e.g. the duplicates a dedup output removes) are left out, like null vectors.
    With `stored` (the file's vectors, read before) the vector column is not read again.
    `dtype` None keeps the stored float type (no float32 copy of every vector).
    """
    row_end = file.rows if row_end is None else row_end
    stored = stored if id_column else None  # some column must be read, for the batches' row counts
    columns = list(dict.fromkeys([*([column] if stored is None else []), *([id_column] if id_column else []),
                                  *metadata_columns]))
    excluded = pa.array(list(exclude), pa.string()) if exclude and id_column else None
    with storage.open_input(file.url, storage_options) as handle:
        parquet = pq.ParquetFile(handle)
        groups, group_first, position = [], None, 0
        for number in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(number).num_rows
            if position < row_end and position + size > row_start:
                groups.append(number)
                group_first = position if group_first is None else group_first
            position += size
        position = group_first or 0
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            lo, hi = max(row_start - position, 0), min(row_end - position, batch.num_rows)
            first = position
            position += batch.num_rows
            if hi <= lo:
                continue
            table = pa.Table.from_batches([batch.slice(lo, hi - lo)])
            ids = np.arange(file.id_start + first + lo, file.id_start + first + hi, dtype=np.int64)
            if stored is None:
                valid = pc.is_valid(table.column(column)).to_numpy(zero_copy_only=False)
            else:
                valid = stored.valid[first + lo:first + hi]
            skipped = int(len(valid) - np.count_nonzero(valid))
            if skipped:
                table, ids = table.filter(pa.array(valid)), ids[valid]
            if excluded is not None:
                kept = pc.invert(pc.is_in(pc.cast(table.column(id_column), pa.string()), value_set=excluded))
                table, ids = table.filter(kept), ids[kept.to_numpy(zero_copy_only=False)]
            if stored is None:
                vectors = to_matrix(table.column(column), dim, where=f"{file.url}: ", dtype=dtype)
            else:
                vectors = stored.take(ids - file.id_start, dtype)
            meta = table.select([c for c in metadata_columns if c != id_column])
            if id_column:
                meta = meta.add_column(0, "id", pc.cast(table.column(id_column), pa.string()))
            yield VectorBatch(ids, vectors, meta, skipped)
            if position >= row_end:
                return


def read_value(url: str, column: str, row: int, storage_options: dict | None = None) -> Any:
    """One cell (`column` at local row `row`) of an embeddings file, decoding only its row group;
    None when the file has no such column. InputError when the file or row is missing."""
    meta = _footer(url, storage_options)
    if column not in meta.schema.names:
        return None
    start = 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if start <= row < start + rows:
            with storage.open_input(url, storage_options) as handle:
                table = pq.ParquetFile(handle).read_row_group(group, columns=[column])
            return table.column(column)[row - start].as_py()
        start += rows
    raise InputError(f"{url} has {start} rows, not row {row}")


def read_rows(file: InputFile, column: str, dim: int, rows: np.ndarray, batch_rows: int = 65_536,
              storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The vectors at local row numbers `rows` (sorted) of one file, and their global ids (null rows dropped).

    Sampling reads through here, so it is column-wise end to end: only the row groups that hold a
    chosen row are decoded, only `column`, a batch at a time; each batch is one flat numpy array in
    its stored type, and only the chosen rows are taken out of it and converted to float32.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    out_ids, out_vectors = [], []
    with storage.open_input(file.url, storage_options) as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if rows[0] < 0 or rows[-1] >= starts[-1]:
            raise InputError(f"{file.url} has {starts[-1]} rows, not rows {rows[0]}..{rows[-1]}")
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups, which = np.unique(group_of, return_inverse=True)
        # each chosen row's position in the stream of the chosen groups' rows, which is what iter_batches yields
        group_offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64)[groups])[:-1]])
        stream = rows - starts[group_of] + group_offsets[which]
        offset = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups.tolist(), columns=[column]):
            lo, hi = np.searchsorted(stream, [offset, offset + batch.num_rows])
            if hi > lo:  # the batch as one flat array in its stored type, the chosen rows taken in numpy
                values = batch.column(0)
                valid = values.is_valid().to_numpy(zero_copy_only=False)
                stored = to_matrix(values.filter(valid) if values.null_count else values, dim,
                                   where=f"{file.url}: ", dtype=None)
                chosen = stream[lo:hi] - offset
                keep = valid[chosen]
                out_ids.append(file.id_start + rows[lo:hi][keep])
                out_vectors.append(stored[(np.cumsum(valid) - 1)[chosen[keep]]].astype(np.float32))
            offset += batch.num_rows
    return np.concatenate(out_vectors), np.concatenate(out_ids)


def part_keys(described: dict[str, Any]) -> set[tuple[str, int]]:
    """(path relative to the input, rows) of each file of a `describe` record: what says two runs read the
    same embeddings parts, even after the folder was copied or moved."""
    root = str(described.get("url", "")).rstrip("/") + "/"
    return {(f["url"][len(root):] if f["url"].startswith(root) else f["url"], int(f["rows"]))
            for f in described.get("files", [])}


def describe(inputs: EmbeddingsInput) -> dict[str, Any]:
    """The input as recorded in index.json: url, files with row counts and first ids, the embed manifest."""
    return {"url": inputs.url, "column": inputs.column,
            "files": [{"url": f.url, "rows": f.rows, "id_start": f.id_start} for f in inputs.files],
            "manifest": inputs.manifest}
