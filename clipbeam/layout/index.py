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

WORK = "_work"


def manifest_files(manifest: dict) -> list[str]:
    """What a committed index.json owns: the trained index and every shard's two files."""
    shards = manifest.get("shards", [])
    return [TRAINED_INDEX, *(s["index"] for s in shards), *(s["ids"] for s in shards)]


INDEX = OutputKind(FORMAT, manifest=INDEX_JSON, markers="_done", scratch=(f"{WORK}/*.npz", f"{WORK}/*.json"),
                   manifest_files=manifest_files)
