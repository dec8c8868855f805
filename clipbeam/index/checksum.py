"""SHA-256 checksums of an index's files: recorded in index.json, checked on request.

A byte changed inside a shard keeps the file's size, and faiss reads it without
complaint: searches then return wrong neighbours or impossible scores. The
sizes in index.json catch truncation; the checksums catch the rest. Checking
reads every byte, so `ShardedIndex.open` does it only with `verify=True` (and
`clipbeam index --verify`); the default open stays a memory map. Shard files
are hashed while they are written (faiss_io.write_index), never read back.
"""

from __future__ import annotations

from typing import Any

from clipbeam import storage
from clipbeam.index.errors import IndexInputError
from clipbeam.index.manifest import INDEX_JSON, TRAINED_INDEX


def sha256_file(url: str, storage_options: dict | None = None) -> str:
    """Hex SHA-256 of an index file (storage.file_sha256); a missing file is an IndexInputError."""
    try:
        return storage.file_sha256(url, storage_options)
    except FileNotFoundError:
        raise IndexInputError(f"index file {url} is missing") from None


def recorded_checksums(manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(file name, recorded sha256 or None) for the trained index and every shard's index and id table."""
    files = [(manifest.get("trained_index", TRAINED_INDEX), manifest.get("train", {}).get("index_sha256"))]
    for shard in manifest["shards"]:
        files += [(shard["index"], shard.get("sha256")), (shard["ids"], shard.get("ids_sha256"))]
    return files


def verify_index(url: str, manifest: dict[str, Any], storage_options: dict | None = None) -> int:
    """Check every file against index.json's checksums; the number of files checked, else IndexInputError."""
    files = recorded_checksums(manifest)
    unrecorded = [name for name, expected in files if not expected]
    if unrecorded:
        raise IndexInputError(f"{storage.join(url, INDEX_JSON)} records no checksum for {unrecorded[0]} "
                              f"({len(unrecorded)} file(s); built by an older clipbeam): rebuild it to verify")
    for name, expected in files:
        actual = sha256_file(storage.join(url, name), storage_options)
        if actual != expected:
            raise IndexInputError(f"index file {storage.join(url, name)} is corrupt: its sha256 is {actual[:16]}..., "
                                  f"index.json says {expected[:16]}...")
    return len(files)
