"""Reading manifest tables (Parquet, CSV, JSONL) and choosing their columns.

A part of a manifest is rows [start, stop), and it reads only those: Parquet
parts decode their row groups in small batches through a buffered reader (a
100-row part of a 20k-row, one-row-group file no longer holds the group), and
CSV/JSONL parts read just their own byte range, found when the run is
planned (text_rows.py). A part's memory follows its own size, not the file's.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import pyarrow as pa

from clipbeam.errors import UsageError
from clipbeam.storage import get_fs
from clipbeam.transforms import text_rows

IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file", "url", "image_url", "jpg")
CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title", "prompt")
BATCH_ROWS = 4096
BLOCK_BYTES = 1 << 20
PARQUET_BUFFER = 1 << 20
SCHEMA_SAMPLE_ROWS = 1000


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
    # A buffered Arrow stream over the Python file: handed the file itself, Arrow's reader
    # pulls it through Python in large reads (most of a 20 MB CSV at once).
    stream = pa.input_stream(handle, buffer_size=BLOCK_BYTES)
    if kind == "csv":
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(include_columns=columns) if columns else None
        reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
                                convert_options=convert)
    else:
        import pyarrow.json as pajson

        reader = pajson.open_json(stream, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES))
    for batch in reader:
        yield batch.select(columns) if columns else batch


def read_manifest_table(url: str, storage_options: dict | None, start: int = 0, stop: int | None = None,
                        byte_range: tuple[int, int] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet, CSV or JSONL table as a pyarrow Table.

    Parquet skips whole row groups before `start` from the footer and decodes
    the rest in small batches. CSV and JSONL read only `byte_range` (the
    part's own bytes, found by planning: text_rows.scan) and parse just those;
    without one, they stream from the start and stop at `stop`.
    """
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            return _parquet_rows(handle, start, stop)
        if byte_range is None:
            return _collect(_batches(handle, kind, batch_rows=BATCH_ROWS), start, stop)
        header = text_rows.header_record(handle) if kind == "csv" else b""
        data = text_rows.read_range(handle, *byte_range)
    table = _parse_text(header + data, kind)
    if stop is not None and table.num_rows != stop - start:
        raise ValueError(f"{url} changed since the run was planned ({table.num_rows} rows where "
                         f"{stop - start} were planned)")
    return table


def _parse_text(data: bytes, kind: str) -> pa.Table:
    import io

    if kind == "csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(io.BytesIO(data))
    import pyarrow.json as pajson

    return pajson.read_json(io.BytesIO(data))


def part_offsets(url: str, storage_options: dict | None, rows_per_part: int) -> tuple[int, tuple[int, ...] | None]:
    """(rows, byte offsets of each part's first row plus the end) of a manifest; None for Parquet,
    whose parts find their rows from the footer. A text manifest is parsed whole once here (so a
    malformed row anywhere stops the run before it starts) and scanned for its row offsets."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(handle).metadata.num_rows, None
        parsed = sum(batch.num_rows for batch in _batches(handle, kind))  # every row parses, or an error
    with fs.open(path, "rb") as handle:  # (Arrow's stream closed the first handle)
        layout = text_rows.scan(handle, quoted=kind == "csv", header=kind == "csv", every=rows_per_part)
    if layout.rows != parsed:
        raise UsageError(f"cannot cut manifest {url} into parts: pyarrow reads {parsed} rows where "
                         f"{layout.rows} records were found")
    return layout.rows, layout.offsets


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


def manifest_schema(url: str, storage_options: dict | None) -> pa.Schema:
    """A manifest's column names and types (Parquet: the footer; CSV/JSONL: the header and first rows)."""
    kind = manifest_kind(url)
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(handle).schema_arrow
        found = text_rows.records(handle, quoted=kind == "csv")
        head = b"".join(record for _, record in itertools.islice(found, SCHEMA_SAMPLE_ROWS))
    return _parse_text(head, kind).schema if head else pa.schema([])


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
