"""Opening an output folder: refuse, clear or resume; the run record; the manifest last.

The run record `OUT/_job.json` says which job owns the folder (its kind),
the settings it was written with (compared on resume) and the names it
owns. Those names, the done-markers' files and the previous manifest's files
are all `--overwrite` ever deletes: a user's own files in the folder stay.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Callable

from clipbeam.errors import FieldError
from clipbeam.layout.lease import DEFAULT_TIMEOUT, LEASE_FILE, Lease
from clipbeam.layout.ledger import UnitLedger, inside
from clipbeam.storage import (
    check_writable,
    exists,
    get_fs,
    is_temporary,
    join,
    list_names,
    read_json,
    remove_if_present,
    remove_temporaries,
    write_json,
)

LOG = logging.getLogger(__name__)

RUN_RECORD = "_job.json"


class Mode(enum.Enum):
    REFUSE = "refuse"   # an output of this kind is there: exit 2
    CLEAR = "clear"     # --overwrite: delete the names the job owns, start over
    RESUME = "resume"   # keep the done units when the settings are the same

    @classmethod
    def from_flags(cls, overwrite: bool) -> "Mode":
        return cls.CLEAR if overwrite else cls.RESUME


def _files_listed(manifest: dict) -> list[str]:
    return list(manifest.get("files", []))


@dataclass(frozen=True)
class OutputKind:
    """What one job writes. `name` goes into the run record and the manifest's "format"."""

    name: str
    manifest: str = "manifest.json"
    markers: str = "_done"
    scratch: tuple[str, ...] = ()  # globs of the files the job writes in its scratch folders (fragments, temp work)
    manifest_files: Callable[[dict], list[str]] = _files_listed  # the files a manifest lists
    legacy_records: tuple[str, ...] = ()  # run records of older versions: they mark the folder as ours


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


@dataclass
class OutputFolder:
    """An opened output folder: this run holds its lease until commit() or close()."""

    url: str
    kind: OutputKind
    settings: dict
    storage_options: dict | None
    lease: Lease
    previous_manifest: dict | None = None
    owned: list[str] = field(default_factory=list)

    def path(self, *names: str) -> str:
        return join(self.url, *names)

    @property
    def ledger(self) -> UnitLedger:
        """The done-markers, as a value that Beam workers can carry."""
        return UnitLedger(self.url, self.kind.markers, self.storage_options, self.lease.owner)

    def done_units(self) -> dict[str, dict]:
        return self.ledger.done()

    def mark_done(self, unit: str, record: dict, files: list[str] = ()) -> dict:
        return self.ledger.mark_done(unit, record, files)

    def claim(self, names: list[str]) -> None:
        """Record names this job is about to write, so that --overwrite may delete them later."""
        new = [n for n in names if n not in self.owned]
        if new:
            self.owned.extend(new)
            self._write_record()

    def _write_record(self) -> None:
        record = {"kind": self.kind.name, "settings": self.settings,
                  "fingerprint": settings_fingerprint(self.settings), "owned": self.owned}
        write_json(self.path(RUN_RECORD), record, self.storage_options)

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (last), after checking this run still holds the lease; release it."""
        self.lease.check()
        manifest = {"format": self.kind.name, **manifest}
        write_json(self.path(self.kind.manifest), manifest, self.storage_options)
        self.close()
        return manifest

    def close(self) -> None:
        self.lease.release()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_if_present(url: str, storage_options: dict | None) -> dict | None:
    if not exists(url, storage_options):
        return None
    try:
        value = read_json(url, storage_options)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _check_ownership(url: str, kind: OutputKind, record: dict | None, manifest: dict | None,
                     storage_options: dict | None) -> bool:
    """True when the folder holds this kind's output; UsageError when it holds anything else."""
    if record is not None and record.get("kind") != kind.name:
        raise FieldError("output", f"{url} holds a {record.get('kind')} output, not {kind.name}; "
                         "choose another {field}")
    if record is not None or (manifest is not None and manifest.get("format") == kind.name):
        return True
    others = [n for n in list_names(url, storage_options)  # a lease, or temp files clipbeam left, are no output
              if n != LEASE_FILE and not is_temporary(n)]
    if any(name in others for name in kind.legacy_records):
        return True
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FieldError("output", f"{url} is not empty ({shown}) and holds no {kind.name} output; "
                         "choose an empty or new {field}")
    return False


