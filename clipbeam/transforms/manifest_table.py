"""Reading manifest tables (Parquet, CSV, JSONL) and choosing their columns."""

from __future__ import annotations

import pyarrow as pa

from clipbeam.errors import UsageError
from clipbeam.storage import get_fs

IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file", "url", "image_url", "jpg")
CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title", "prompt")


def read_manifest_table(url: str, storage_options: dict | None, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet, CSV or JSONL table as a pyarrow Table."""
    fs, path = get_fs(url, storage_options)
    lower = url.lower()
    with fs.open(path, "rb") as handle:
        if lower.endswith(".parquet"):
            table = _read_parquet_rows(handle, start, stop)
            return table
        if lower.endswith(".csv"):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(handle)
        elif lower.endswith((".jsonl", ".ndjson", ".json")):
            import pyarrow.json as pajson

            table = pajson.read_json(handle)
        else:
            raise UsageError(f"unknown manifest type: {url} (expected .parquet, .csv or .jsonl)")
    stop = table.num_rows if stop is None else stop
    return table.slice(start, stop - start)


def _read_parquet_rows(handle, start: int, stop: int | None) -> pa.Table:
    """Read only the row groups that overlap [start, stop)."""
    import pyarrow.parquet as pq

    pfile = pq.ParquetFile(handle)
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
    table = pfile.read_row_groups(groups)
    return table.slice(start - first_row, stop - start)


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
