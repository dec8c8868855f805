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


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float


def read_lease(folder: str, storage_options: dict | None) -> LeaseInfo | None:
    """The lease now in `folder`, or None (none there, or unreadable: a half-gone file)."""
    fs, path = get_fs(join(folder, LEASE_FILE), storage_options)
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as handle:
            return LeaseInfo(**json.loads(handle.read()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


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

    def acquire(self) -> "Lease":
        """Take the lease, taking over a stale one; LeaseHeld while another run's is live."""
        for _ in range(3):
            if create_exclusive(self.url, json.dumps(asdict(self._info())).encode(), self.storage_options):
                break
            current = read_lease(self.folder, self.storage_options)
            if current is None:
                remove_if_present(self.url, self.storage_options)  # unreadable: a torn write of a dead run
                continue
            age = self._clock() - current.heartbeat
            if age <= self.timeout and not _process_gone(current):
                raise LeaseHeld(f"{self.folder} is being written by another run ({current.owner}, heartbeat "
                                f"{age:.0f}s ago); wait for it, or rerun {self.timeout - age:.0f}s after it died")
            LOG.warning("taking over the stale lease of %s on %s (no heartbeat for %.0fs)",
                        current.owner, self.folder, age)
            remove_if_present(self.url, self.storage_options)
        else:
            raise LeaseHeld(f"{self.folder}: could not take the lease (another run keeps taking it)")
        self.check()  # a racing taker may have replaced ours between create and now
        self._thread = threading.Thread(target=self._beat, name="clipbeam-lease", daemon=True)
        self._thread.start()
        return self

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