def _check_settings(url: str, record: dict | None, settings: dict) -> None:
    if record is None:
        raise FieldError("overwrite", f"{url} was written by an older clipbeam without a run record; "
                         "use {field} to start over or another {output}", ("output",))
    if record.get("fingerprint") == settings_fingerprint(settings):
        return
    before = record.get("settings", {})
    details = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed_keys(before, settings))
    raise FieldError("overwrite", f"{url} was written with other settings ({details}); "
                     "use {field} to start over or another {output}", ("output",))


def clear_owned(out: OutputFolder, record: dict | None) -> None:
    """--overwrite: delete the manifest, the names the job listed, its markers and scratch; nothing else."""
    kind, so = out.kind, out.storage_options
    names = set(record.get("owned", []) if record else [])
    if out.previous_manifest:
        names.update(kind.manifest_files(out.previous_manifest))
    for marker in UnitLedger(out.url, kind.markers, so).markers().values():
        names.update(marker.get("files", []))
    outside = {name for name in names if not inside(name)}
    if outside:
        LOG.warning("--overwrite: not deleting %d listed name(s) outside %s: %s", len(outside), out.url,
                    ", ".join(sorted(map(str, outside))[:3]))
    names -= outside
    names.update(_scratch_names(out))
    for name in sorted(names):
        remove_if_present(out.path(name), so)
    parents = {posixpath.dirname(n) for n in names}
    parents |= {posixpath.dirname(p) for p in parents}  # _fragments/part-00001/x -> _fragments too
    for parent in sorted((p for p in parents if p), key=len, reverse=True):
        remove_temporaries(out.path(parent), so)
        if not list_names(out.path(parent), so):
            remove_if_present(out.path(parent), so, recursive=True)
    LOG.info("--overwrite: removed %d names %s owned in %s", len(names), kind.name, out.url)


def _scratch_names(out: OutputFolder) -> list[str]:
    """The job's own files outside the listed ones: the done-markers its ledger reads, the files its
    scratch globs match, old run records. Folders are never removed whole: a folder goes only when
    it is empty once these are gone, so a file a user keeps there survives --overwrite."""
    kind, so = out.kind, out.storage_options
    names = [f"{kind.markers}/{unit}.json" for unit in UnitLedger(out.url, kind.markers, so).markers()]
    fs, root = get_fs(out.url, so)
    fs.invalidate_cache()  # what the workers wrote since this process last listed
    root = root.rstrip("/")
    for pattern in kind.scratch:
        names += [path[len(root) + 1:] for path in fs.glob(f"{root}/{pattern}") if not fs.isdir(path)]
    return names + [name for name in kind.legacy_records if exists(out.path(name), so)]


def open_output(url: str, kind: OutputKind, settings: dict, mode: Mode, storage_options: dict | None = None,
                lease_timeout: float = DEFAULT_TIMEOUT, keep_manifest: bool = False) -> OutputFolder:
    """Open `url` for a run of `kind`: check ownership and settings, take the lease, drop the manifest.

    With `keep_manifest` (a run that only adds to a complete output, such as `index --append`) the
    previous manifest stays until commit() replaces it in one atomic rename: readers see the old
    complete output, then the new one, never a folder without a manifest.

    Raises UsageError (exit 2, nothing touched) for a foreign non-empty folder,
    an existing output under Mode.REFUSE, other settings under Mode.RESUME, or a
    live lease of another run.
    """
    record = _read_if_present(join(url, RUN_RECORD), storage_options)
    manifest = _read_if_present(join(url, kind.manifest), storage_options)
    ours = _check_ownership(url, kind, record, manifest, storage_options)
    if ours and mode is Mode.REFUSE:
        raise FieldError("overwrite", f"{url} already holds a {kind.name} output; pass {{field}} to replace it")
    if ours and mode is Mode.RESUME:
        _check_settings(url, record, settings)
    check_writable(url, storage_options)
    lease = Lease(url, storage_options, timeout=lease_timeout).acquire()
    try:
        out = OutputFolder(url, kind, settings, storage_options, lease, previous_manifest=manifest,
                           owned=list(record.get("owned", [])) if record and mode is Mode.RESUME else [])
        if not keep_manifest or mode is Mode.CLEAR:
            remove_if_present(out.path(kind.manifest), storage_options)  # the output stops being "complete" first
        if ours and mode is Mode.CLEAR:
            clear_owned(out, record)
        out._write_record()
    except BaseException:
        lease.release()
        raise
    return out
