"""Done-markers: which units of a job are finished, and which files each one wrote.

A unit (an embed part, an index shard, a render) is done when its marker
`OUT/<folder>/<unit>.json` exists and every file it lists is still there. The
marker is written last, after the unit's files, so a unit killed halfway is
simply redone. The ledger is a small frozen value so that Beam workers can
carry it and mark their own units done; when it carries the run's lease
owner, each mark first checks that this run still holds the folder.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from clipbeam.layout.lease import check_lease
from clipbeam.layout.owned import inside, remove_owned
from clipbeam.storage import join, list_names, read_json, write_json

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitLedger:
    root: str
    folder: str = "_done"
    storage_options: dict | None = None
    lease_owner: str | None = None
    check: Callable[[str, dict], bool] | None = None  # the job's own test of a marker's fields (OutputKind)

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
        """Every valid marker, by unit name (whether or not its files are still there)."""
        return self.scan()[0]

    def scan(self) -> tuple[dict[str, dict], list[str]]:
        """(valid markers by unit, units whose marker is not valid). Markers are files anyone who can
        write the folder can edit: one that is torn, lists a file outside the folder, or lacks a field
        of the right type (`check`) is not one this ledger wrote, so its unit is not done and its files
        are untouched."""
        found, invalid = {}, []
        for name in list_names(join(self.root, self.folder), self.storage_options):
            if not name.endswith(".json"):
                continue
            unit = name[: -len(".json")]
            try:
                marker = read_json(join(self.root, self.folder, name), self.storage_options)
            except (OSError, ValueError):
                marker = None  # torn, vanished or a folder: the unit is not done
            if self._valid(unit, marker):
                found[unit] = marker
            else:
                invalid.append(unit)
        return found, invalid

    def _valid(self, unit: str, marker: object) -> bool:
        if not isinstance(marker, dict):
            return False
        files = marker.setdefault("files", [])
        if not isinstance(files, list) or not all(inside(f) for f in files):
            return False
        return self.check is None or self.check(unit, marker)

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

    def drop_invalid(self) -> list[str]:
        """Remove the markers that are not valid (their units are redone); returns those units."""
        invalid = self.scan()[1]
        if invalid:
            LOG.warning("%s: %d done-marker(s) not valid, their units will be redone: %s",
                        join(self.root, self.folder), len(invalid), ", ".join(invalid[:3]))
            self.forget(invalid)
        return invalid

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


def has_fields(record: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]]) -> bool:
    """Whether `record` has every one of `fields` with a value of its type (bool is no int here)."""
    for name, kind in fields.items():
        value = record.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            return False
    return True


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
