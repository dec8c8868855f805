"""A private local cache for remote checkpoints (open_clip loads from a local path).

A predictable shared path (`/tmp/clipbeam-ckpt-<hash of the URL>`) let any
local user plant a file that a later run would load, and kept serving a
stale copy after the remote object changed. Here copies live under the
user's cache directory (`$CLIPBEAM_CACHE_DIR`, else `$XDG_CACHE_HOME/clipbeam`,
else `~/.cache/clipbeam`) in a folder only its owner can enter (0700), and
are keyed by the URL *and* the object's validator (ETag, else size and
modification time), which is looked up again on every load: a changed object
gets a fresh copy, and the stale one is removed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from clipbeam.errors import UsageError
from clipbeam.storage import get_fs

_VALIDATOR_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "version_id", "VersionId")
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def cache_dir() -> Path:
    """The checkpoint cache folder, created 0700; refused when another user owns it or can write to it."""
    base = os.environ.get("CLIPBEAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clipbeam")
    folder = Path(base) / "checkpoints"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as exc:
        raise UsageError(f"cannot create the checkpoint cache {folder} ({exc.strerror}); set CLIPBEAM_CACHE_DIR"
                         ) from None
    if info.st_uid != os.getuid():
        raise UsageError(f"checkpoint cache {folder} belongs to another user; set CLIPBEAM_CACHE_DIR")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(folder, 0o700)
    return folder


def validator(info: dict) -> str:
    """What identifies this version of a remote object: its ETag (or hash), else size plus mtime."""
    for key in _VALIDATOR_KEYS:
        if info.get(key):
            return f"{key}={str(info[key]).strip(chr(34))}"
    mtime = next((str(info[k]) for k in _MTIME_KEYS if info.get(k) is not None), "")
    return f"size={info.get('size')};mtime={mtime}"


def cached_copy(url: str, storage_options: dict | None = None) -> str:
    """A local path holding the current version of the remote checkpoint `url`, downloaded when needed."""
    fs, path = get_fs(url, storage_options)
    try:
        info = fs.info(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read checkpoint {url}: {exc.__class__.__name__}: {exc}") from None
    folder = cache_dir()
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    version_key = hashlib.sha256(validator(info).encode()).hexdigest()[:16]
    suffix = Path(path).suffix or ".pt"
    local = folder / f"{url_key}-{version_key}{suffix}"
    if local.exists() and local.stat().st_size == info.get("size", local.stat().st_size):
        return str(local)
    tmp = folder / f".{local.name}.{os.getpid()}.part"
    try:
        fs.get(path, str(tmp))
        size = tmp.stat().st_size
        if info.get("size") is not None and size != int(info["size"]):
            raise UsageError(f"checkpoint {url} changed while it was downloaded ({size} != {info['size']} bytes)")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in folder.glob(f"{url_key}-*"):
        if stale != local:
            stale.unlink(missing_ok=True)
    return str(local)
