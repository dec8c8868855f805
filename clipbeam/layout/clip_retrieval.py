"""The folder format of `clipbeam export --format clip-retrieval` (clip-retrieval / autofaiss).

    OUT/img_emb/img_emb_NNNNN.npy           float16 [rows, dim], C order, NPY v1
    OUT/text_emb/text_emb_NNNNN.npy         the same for text; zeros where a row has none
    OUT/metadata/metadata_NNNNN.parquet     image_path, caption, has_text, then the other columns
    OUT/_done/part-NNNNN.json               done-markers (the lifecycle's ledger)
    OUT/export.json                         written last (version 2)
    OUT/_job.json, OUT/_lease.json          the lifecycle's run record and lease

The three files of a partition line up row for row, and clip-retrieval,
autofaiss and embedding-reader pair them by sorted position: so the number
has one fixed width for the whole export and no 0-row file is ever written.
Partition N comes from embeddings part N.
"""

from __future__ import annotations

import io

import numpy as np

from clipbeam.layout.embeddings import part_name
from clipbeam.layout.folder import OutputKind
from clipbeam.layout.ledger import has_fields

EXPORT_JSON = "export.json"
FORMAT_VERSION = 2  # 2: "format" names the output kind, "layout" the folder layout; has_text in the metadata
FOLDERS = ("img_emb", "text_emb", "metadata")


def partition_width(count: int) -> int:
    """Digits of the partition number: at least 5, fixed for the whole export so names sort."""
    return max(5, len(str(max(count - 1, 0))))


def partition_file(kind: str, number: int, width: int) -> str:
    """img_emb/img_emb_00007.npy, text_emb/..., metadata/metadata_00007.parquet."""
    return f"{kind}/{kind}_{number:0{width}d}.{'parquet' if kind == 'metadata' else 'npy'}"


def npy_header(rows: int, dim: int) -> bytes:
    """The NPY v1 header of a float16 [rows, dim] C-order array, so rows can be streamed after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    return buffer.getvalue()


def manifest_files(manifest: dict) -> list[str]:
    width = int(manifest.get("width", 5))
    return [partition_file(kind, int(p["partition"]), width) for p in manifest.get("partitions", [])
            for kind in FOLDERS]


# Exports of version 1 have no run record; their export.json (which only this job writes) marks the folder as
# an export, so `--overwrite` can replace one (deleting the files its partitions list, and its old _work/).
MARKER_FIELDS = {"number": int, "rows": int, "text": bool, "source": str, "rows_in": int}


def valid_marker(unit: str, marker: dict) -> bool:
    return has_fields(marker, MARKER_FIELDS) and marker["number"] >= 0 and unit == part_name(marker["number"])


EXPORT = OutputKind("clipbeam.export", manifest=EXPORT_JSON, markers="_done", scratch=("_work/*.json",),
                    manifest_files=manifest_files, legacy_records=(EXPORT_JSON,), valid_marker=valid_marker)
