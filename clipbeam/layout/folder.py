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
from clipbeam.layout.ledger import UnitLedger, has_fields
from clipbeam.layout.owned import inside, link_on_the_way, refuse_links, remove_owned, remove_owned_temporaries
from clipbeam.storage import check_writable, exists, get_fs, is_temporary, join, list_names, read_json, write_json

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
    valid_marker: Callable[[str, dict], bool] | None = None  # the job's test of a done-marker's fields

    def own_folders(self) -> list[str]:
        """The folders the job writes in without claiming names there: its markers and scratch folders."""
        return sorted({self.markers, *(pattern.split("/", 1)[0] for pattern in self.scratch)})


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
    notes: dict = field(default_factory=dict)  # what a job keeps in its run record between runs

    def path(self, *names: str) -> str:
        return join(self.url, *names)

    @property
    def ledger(self) -> UnitLedger:
        """The done-markers, as a value that Beam workers can carry."""
        return UnitLedger(self.url, self.kind.markers, self.storage_options, self.lease.owner, self.kind.valid_marker)

    def done_units(self) -> dict[str, dict]:
        return self.ledger.done()

    def mark_done(self, unit: str, record: dict, files: list[str] = ()) -> dict:
        return self.ledger.mark_done(unit, record, files)

    def claim(self, names: list[str]) -> None:
        """Record names this job is about to write, so that --overwrite may delete them later."""
        new = [n for n in names if n not in self.owned]
        refuse_links(self.url, new)
        if new:
            self.owned.extend(new)
            self._write_record()

    def note(self, key: str, value: object) -> None:
        """Keep `value` in the run record (read back as `notes[key]` by a resumed run; --overwrite drops it)."""
        if self.notes.get(key) != value:
            self.notes[key] = value
            self._write_record()

    def _write_record(self) -> None:
        record = {"kind": self.kind.name, "settings": self.settings,
                  "fingerprint": settings_fingerprint(self.settings), "owned": self.owned, "notes": self.notes}
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


RECORD_FIELDS = {"kind": str}
RECORD_OPTIONAL = {"settings": dict, "fingerprint": str, "owned": list, "notes": dict}


def _read_record(url: str, mode: Mode, storage_options: dict | None) -> tuple[dict | None, bool]:
    """(the run record or None, whether the name holds anything). One that is not valid is exit 2
    naming it, except under --overwrite, which starts over without it."""
    path = join(url, RUN_RECORD)
    if not exists(path, storage_options):
        return None, False
    record = _read_if_present(path, storage_options)
    if (record is not None and has_fields(record, RECORD_FIELDS)
            and all(isinstance(record.get(k), (t, type(None))) for k, t in RECORD_OPTIONAL.items())
            and all(isinstance(name, str) for name in record.get("owned") or [])):
        return record, True
    if mode is not Mode.CLEAR:
        raise FieldError("overwrite", f"{path} is not a valid run record; remove it and rerun, or rerun with "
                                      "{field} to start over")
    LOG.warning("--overwrite: %s is not a valid run record; starting over without it", path)
    return None, True


def _manifest_names(kind: OutputKind, manifest: dict) -> list[str]:
    """The names a previous manifest lists; none from one too malformed to read (it is replaced)."""
    try:
        return [name for name in kind.manifest_files(manifest) if isinstance(name, str)]
    except (AttributeError, KeyError, TypeError, ValueError):
        LOG.warning("the previous %s is malformed: deleting none of the names it lists", kind.manifest)
        return []


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
    before = record.get("settings") or {}
    details = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed_keys(before, settings))
    raise FieldError("overwrite", f"{url} was written with other settings ({details}); "
                     "use {field} to start over or another {output}", ("output",))


def clear_owned(out: OutputFolder, record: dict | None) -> None:
    """--overwrite: delete the manifest, the names the job listed, its markers and scratch; nothing else."""
    kind, so = out.kind, out.storage_options
    names = set(record.get("owned") or [] if record else [])
    if out.previous_manifest:
        names.update(_manifest_names(kind, out.previous_manifest))
    for marker in UnitLedger(out.url, kind.markers, so, check=kind.valid_marker).markers().values():
        names.update(marker.get("files", []))
    outside = {name for name in names if not inside(name)}
    if outside:
        LOG.warning("--overwrite: not deleting %d listed name(s) outside %s: %s", len(outside), out.url,
                    ", ".join(sorted(map(str, outside))[:3]))
    names -= outside
    names.update(_scratch_names(out))
    for name in sorted(names):
        remove_owned(out.url, name, so)
    parents = {posixpath.dirname(n) for n in names}
    parents |= {posixpath.dirname(p) for p in parents}  # _fragments/part-00001/x -> _fragments too
    parents |= set(kind.own_folders())  # a link there goes even when nothing was found through it
    for parent in sorted((p for p in parents if p), key=len, reverse=True):
        if link_on_the_way(out.url, posixpath.join(parent, "x")) == parent:  # the job's folder is a link: the
            remove_owned(out.url, parent, so)  # link goes, never what it points to, and a real folder follows
            continue
        remove_owned_temporaries(out.url, parent, so)
        if not list_names(out.path(parent), so):
            remove_owned(out.url, parent, so, recursive=True)
    LOG.info("--overwrite: removed %d names %s owned in %s", len(names), kind.name, out.url)


def _scratch_names(out: OutputFolder) -> list[str]:
    """The job's own files outside the listed ones: every `*.json` in its markers folder (valid or not:
    the ledger treats each as a marker), the files its scratch globs match, old run records. Folders are
    never removed whole: a folder goes only when it is empty once these are gone, so a file a user keeps
    there survives --overwrite."""
    kind, so = out.kind, out.storage_options
    names = [f"{kind.markers}/{name}" for name in list_names(out.path(kind.markers), so) if name.endswith(".json")]
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
    record, recorded = _read_record(url, mode, storage_options)
    manifest = _read_if_present(join(url, kind.manifest), storage_options)
    if recorded and record is None and (manifest or {}).get("format") != kind.name:
        manifest = None  # the run record was not valid: a manifest of another format is no guide to names
    ours = (recorded and record is None) or _check_ownership(url, kind, record, manifest, storage_options)
    if ours and mode is Mode.REFUSE:
        raise FieldError("overwrite", f"{url} already holds a {kind.name} output; pass {{field}} to replace it")
    if ours and mode is Mode.RESUME:
        _check_settings(url, record, settings)
    check_writable(url, storage_options)
    lease = Lease(url, storage_options, timeout=lease_timeout).acquire(replace_invalid=mode is Mode.CLEAR)
    try:
        out = OutputFolder(url, kind, settings, storage_options, lease, previous_manifest=manifest,
                           owned=list(record.get("owned") or []) if record and mode is Mode.RESUME else [],
                           notes=dict(record.get("notes") or {}) if record and mode is Mode.RESUME else {})
        if not keep_manifest or mode is Mode.CLEAR:
            remove_owned(url, kind.manifest, storage_options)  # the output stops being "complete" first
        if ours and mode is Mode.CLEAR:
            if recorded and record is None:
                remove_owned(url, RUN_RECORD, storage_options, recursive=True)
            clear_owned(out, record)
        refuse_links(url, [posixpath.join(folder, "x") for folder in kind.own_folders()])  # never written through
        if not (ours and mode is Mode.CLEAR):
            out.ledger.drop_invalid()
        out._write_record()
    except BaseException:
        lease.release()
        raise
    return out
