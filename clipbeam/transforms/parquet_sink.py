"""Writing one embed part: the embeddings Parquet, the failures Parquet, the done-marker.

Files follow the Embeddings contract of DESIGN.md; their names come from
clipbeam.layout.embeddings. Embedded rows reach the part writer as fragment
files (`_fragments/part-NNNNN/*.parquet`, written per bundle), not through the
shuffle, so that no runner holds a run's rows in memory. Each file is written
under a temporary name and renamed; the caller writes the done-marker after
them, so a part counts as done only when all of its files are in place.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam.layout.embeddings import embeddings_file, failures_file, fragments_dir
from clipbeam.storage import atomic_open, join, open_input

RESERVED = ("id", "source", "caption", "image_embedding", "text_embedding", "width", "height", "sha256",
            "source_offset", "source_size")
JSON_RAW = "json_raw"  # metadata kept as JSON text: unparseable sidecars, and the columns over the cap
DEFAULT_MAX_METADATA_COLUMNS = 256
FOLDED_KEY = "clipbeam.metadata_folded"  # schema metadata of fragments: values folded into json_raw
FAILURE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                            ("error", pa.string())])


def _meta_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def embedding_table(rows: list[dict], dim: int, dtype: str, schema_meta: dict[str, str],
                    max_metadata_columns: int = DEFAULT_MAX_METADATA_COLUMNS) -> pa.Table:
    """Rows (sorted by id) -> the contract's table; metadata columns pass through, at most
    `max_metadata_columns` of them (the rest folded into json_raw)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    list_type = pa.list_(value_type)

    def vectors(key: str) -> pa.Array:
        flat, offsets, valid = [], [0], []
        for row in rows:
            vector = row[key]
            if vector is None:
                valid.append(False)
            else:
                flat.append(np.asarray(vector, dtype=np_dtype))
                valid.append(True)
            offsets.append(offsets[-1] + (0 if vector is None else dim))
        values = pa.array(np.concatenate(flat) if flat else np.zeros(0, np_dtype), type=value_type)
        mask = pa.array([not v for v in valid], type=pa.bool_())
        return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values, mask=mask).cast(list_type)

    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "image_embedding": vectors("image_embedding"),
        "text_embedding": vectors("text_embedding"),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "sha256": pa.array([r["sha256"] for r in rows], pa.string()),
        # Where the image bytes lie in a tar shard (null for manifests, folders, compressed tars).
        "source_offset": pa.array([r.get("source_offset") for r in rows], pa.int64()),
        "source_size": pa.array([r.get("source_size") for r in rows], pa.int64()),
    }
    metas = [_renamed(r.get("meta") or {}) for r in rows]
    keys = list(dict.fromkeys(key for meta in metas for key in meta))  # linear in the keys, in first-seen order
    kept, folded = split_metadata(keys, max_metadata_columns)
    for key in kept:
        values = [_meta_value(meta.get(key)) for meta in metas]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    if folded:
        extras = [{k: meta[k] for k in folded if k in meta} for meta in metas]
        columns[JSON_RAW] = pa.array([_fold(meta.get(JSON_RAW), extra) for meta, extra in zip(metas, extras,
                                                                                            strict=True)], pa.string())
        schema_meta = {**schema_meta, FOLDED_KEY: str(sum(map(len, extras)))}
    table = pa.table(columns)
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in schema_meta.items()})


def folded_count(table: pa.Table) -> int:
    """The metadata values a fragment (or merged part) folded into json_raw, from its schema metadata."""
    return int((table.schema.metadata or {}).get(FOLDED_KEY.encode(), b"0"))


def _renamed(meta: dict) -> dict:
    """Sidecar keys that would shadow a contract column get a `meta_` prefix."""
    return {(f"meta_{k}" if k in RESERVED else k): v for k, v in meta.items()}


def split_metadata(keys: list[str], max_columns: int) -> tuple[list[str], list[str]]:
    """(metadata keys kept as columns, keys folded into json_raw): at most `max_columns` columns, the
    first names in sorted order, so that every fragment of a part keeps the same ones."""
    names = [k for k in keys if k != JSON_RAW]
    if len(names) <= max_columns:
        return keys, []
    ordered = sorted(names)
    return ordered[:max_columns] + ([JSON_RAW] if JSON_RAW in keys else []), ordered[max_columns:]


def _fold(raw: Any, extra: dict) -> str | None:
    """A row's json_raw with `extra` fields folded in: a JSON object (a raw sidecar text kept under "json_raw")."""
    if not extra:
        return None if raw is None else str(raw)
    if raw is not None:
        try:
            previous = json.loads(raw)
        except (TypeError, ValueError, RecursionError):
            previous = None
        extra = {**(previous if isinstance(previous, dict) else {JSON_RAW: raw}), **extra}
    return json.dumps(extra, ensure_ascii=False, default=str)


def cap_metadata_columns(table: pa.Table, max_columns: int) -> tuple[pa.Table, int]:
    """A merged part's table with at most `max_columns` metadata columns, the rest folded into json_raw;
    (table, values folded here). Fragments are capped one by one, so their union may be over the cap."""
    meta = [name for name in table.column_names if name not in RESERVED]
    kept, folded = split_metadata(meta, max_columns)
    if not folded:
        return table, 0
    extras = [{k: v for k, v in row.items() if v is not None} for row in table.select(folded).to_pylist()]
    raws = table.column(JSON_RAW).to_pylist() if JSON_RAW in table.column_names else [None] * table.num_rows
    values = [_fold(raw, extra) for raw, extra in zip(raws, extras, strict=True)]
    table = table.drop_columns([*folded, *([JSON_RAW] if JSON_RAW in meta else [])])
    return table.append_column(JSON_RAW, pa.array(values, pa.string())), sum(map(len, extras))


# Row groups small enough that a sampler (`clipbeam index`) or a single-row reader (`clipbeam serve`)
# decodes a slice of a part, not all of it.
ROW_GROUP_ROWS = 8192


def write_table(table: pa.Table, url: str, storage_options: dict | None) -> None:
    """Zstd Parquet; vector columns plain-encoded (a dictionary of float16 values costs 3x the decode time)."""
    vectors = {"image_embedding", "text_embedding"}
    dictionary = [name for name in table.column_names if name not in vectors]
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
