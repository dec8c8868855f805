"""Metadata columns of the embeddings format: sidecar and manifest fields passed through as columns.

A part keeps at most `max_metadata_columns` of them (the first names in sorted
order, so every fragment of a part keeps the same ones); the rest are folded
into the `json_raw` column as one JSON object per row and counted, so that
thousands of sidecar keys cost neither a quadratic merge nor a
40,000-column file, and no value is lost.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

# The contract's own columns (schema.py builds them): a metadata key of one of these names gets a meta_ prefix.
RESERVED = ("id", "source", "caption", "image_embedding", "text_embedding", "width", "height", "sha256",
            "source_offset", "source_size")
JSON_RAW = "json_raw"  # metadata kept as JSON text: unparseable sidecars, and the columns over the cap
DEFAULT_MAX_METADATA_COLUMNS = 256
FOLDED_KEY = "clipbeam.metadata_folded"  # schema metadata of fragments: values folded into json_raw


def _meta_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def _renamed(meta: dict) -> dict:
    """Sidecar keys that would shadow a contract column get a `meta_` prefix."""
    return {(f"meta_{k}" if k in RESERVED else k): v for k, v in meta.items()}


def metadata_columns(rows: list[dict], max_columns: int) -> tuple[dict[str, pa.Array], int]:
    """The rows' metadata as columns, at most `max_columns` of them; (columns, values folded into json_raw)."""
    metas = [_renamed(r.get("meta") or {}) for r in rows]
    keys = list(dict.fromkeys(key for meta in metas for key in meta))  # linear in the keys, in first-seen order
    kept, folded = split_metadata(keys, max_columns)
    columns = {}
    for key in kept:
        values = [_meta_value(meta.get(key)) for meta in metas]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    if not folded:
        return columns, 0
    extras = [{k: meta[k] for k in folded if k in meta} for meta in metas]
    columns[JSON_RAW] = pa.array([_fold(meta.get(JSON_RAW), extra) for meta, extra in zip(metas, extras, strict=True)],
                                 pa.string())
    return columns, sum(map(len, extras))


def folded_count(table: pa.Table) -> int:
    """The metadata values a fragment (or merged part) folded into json_raw, from its schema metadata."""
    return int((table.schema.metadata or {}).get(FOLDED_KEY.encode(), b"0"))


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
