"""Writing one embed part: the embeddings Parquet, the failures Parquet, the done-marker.

Files follow the Embeddings contract of DESIGN.md: their tables come from
schema.py, their names from parts.py. Embedded rows reach the part writer as fragment
files (`_fragments/part-NNNNN/*.parquet`, written per bundle), not through the
shuffle, so that no runner holds a run's rows in memory. Each file is written
under a temporary name and renamed; the caller writes the done-marker after
them, so a part counts as done only when all of its files are in place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam.layout.embeddings.metadata import (
    DEFAULT_MAX_METADATA_COLUMNS,
    FOLDED_KEY,
    RESERVED,
    cap_metadata_columns,
    folded_count,
)
from clipbeam.layout.embeddings.parts import embeddings_file, failures_file, fragments_dir
from clipbeam.layout.embeddings.schema import FAILURE_SCHEMA, VECTOR_COLUMNS, embedding_table
from clipbeam.storage import atomic_open, join, open_input

# Row groups small enough that a sampler (`clipbeam index`) or a single-row reader (`clipbeam serve`)
# decodes a slice of a part, not all of it.
ROW_GROUP_ROWS = 8192


def write_table(table: pa.Table, url: str, storage_options: dict | None) -> None:
    """Zstd Parquet; vector columns plain-encoded (a dictionary of float16 values costs 3x the decode time)."""
    dictionary = [name for name in table.column_names if name not in VECTOR_COLUMNS]
    with atomic_open(url, "wb", storage_options) as handle:
        pq.write_table(table, handle, compression="zstd", use_dictionary=dictionary, row_group_size=ROW_GROUP_ROWS)


def write_fragment(out: str, number: int, rows: list[dict], dim: int, dtype: str,
                   storage_options: dict | None, max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS) -> str:
    """A bundle's rows of one part, written so that they need not wait in memory for the rest."""
    url = join(fragments_dir(out, number), f"{uuid.uuid4().hex}.parquet")
    write_table(embedding_table(rows, dim, dtype, {}, max_metadata_columns), url, storage_options)
    return url


def merge_fragments(urls: list[str], storage_options: dict | None) -> pa.Table | None:
    """One part's fragments as one table sorted by id; rows repeated by a retried bundle dropped."""
    tables = []
    for url in sorted(urls):
        with open_input(url, storage_options) as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        return None
    folded = sum(folded_count(t) for t in tables)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a metadata field typed differently across fragments
        tables = [t.cast(pa.schema([f if f.name in RESERVED else pa.field(f.name, pa.string())
                                    for f in t.schema])) for t in tables]
        table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by("id")
    ids = table.column("id").to_pylist()
    keep = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    table = table if all(keep) else table.filter(pa.array(keep))
    return table.replace_schema_metadata({FOLDED_KEY.encode(): str(folded).encode()}) if folded else table


@dataclass(frozen=True)
class PartFiles:
    """What write_part wrote for one part: the counts a done-marker records, and the file names."""

    samples: int
    rows: int
    text_rows: int
    failed_by_stage: dict
    embeddings: str | None  # relative to the output folder; None when no row was embedded
    failures_file: str | None
    metadata_folded: int = 0  # metadata values of columns over the cap, folded into json_raw

    @property
    def failures(self) -> int:
        return sum(self.failed_by_stage.values())

    @property
    def files(self) -> list[str]:
        return [name for name in (self.embeddings, self.failures_file) if name]


def write_part(out: str, number: int, table: pa.Table | None, failures: list[dict], samples_in: int,
               schema_meta: dict[str, str], storage_options: dict | None,
               max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS) -> PartFiles:
    """Write a part's embeddings and failures files; refuse a part whose counts do not add up."""
    rows = 0 if table is None else table.num_rows
    folded = 0
    if table is not None:
        folded = folded_count(table)
        table, more = cap_metadata_columns(table, max_metadata_columns)
        folded += more
    failures = sorted(failures, key=lambda r: (r["id"], r["stage"]))
    if rows + len(failures) != samples_in:
        raise RuntimeError(f"part {number}: {samples_in} samples in but {rows} embedded + "
                           f"{len(failures)} failed; refusing to write an inconsistent part")
    if rows:
        table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in schema_meta.items()})
        write_table(table, join(out, embeddings_file(number)), storage_options)
    if failures:
        failure_table = pa.Table.from_pylist([{k: f[k] for k in FAILURE_SCHEMA.names} for f in failures],
                                             schema=FAILURE_SCHEMA)
        write_table(failure_table, join(out, failures_file(number)), storage_options)
    by_stage: dict[str, int] = {}
    for record in failures:
        by_stage[record["stage"]] = by_stage.get(record["stage"], 0) + 1
    return PartFiles(
        samples=samples_in, rows=rows,
        text_rows=0 if table is None else rows - table.column("text_embedding").null_count,
        failed_by_stage=by_stage,
        embeddings=embeddings_file(number) if rows else None,
        failures_file=failures_file(number) if failures else None,
        metadata_folded=folded,
    )
