"""The output lifecycle's view of an index folder (the format itself is clipbeam/index/manifest.py).

    OUT/index.json                   written last (index/manifest.py says what it holds)
    OUT/trained.faiss                the trained empty index every shard started from
    OUT/shard-NNNNN.faiss, .ids.parquet
    OUT/_done/shard-NNNNN.json       done-markers (the lifecycle's ledger)
    OUT/_work/                       the plan, queries, per-shard ground truth, tuning; gone at commit
    OUT/_job.json, OUT/_lease.json   the lifecycle's run record and lease
"""

from __future__ import annotations

from clipbeam.index.manifest import FORMAT, INDEX_JSON, TRAINED_INDEX
from clipbeam.layout.folder import OutputKind
from clipbeam.layout.ledger import has_fields

WORK = "_work"


def manifest_files(manifest: dict) -> list[str]:
    """What a committed index.json owns: the trained index and every shard's two files."""
    shards = manifest.get("shards", [])
    return [TRAINED_INDEX, *(s["index"] for s in shards), *(s["ids"] for s in shards)]


MARKER_FIELDS = {"number": int, "index": str, "ids": str, "ntotal": int, "id_start": int, "id_end": int,
                 "bytes": int, "skipped_null": int, "seconds": (int, float), "sha256": (str, type(None)),
                 "ids_sha256": (str, type(None))}


def valid_marker(unit: str, marker: dict) -> bool:
    """A shard's marker names its own unit and has every field index.json is built from."""
    return has_fields(marker, MARKER_FIELDS) and marker["number"] >= 0 and unit == f"shard-{marker['number']:05d}"


INDEX = OutputKind(FORMAT, manifest=INDEX_JSON, markers="_done", scratch=(f"{WORK}/*.npz", f"{WORK}/*.json"),
                   manifest_files=manifest_files, valid_marker=valid_marker)
