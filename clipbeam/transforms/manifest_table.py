"""Reading manifest tables (Parquet, CSV, JSONL) and choosing their columns.

A part of a manifest is rows [start, stop). Parts read their rows as a stream
of small record batches (Parquet through a buffered reader, CSV and JSONL
through pyarrow's streaming readers), so a part's memory follows its own
size, not the size of the file or of a Parquet row group: a 100-row part of
a 20k-row, one-row-group Parquet file no longer holds the whole group.
Counting rows streams the same way, so counts and parts always agree.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from clipbeam.errors import UsageError
from clipbeam.storage import get_fs

IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file", "url", "image_url", "jpg")
CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title", "prompt")
BATCH_ROWS = 4096
BLOCK_BYTES = 1 << 20
PARQUET_BUFFER = 1 << 20


def manifest_kind(url: str) -> str:
    lower = url.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "json"
    raise UsageError(f"unknown manifest type: {url} (expected .parquet, .csv or .jsonl)")


def _batches(handle, kind: str, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS
             ) -> Iterator[pa.RecordBatch]:
    """The table's record batches in order, never more than one block in memory."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        pfile = pq.ParquetFile(handle, buffer_size=PARQUET_BUFFER, pre_buffer=False)
        yield from pfile.iter_batches(batch_size=batch_rows, columns=columns)
        return
    if kind == "csv":
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(include_columns=columns) if columns else None
        reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
                                convert_options=convert)
    else:
        import pyarrow.json as pajson

        reader = pajson.open_json(handle, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES))
    for batch in reader:
        yield batch.select(columns) if columns else batch


def read_manifest_table(url: str, storage_options: dict | None, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet, CSV or JSONL table as a pyarrow Table, read as a stream.

    Parquet skips whole row groups before `start` from the footer; the rows
    before `start` inside a group, and CSV/JSONL rows, are decoded batch by
    batch and dropped. Reading stops at `stop`.
    """
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            return _parquet_rows(handle, start, stop)
        return _collect(_batches(handle, kind, batch_rows=BATCH_ROWS), start, stop)


def _collect(batches: Iterator[pa.RecordBatch], start: int, stop: int | None, offset: int = 0,
             schema: pa.Schema | None = None) -> pa.Table:
    """The rows [start, stop) of a batch stream whose first row is row `offset`."""
    kept = []
    for batch in batches:
        schema = schema or batch.schema
        end = offset + batch.num_rows
        if end > start:
            lo = max(start - offset, 0)
            hi = batch.num_rows if stop is None else min(stop - offset, batch.num_rows)
            if hi > lo:
                kept.append(batch.slice(lo, hi - lo))
        offset = end
        if stop is not None and offset >= stop:
            break
    if kept:
        return pa.Table.from_batches(kept)
    return schema.empty_table() if schema is not None else pa.table({})


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
    return _collect(batches, start, stop, offset=first_row, schema=pfile.schema_arrow)


def count_rows(url: str, storage_options: dict | None) -> int:
    """The number of rows (Parquet: from the footer; CSV/JSONL: one streamed pass)."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(handle).metadata.num_rows
        return sum(batch.num_rows for batch in _batches(handle, kind))


def manifest_schema(url: str, storage_options: dict | None) -> pa.Schema:
    """A manifest's column names and types (Parquet: footer; CSV/JSONL: the first block)."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(handle).schema_arrow
        first = next(_batches(handle, kind), None)
        return first.schema if first is not None else pa.schema([])


def read_column(url: str, storage_options: dict | None, column: str) -> pa.ChunkedArray:
    """One column of a whole manifest (projected: Parquet and CSV read no other column)."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        chunks = [batch.column(0) for batch in _batches(handle, kind, columns=[column])]
    return pa.chunked_array(chunks) if chunks else pa.chunked_array([], pa.null())


def choose_columns(schema: pa.Schema, image: str | None, caption: str | None, id_column: str | None,
                   url: str) -> tuple[str, str | None, str | None]:
    """Resolve --image-column/--caption-column/--id-column against a table's schema."""
    names = schema.names
    for given, flag in ((image, "--image-column"), (caption, "--caption-column"), (id_column, "--id-column")):
        if given is not None and given not in names:
            raise UsageError(f"{flag} {given!r} is not a column of {url} (columns: {', '.join(names)})")
    if image is None:
        image = next((c for c in IMAGE_COLUMN_GUESSES if c in names), None)
        if image is None:
            raise UsageError(f"{url}: no image column found; name it with --image-column (columns: {', '.join(names)})")
    if caption is None:
        caption = next((c for c in CAPTION_COLUMN_GUESSES if c in names and c != image), None)
    return image, caption, id_column
