"""Done-markers: which units of a job are finished, and which files each one wrote.

A unit (an embed part, an index shard, a render) is done when its marker
`OUT/<folder>/<unit>.json` exists and every file it lists is still there. The
marker is written last, after the unit's files, so a unit killed halfway is
simply redone. The ledger is a small frozen value so that Beam workers can
carry it and mark their own units done; when it carries the run's lease
owner, each mark first checks that this run still holds the folder.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterable, Sequence

from clipbeam.layout.lease import check_lease
from clipbeam.layout.owned import inside, remove_owned
from clipbeam.storage import join, list_names, read_json, write_json


@dataclass(frozen=True)
class UnitLedger:
    root: str
    folder: str = "_done"
    storage_options: dict | None = None
    lease_owner: str | None = None

    def marker_url(self, unit: str) -> str:
        return join(self.root, self.folder, f"{unit}.json")

    def mark_done(self, unit: str, record: dict, files: Sequence[str] = ()) -> dict:
        """Record `unit` as finished; `files` are its outputs, relative to the root. Returns the marker."""
        if self.lease_owner is not None:
            check_lease(self.root, self.lease_owner, self.storage_options)
        marker = {"unit": unit, **record, "files": list(files)}
        write_json(self.marker_url(unit), marker, self.storage_options)
        return marker

    def markers(self) -> dict[str, dict]:
        """Every readable marker, by unit name (whether or not its files are still there). A marker that
        lists a file outside the folder is not one this ledger wrote: it is skipped, its files untouched."""
        found = {}
        for name in list_names(join(self.root, self.folder), self.storage_options):
            if not name.endswith(".json"):
                continue
            try:
                marker = read_json(join(self.root, self.folder, name), self.storage_options)
            except (OSError, ValueError):
                continue  # torn or vanished: the unit is not done
            if isinstance(marker, dict) and all(inside(f) for f in marker.get("files", [])):
                found[name[: -len(".json")]] = marker
        return found

    def done(self) -> dict[str, dict]:
        """The markers whose listed files all exist (a unit whose file was deleted is redone)."""
        return self.complete(self.markers())

    def complete(self, markers: dict[str, dict]) -> dict[str, dict]:
        """Those of `markers` whose listed files all exist (for callers that also need the others)."""
        present: dict[str, set[str]] = {}
        for marker in markers.values():
            for parent in {posixpath.dirname(f) for f in marker.get("files", [])}:
                if parent not in present:
                    present[parent] = set(list_names(join(self.root, parent) if parent else self.root,
                                                     self.storage_options))
        return {unit: marker for unit, marker in markers.items()
                if all(posixpath.basename(f) in present[posixpath.dirname(f)] for f in marker.get("files", []))}

    def discard(self, markers: dict[str, dict]) -> None:
        """Delete the files these units' markers list, then the markers (units to redo, or gone)."""
        for marker in markers.values():
            for name in marker.get("files", []):
                remove_owned(self.root, name, self.storage_options)
        self.forget(markers)

    def forget(self, units: Iterable[str]) -> None:
        """Drop the markers of units that will be redone."""
        for unit in units:
            remove_owned(self.root, f"{self.folder}/{unit}.json", self.storage_options)
