"""A lease on an output folder, so that two runs never write into one folder at once.

The lease is a small JSON file (`OUT/_lease.json`: owner, host, pid, start,
heartbeat) created at start with an exclusive write: O_EXCL on local disks, a
conditional PUT (`If-None-Match: *`) on S3 and stores that support it. The
submitting process refreshes the heartbeat from a background thread, and
every commit (a done-marker, the manifest) first checks that the lease is
still its own. A second run refuses while the lease is live; a lease whose
heartbeat is older than the timeout, or whose process is gone from this host,
is stale and is taken over with a warning.

Best effort where stores lack conditional writes (and for the heartbeat
itself, which is a plain overwrite): two runs that race within one round trip
can both believe they won. The check before every commit then makes the
loser fail with "another run took over" instead of mixing outputs silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

from clipbeam.errors import LeaseLost, UsageError
from clipbeam.storage import create_exclusive, get_fs, join, remove_if_present, write_json

LOG = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
# Seconds without a heartbeat after which a lease counts as abandoned (a run killed with -9).
DEFAULT_TIMEOUT = float(os.environ.get("CLIPBEAM_LEASE_TIMEOUT", "120"))


class LeaseHeld(UsageError):
    """Another live run holds the output folder (exit 2: nothing was touched)."""


class LeaseInvalid(UsageError):
    """The lease's name holds something no clipbeam run wrote (exit 2: the line says what to remove)."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float


def read_lease(folder: str, storage_options: dict | None) -> LeaseInfo | None:
    """The lease now in `folder`, or None (none there, or not a valid lease)."""
    return inspect_lease(folder, storage_options)[0]


def inspect_lease(folder: str, storage_options: dict | None) -> tuple[LeaseInfo | None, str | None]:
    """(the lease, None), (None, None) when there is none or it is torn (an unparseable file: a run
    killed between creating and writing it), or (None, what is wrong) when the name holds something
    that no run of clipbeam wrote: a folder, or fields of the wrong type."""
    fs, path = get_fs(join(folder, LEASE_FILE), storage_options)
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        return None, "a folder"
    except OSError as exc:
        return None, f"unreadable: {exc.__class__.__name__}"
    try:
        value = json.loads(data)
    except ValueError:
        return None, None
    types = {"owner": str, "host": str, "pid": int, "started": (int, float), "heartbeat": (int, float)}
    if not isinstance(value, dict) or set(value) != set(types) or any(
            not isinstance(value[k], t) or isinstance(value[k], bool) for k, t in types.items()):
        return None, "fields missing or of the wrong type"
    if not all(math.isfinite(value[k]) for k in ("started", "heartbeat")):
        return None, "a time that is not a number"
    return LeaseInfo(**value), None


def check_lease(folder: str, owner: str, storage_options: dict | None) -> None:
    """Raise LeaseLost unless `owner` still holds the lease of `folder` (called before each commit)."""
    current = read_lease(folder, storage_options)
    if current is None or current.owner != owner:
        holder = current.owner if current else "nobody"
        raise LeaseLost(f"{folder}: this run's lease was taken over (now held by {holder}); "
                        "its results are not committed")


def _process_gone(info: LeaseInfo) -> bool:
    """True when the lease names a process of this host that no longer runs."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """Acquire with `acquire()`, check with `check()`, give back with `release()`."""

    def __init__(self, folder: str, storage_options: dict | None, timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.storage_options = storage_options
        self.timeout = timeout
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return join(self.folder, LEASE_FILE)

    def _info(self) -> LeaseInfo:
        return LeaseInfo(self.owner, socket.gethostname(), os.getpid(), self._started, self._clock())

    def acquire(self, replace_invalid: bool = False) -> "Lease":
        """Take the lease, taking over a stale one; LeaseHeld while another run's is live.

        A lease that is not valid (a folder, wrong fields, a heartbeat further in the future than
        the timeout) is LeaseInvalid, naming the file to remove; `replace_invalid` (--overwrite)
        removes it instead."""
        for _ in range(3):
            if create_exclusive(self.url, json.dumps(asdict(self._info())).encode(), self.storage_options):
                break
            current, problem = inspect_lease(self.folder, self.storage_options)
            age = self._clock() - current.heartbeat if current is not None else 0.0
            if current is not None and age < -self.timeout and not _process_gone(current):
                problem = f"its heartbeat is {-age:.0f}s in the future"
            if problem is not None:
                self._invalid(problem, replace_invalid)
                continue
            if current is None:
                remove_if_present(self.url, self.storage_options)  # unreadable: a torn write of a dead run
                continue
            if age <= self.timeout and not _process_gone(current):
                raise LeaseHeld(f"{self.folder} is being written by another run ({current.owner}, heartbeat "
                                f"{max(age, 0):.0f}s ago); wait for it, or rerun "
                                f"{self.timeout - max(age, 0):.0f}s after it died")
            LOG.warning("taking over the stale lease of %s on %s (no heartbeat for %.0fs)",
                        current.owner, self.folder, age)
            remove_if_present(self.url, self.storage_options)
        else:
            raise LeaseHeld(f"{self.folder}: could not take the lease (another run keeps taking it)")
        self.check()  # a racing taker may have replaced ours between create and now
        self._thread = threading.Thread(target=self._beat, name="clipbeam-lease", daemon=True)
        self._thread.start()
        return self

    def _invalid(self, problem: str, replace: bool) -> None:
        if not replace:
            raise LeaseInvalid(f"{self.url} is not a valid lease ({problem}); if no clipbeam run is writing "
                               f"{self.folder}, remove it and rerun (or rerun with --overwrite)")
        LOG.warning("--overwrite: removing %s, which is not a valid lease (%s)", self.url, problem)
        remove_if_present(self.url, self.storage_options, recursive=True)

    def check(self) -> None:
        check_lease(self.folder, self.owner, self.storage_options)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout / 4, 0.05)):
            current = read_lease(self.folder, self.storage_options)
            if current is None or current.owner != self.owner:
                return  # lost: the next check() says so
            write_json(self.url, asdict(self._info()), self.storage_options)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        current = read_lease(self.folder, self.storage_options)
        if current is not None and current.owner == self.owner:
            remove_if_present(self.url, self.storage_options)
