"""The folder format of `clipbeam dedup`, and its one reader: which samples a threshold removes.

    OUT/groups/part-NNNNN.parquet   one row per sample in a group, per threshold: id, group, threshold,
                                    kind (exact | near), kept, kept_id, similarity_to_kept
    OUT/gallery/index.html          largest groups, borderline pairs, nearest-neighbour histogram
    OUT/_done/part-NNNNN.json       done-markers (the lifecycle's ledger)
    OUT/_work/                      cluster centroids, cached links and routed vectors (spill/) of an unfinished
                                    run; gone at commit
    OUT/manifest.json               written last: thresholds, per threshold samples / groups / removed,
                                    the embeddings parts (url, rows) and the index it came from
    OUT/_job.json, OUT/_lease.json  the lifecycle's run record and lease

A group lies wholly in one part (part = group % parts), so per-part counts add
up. `group` is the smallest global row number of the group's members, stable
for the same embeddings. `index --exclude` and `export --exclude` read the
removed ids through `removed_ids`, which refuses a dedup output computed over
other embeddings parts than the ones being indexed: a grown corpus never
passes silently with its new duplicates kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.errors import FieldError, UsageError
from clipbeam.layout.embeddings import part_name
from clipbeam.layout.embeddings.read import EmbeddingsInput, describe, part_keys
from clipbeam.layout.folder import OutputKind

FORMAT = "clipbeam.dedup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WORK = "_work"
GALLERY = "gallery"
KINDS = ("exact", "near")
SCHEMA = pa.schema([("id", pa.string()), ("group", pa.int64()), ("threshold", pa.float32()),
                    ("kind", pa.string()), ("kept", pa.bool_()), ("kept_id", pa.string()),
                    ("similarity_to_kept", pa.float32())])


def groups_file(number: int) -> str:
    return f"groups/{part_name(number)}.parquet"


def manifest_files(manifest: dict) -> list[str]:
    return [*(p["path"] for p in manifest.get("parts", [])), *manifest.get("gallery_files", [])]


DEDUP = OutputKind(FORMAT, manifest=MANIFEST, markers="_done", manifest_files=manifest_files,
                   scratch=(f"{WORK}/*.npz", f"{WORK}/*.json", f"{WORK}/links/*.npz", f"{WORK}/spill/*.bin"))


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """A finished dedup output's manifest; UsageError (one line, exit 2) when there is none."""
    manifest_url = storage.join(url, MANIFEST)
    try:
        manifest = storage.read_json(manifest_url, storage_options)
    except (FileNotFoundError, ValueError):
        raise UsageError(f"{url} holds no finished dedup output (no readable {MANIFEST}); run clipbeam dedup") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{manifest_url} is not a clipbeam dedup manifest")
    return manifest


def check_same_embeddings(url: str, manifest: dict, described: dict) -> None:
    """Refuse a dedup output made from other embeddings parts (path, rows) than the input `described`."""
    deduped, given = part_keys(manifest.get("embeddings", {})), part_keys(described)
    if deduped != given:
        new, gone = len(given - deduped), len(deduped - given)
        raise UsageError(f"{url} was computed over other embeddings ({new} part(s) new or changed, {gone} "
                         "no longer there): rerun clipbeam dedup over these embeddings first")


@dataclass(frozen=True)
class ExcludedSamples:
    """What `--exclude DEDUP` leaves out: the ids, and where they came from (for settings and manifests)."""

    source: dict | None
    ids: frozenset[str]


def removed_samples(url: str, threshold: float | None, inputs: EmbeddingsInput,
                    storage_options: dict | None = None) -> ExcludedSamples:
    """`--exclude DEDUP [--threshold T]` for an embeddings input."""
    manifest = read_manifest(url, storage_options)
    thresholds = [float(t) for t in manifest.get("thresholds", [])]
    if threshold is None:
        if len(thresholds) != 1:
            raise FieldError("threshold", f"{url} has groups at thresholds {', '.join(map(str, thresholds))}: "
                                          "choose one with {field}")
        threshold = thresholds[0]
    ids = removed_ids(url, threshold, describe(inputs), storage_options)
    return ExcludedSamples({"url": url, "threshold": threshold, "fingerprint": manifest.get("fingerprint"),
                            "removed": len(ids)}, ids)


def removed_ids(url: str, threshold: float, described: dict, storage_options: dict | None = None) -> frozenset[str]:
    """The ids a threshold removes (in a group, not kept), for the embeddings input `described` only."""
    manifest = read_manifest(url, storage_options)
    check_same_embeddings(url, manifest, described)
    thresholds = [float(t) for t in manifest.get("thresholds", [])]
    match = [t for t in thresholds if abs(t - threshold) < 1e-6]
    if not match:
        raise UsageError(f"{url} has no groups at threshold {threshold} (it has "
                         f"{', '.join(map(str, thresholds))})")
    removed: set[str] = set()
    for part in manifest.get("parts", []):
        with storage.open_input(storage.join(url, part["path"]), storage_options) as handle:
            table = pq.read_table(handle, columns=["id", "threshold", "kept"])
        at = pc.less(pc.abs(pc.subtract(pc.cast(table["threshold"], pa.float64()), match[0])), 1e-6)
        chosen = table.filter(pc.and_(at, pc.invert(table["kept"])))
        removed.update(chosen.column("id").to_pylist())
    return frozenset(removed)
