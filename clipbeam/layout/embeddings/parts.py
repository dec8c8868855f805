"""The embeddings folder (what `clipbeam embed` writes): names, part numbers by source, the manifest.

```
OUT/manifest.json                   written last (format_version: schema.FORMAT_VERSION)
OUT/embeddings/part-NNNNN.parquet   one per part that embedded rows
OUT/failures/part-NNNNN.parquet     one per part that had failures
OUT/_parts/part-NNNNN.json          done-markers (the lifecycle's ledger)
OUT/_fragments/part-NNNNN/          rows waiting for their part's writer
OUT/_job.json, OUT/_lease.json      the lifecycle's run record and lease
```

A part's number belongs to its source: the run record (`part_numbers`, kept
without the manifest, through lost files and redone parts), the manifest and
the done-markers keep source -> number, sources seen before keep their numbers (and so their files
and ids), and new sources get the next free numbers in sorted order. A corpus
that grows by a shard which sorts first therefore costs one new part, not a
renumbering of all of them. Pure functions here; the pipeline writes the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from clipbeam.layout.embeddings.schema import FORMAT_VERSION
from clipbeam.layout.folder import OutputKind
from clipbeam.layout.ledger import has_fields
from clipbeam.storage import join

MARKERS = "_parts"
NUMBERS_NOTE = "part_numbers"  # the run record's note: source -> part number
FRAGMENTS = "_fragments"


def part_name(number: int) -> str:
    return f"part-{number:05d}"


def embeddings_file(number: int) -> str:
    """The part's embeddings file, relative to the output folder."""
    return f"embeddings/{part_name(number)}.parquet"


def failures_file(number: int) -> str:
    return f"failures/{part_name(number)}.parquet"


def fragments_name(number: int) -> str:
    """A part's folder of fragments, relative to the output folder."""
    return f"{FRAGMENTS}/{part_name(number)}"


def fragments_dir(out: str, number: int) -> str:
    return join(out, fragments_name(number))


def manifest_files(manifest: dict) -> list[str]:
    """The part files a manifest lists (any format version: 1 and 2 name them per part only)."""
    listed = list(manifest.get("files", []))
    for entry in manifest.get("parts", []):
        listed.extend(entry[key] for key in ("path", "failures_path") if entry.get(key))
    return sorted(set(listed))


MARKER_FIELDS = {"part": int, "source": str, "samples": int, "rows": int, "failures": int, "failed_by_stage": dict,
                 "embeddings": (str, type(None)), "failures_file": (str, type(None)), "text_rows": (int, type(None)),
                 "metadata_folded": (int, type(None))}


def valid_marker(unit: str, marker: dict) -> bool:
    """A part's marker names its own unit and has every field the manifest is built from."""
    return (has_fields(marker, MARKER_FIELDS) and marker["part"] >= 0 and unit == part_name(marker["part"])
            and all(isinstance(k, str) and isinstance(v, int) for k, v in marker["failed_by_stage"].items()))


EMBEDDINGS = OutputKind("clipbeam.embeddings", markers=MARKERS, scratch=(f"{FRAGMENTS}/part-*/*.parquet",),
                        manifest_files=manifest_files, legacy_records=("_run.json",), valid_marker=valid_marker)


def number_sources(sources: Iterable[str], known: dict[str, int]) -> dict[str, int]:
    """Sources seen before keep their numbers; new ones get the next free numbers, in sorted order."""
    numbers = {s: known[s] for s in sources if s in known}
    following = max(known.values(), default=-1) + 1
    for source in sorted(set(sources) - set(numbers)):
        numbers[source] = following
        following += 1
    return numbers


def known_numbers(recorded: object, previous_manifest: dict | None, markers: Iterable[dict]) -> dict[str, int]:
    """source -> part number, from the run record's map (`recorded`, kept while parts are redone), the
    last manifest and the done-markers, in that order. Entries of the wrong type are ignored, and a
    number already given to another source is not given twice (records can be edited by hand)."""
    pairs = list(recorded.items()) if isinstance(recorded, dict) else []
    entries = (previous_manifest or {}).get("parts")
    for entry in [*(entries if isinstance(entries, list) else []), *markers]:
        if isinstance(entry, dict):
            pairs.append((entry.get("source"), entry.get("part")))
    known: dict[str, int] = {}
    taken: set[int] = set()
    for source, number in pairs:
        if (isinstance(source, str) and isinstance(number, int) and not isinstance(number, bool) and number >= 0
                and source not in known and number not in taken):
            known[source] = number
            taken.add(number)
    return known


@dataclass(frozen=True)
class PartPlan:
    """Which parts a run does: every input part numbered, and what is done or no longer in the input."""

    numbered: dict[int, object]             # number -> PartSpec of every input part
    done: dict[int, dict] = field(default_factory=dict)     # number -> marker, input parts complete
    gone: dict[int, dict] = field(default_factory=dict)     # number -> marker, parts whose source went

    @property
    def pending(self) -> list[tuple[int, object]]:
        return [(n, spec) for n, spec in sorted(self.numbered.items()) if n not in self.done]


def plan_numbers(parts: list, known: dict[str, int], done_markers: dict[str, dict]) -> PartPlan:
    """Number the input parts (by source) and sort the complete parts' markers into done and gone.

    A marker counts as done for its part when it names the same source and the
    same fingerprint (the part would hold the same samples); a marker whose
    source is not in the input is gone (kept in the manifest unless pruned).
    """
    markers = list(done_markers.values())
    numbers = number_sources([p.source for p in parts], known)
    numbered = {numbers[p.source]: p for p in parts}
    done, gone = {}, {}
    for marker in markers:
        number = int(marker["part"])
        spec = numbered.get(number)
        if spec is None:
            if numbers.get(marker["source"]) is None:
                gone[number] = marker
        elif marker["source"] == spec.source and marker.get("fingerprint") == spec.fingerprint:
            done[number] = marker
    return PartPlan(numbered, done, gone)


def manifest_entry(marker: dict, in_input: bool) -> dict:
    return {
        "part": int(marker["part"]),
        "name": part_name(int(marker["part"])),
        "source": marker["source"],
        "in_input": in_input,
        "samples": marker["samples"],
        "rows": marker["rows"],
        "text_rows": marker.get("text_rows", 0),
        "metadata_folded": marker.get("metadata_folded") or 0,
        "failures": marker["failures"],
        "failed_by_stage": marker["failed_by_stage"],
        "path": marker["embeddings"],
        "failures_path": marker["failures_file"],
    }


def build_manifest(settings: dict, markers: dict[int, dict], in_input: set[int], extra: dict) -> dict:
    """The manifest of a complete output: parts in part-number order (new parts come last)."""
    entries = [manifest_entry(markers[n], n in in_input) for n in sorted(markers)]
    failed_by_stage: dict[str, int] = {}
    for entry in entries:
        for stage, count in entry["failed_by_stage"].items():
            failed_by_stage[stage] = failed_by_stage.get(stage, 0) + count
    files = [f for e in entries for f in (e["path"], e["failures_path"]) if f]
    return {
        **settings,
        **extra,
        "format_version": FORMAT_VERSION,
        "samples": sum(e["samples"] for e in entries),
        "rows": sum(e["rows"] for e in entries),
        "failures": sum(e["failures"] for e in entries),
        "metadata_folded": sum(e["metadata_folded"] for e in entries),
        "failed_by_stage": failed_by_stage,
        "parts": entries,
        "files": files,
    }
