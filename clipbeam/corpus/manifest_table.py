"""Reading manifest tables (Parquet, CSV, JSONL) and choosing their columns.

A part of a manifest is rows [start, stop), and it reads only those: Parquet
parts decode their row groups in small batches through a buffered reader (a
100-row part of a 20k-row, one-row-group file no longer holds the group), and
CSV/JSONL parts read just their own byte range, found when the run is
planned (text_rows.py). A part's memory follows its own size, not the file's.

Planning inspects each manifest once (`inspect_manifest`): Parquet from its
footer; a text manifest is scanned for its parts' offsets and every part is
parsed exactly as its reader will parse it, so a malformed row anywhere stops
the run before it starts, and the schema covers every row (JSON lines may
add fields as they go).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from clipbeam.corpus import text_rows
from clipbeam.errors import FieldError, UsageError
from clipbeam.storage import get_fs

IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file", "url", "image_url", "jpg")
CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title", "prompt")
BATCH_ROWS = 4096
PARQUET_BUFFER = 1 << 20


@dataclass(frozen=True)
class ManifestInfo:
    """What planning needs of one manifest."""

    rows: int
    schema: pa.Schema
    offsets: tuple[int, ...] | None  # CSV/JSONL: byte offset of each part's first row, then the end
    ids: pa.ChunkedArray | None  # the id column as strings, when one was asked for and exists


def manifest_kind(url: str) -> str:
    lower = url.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "json"
    raise UsageError(f"unknown manifest type: {url} (expected .parquet, .csv or .jsonl)")


def _parse_text(data: bytes, kind: str) -> pa.Table:
    if kind == "csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(io.BytesIO(data))
    import pyarrow.json as pajson

    return pajson.read_json(io.BytesIO(data))


def _ids(table: pa.Table, column: str | None) -> pa.ChunkedArray | None:
    if column is None or column not in table.column_names:
        return None
    return table.column(column).cast(pa.string())


def inspect_manifest(url: str, storage_options: dict | None, rows_per_part: int,
                     id_column: str | None = None) -> ManifestInfo:
    """Rows, schema, part offsets (text) and ids (when `id_column` is given) of one manifest."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            import pyarrow.parquet as pq

            pfile = pq.ParquetFile(handle)
            has_id = id_column in pfile.schema_arrow.names
            ids = _ids(pfile.read(columns=[id_column]), id_column) if has_id else None
            return ManifestInfo(pfile.metadata.num_rows, pfile.schema_arrow, None, ids)
        quoted = kind == "csv"
        header = text_rows.header_record(handle) if quoted else b""
        schemas, id_chunks, offsets, rows, end = [], [], [], 0, 0
        for number, piece in enumerate(text_rows.parts(handle, quoted=quoted, header=quoted, every=rows_per_part)):
            part = _parse_text(header + piece.data, kind)
            if part.num_rows != piece.rows:
                raise UsageError(f"cannot cut manifest {url} into parts: part {number} parses to "
                                 f"{part.num_rows} rows where {piece.rows} records were found")
            schemas.append(part.schema)
            found = _ids(part, id_column)
            id_chunks += found.chunks if found is not None else [pa.nulls(part.num_rows, pa.string())]
            offsets.append(piece.start)
            rows, end = rows + piece.rows, piece.stop
    if not schemas and header:
        schemas.append(_parse_text(header, kind).schema)
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    ids = pa.chunked_array(id_chunks, pa.string()) if id_column in schema.names else None
    return ManifestInfo(rows, schema, (*offsets, end), ids)


def read_manifest_table(url: str, storage_options: dict | None, start: int = 0, stop: int | None = None,
                        byte_range: tuple[int, int] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet, CSV or JSONL table as a pyarrow Table.

    Parquet skips whole row groups before `start` from the footer and decodes
    the rest in small batches. CSV and JSONL read only `byte_range`, the
    part's own bytes as `inspect_manifest` found them, and parse just those.
    """
    kind = manifest_kind(url)
    if kind != "parquet" and byte_range is None:
        raise ValueError(f"{url}: a CSV/JSONL part needs its byte range (from plan_parts)")
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            return _parquet_rows(handle, start, stop)
        header = text_rows.header_record(handle) if kind == "csv" else b""
        data = text_rows.read_range(handle, *byte_range)
    table = _parse_text(header + data, kind)
    if stop is not None and table.num_rows != stop - start:
        raise ValueError(f"{url} changed since the run was planned ({table.num_rows} rows where "
                         f"{stop - start} were planned)")
    return table


def _collect(batches: Iterator[pa.RecordBatch], start: int, stop: int, offset: int, schema: pa.Schema) -> pa.Table:
    """The rows [start, stop) of a batch stream whose first row is row `offset`."""
    kept = []
    for batch in batches:
        end = offset + batch.num_rows
        if end > start:
            lo = max(start - offset, 0)
            hi = min(stop - offset, batch.num_rows)
            if hi > lo:
                kept.append(batch.slice(lo, hi - lo))
        offset = end
        if offset >= stop:
            break
    return pa.Table.from_batches(kept) if kept else schema.empty_table()


def _parquet_rows(handle, start: int, stop: int | None) -> pa.Table:
    """Rows [start, stop) of a Parquet file: only overlapping row groups, decoded in small batches."""
    import pyarrow.parquet as pq

    pfile = pq.ParquetFile(handle, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    meta = pfile.metadata
    stop = meta.num_rows if stop is None else stop
    groups, first_row, offset = [], None, 0
    for i in range(meta.num_row_groups):
        rows = meta.row_group(i).num_rows
        if offset + rows > start and offset < stop:
            groups.append(i)
            if first_row is None:
                first_row = offset
        offset += rows
    if not groups:
        return pfile.schema_arrow.empty_table()
    batch_rows = max(1, min(BATCH_ROWS, stop - start))
    batches = pfile.iter_batches(batch_size=batch_rows, row_groups=groups)
    return _collect(batches, start, stop, first_row, pfile.schema_arrow)


def choose_columns(schema: pa.Schema, image: str | None, caption: str | None, id_column: str | None,
                   url: str) -> tuple[str, str | None, str | None]:
    """Resolve the image, caption and id columns asked for (None: guess the image and caption) against a schema."""
    names = schema.names
    for given, field in ((image, "image_column"), (caption, "caption_column"), (id_column, "id_column")):
        if given is not None and given not in names:
            raise FieldError(field, f"{{field}} {given!r} is not a column of {url} (columns: {', '.join(names)})")
    if image is None:
        image = next((c for c in IMAGE_COLUMN_GUESSES if c in names), None)
        if image is None:
            raise FieldError("image_column", f"{url}: no image column found; name it with {{field}} "
                             f"(columns: {', '.join(names)})")
    if caption is None:
        caption = next((c for c in CAPTION_COLUMN_GUESSES if c in names and c != image), None)
    return image, caption, id_column
