"""The folder format of `clipbeam classify`: one labels part per embeddings part, the manifest last.

    OUT/labels/part-NNNNN.parquet   id, label, score, top_labels, top_scores; N is the embeddings part's
    OUT/_done/part-NNNNN.json       done-markers (the lifecycle's ledger)
    OUT/manifest.json               written last: labels, templates, model, parts, rows
    OUT/_job.json, OUT/_lease.json  the lifecycle's run record and lease

A labels part is named after the embeddings part it labels, whose number
belongs to its source (layout/embeddings.py), so parts labelled on earlier
days keep their names when the corpus grows.
"""

from __future__ import annotations

import pyarrow as pa

from clipbeam.layout.embeddings import part_name
from clipbeam.layout.folder import OutputKind
from clipbeam.layout.ledger import has_fields

FORMAT_VERSION = 2  # 2: "format", the run record and done-markers; parts named by embeddings part number
SCHEMA = pa.schema([("id", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                    ("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))])


def labels_file(number: int) -> str:
    """The labels part of embeddings part `number`, relative to the output folder."""
    return f"labels/{part_name(number)}.parquet"


def manifest_files(manifest: dict) -> list[str]:
    return [part["path"] for part in manifest.get("parts", [])]


MARKER_FIELDS = {"number": int, "path": str, "rows": int, "skipped": int, "source": str, "rows_in": int}


def valid_marker(unit: str, marker: dict) -> bool:
    return has_fields(marker, MARKER_FIELDS) and marker["number"] >= 0 and unit == part_name(marker["number"])


LABELS = OutputKind("clipbeam.labels", markers="_done", manifest_files=manifest_files, valid_marker=valid_marker)
