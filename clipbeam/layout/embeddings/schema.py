"""The embeddings format's version and Arrow schema: the one place a format change is made.

A change to a column, a type or the manifest's meaning is one edit here and
one bump of FORMAT_VERSION; the writer (write.py), the reader (read.py) and
the folder's manifest (parts.py) take both from here. DESIGN.md's
"Embeddings" section is the contract this implements.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clipbeam.layout.embeddings.metadata import DEFAULT_MAX_METADATA_COLUMNS, FOLDED_KEY, metadata_columns

FORMAT_VERSION = 3  # 3: part numbers kept per source, "in_input" per part, "files"
VECTOR_COLUMNS = ("image_embedding", "text_embedding")  # list<float16|float32> of length D, L2-normalised
DIM_KEY = "clipbeam.dim"  # Parquet schema metadata: D, also stored in the manifest
DIM_METADATA_KEY = DIM_KEY.encode()
# Columns a search result shows, and where its image bytes lie (one range read, corpus.fetch).
DEFAULT_KEEP_COLUMNS = ("caption", "source", "source_offset", "source_size")
FAILURE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                            ("error", pa.string())])


def embedding_table(rows: list[dict], dim: int, dtype: str, schema_meta: dict[str, str],
                    max_metadata_columns: int | None = None) -> pa.Table:
    """Rows (sorted by id) -> the contract's table; metadata columns pass through, at most
    `max_metadata_columns` of them (metadata.py; the rest folded into json_raw)."""
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
    limit = DEFAULT_MAX_METADATA_COLUMNS if max_metadata_columns is None else max_metadata_columns
    extra, folded = metadata_columns(rows, limit)
    columns.update(extra)
    if folded:
        schema_meta = {**schema_meta, FOLDED_KEY: str(folded)}
    table = pa.table(columns)
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in schema_meta.items()})
