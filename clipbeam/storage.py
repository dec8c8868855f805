"""fsspec helpers shared by every job: URL expansion, atomic writes, JSON.

All I/O goes through fsspec so that local paths, s3://, gs:// and memory://
behave the same. Writes go to a temporary name and are renamed into place, so a
reader never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import re
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from clipbeam.errors import FieldError, UsageError

LOG = logging.getLogger(__name__)

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def parse_storage_options(text: str | None) -> dict:
    """Parse the --storage-options JSON object (None or '' gives {})."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FieldError("storage_options", f"{{field}} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FieldError("storage_options", "{field} must be a JSON object")
    return value


def get_fs(url: str, storage_options: dict | None = None):
    """Return (filesystem, path) for a URL or local path.

    An unknown protocol, a missing filesystem package or a --storage-options
    key that the filesystem does not take is a UsageError (one line), not the
    ValueError/ImportError/TypeError that fsspec raises, sometimes only at the
    first request.
    """
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise UsageError(f"cannot open {url}: {exc}") from None
    except TypeError as exc:
        raise FieldError("storage_options", f"{{field}} do not suit {url}: {exc}") from None
    _check_option_keys(type(fs), tuple(sorted(storage_options or {})))
    return fs, path


# Keys every fsspec filesystem takes (AbstractFileSystem / DirCache), whatever its own __init__ names.
_COMMON_OPTION_KEYS = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
                       "asynchronous", "loop"}
# Filesystems whose options are checked up front, with where their unnamed options go. s3fs hands
# them to aiobotocore's AioSession, which fails with a TypeError only at the first request. Others
# are not checked: HTTP passes unnamed options on to every request (headers, auth), local and memory
# filesystems ignore options (one --storage-options serves both sides of `--input s3://... --output
# /local`), and for the rest clipbeam cannot tell a typo from an option a backend takes.
_CHECKED_PROTOCOLS = {"s3": "aiobotocore.session:AioSession", "s3a": "aiobotocore.session:AioSession"}
# Object stores: no real folders, and a makedirs at the top would create a bucket.
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss"}


@functools.lru_cache(maxsize=256)
def _check_option_keys(fs_class: type, keys: tuple[str, ...]) -> None:
    """Raise UsageError for --storage-options keys that `fs_class` does not take (checked once per class)."""
    protocols = fs_class.protocol if isinstance(fs_class.protocol, (tuple, list)) else (fs_class.protocol,)
    receiver = next((_CHECKED_PROTOCOLS[p] for p in protocols if p in _CHECKED_PROTOCOLS), None)
    if not keys or receiver is None:
        return
    module, name = receiver.split(":")
    known = set(_COMMON_OPTION_KEYS) | _named_parameters(getattr(importlib.import_module(module), name))
    for klass in fs_class.__mro__:
        known |= _named_parameters(klass)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise FieldError("storage_options", f"unknown {{field}} key {unknown[0]!r} for {protocols[0]}:// "
                         f"(known: {', '.join(sorted(known))})")


def _named_parameters(klass: type) -> set[str]:
    init = klass.__dict__.get("__init__")
    if init is None:
        return set()
    params = inspect.signature(init).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _is_bucket_store(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(_BUCKET_PROTOCOLS & set(protocols))


def make_parents(fs, path: str) -> None:
    """Create the folder that will hold `path`, where folders exist; never a bucket."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not _is_bucket_store(fs):
        fs.makedirs(parent, exist_ok=True)


def expand_braces(pattern: str) -> list[str]:
    """Expand brace ranges `{000..009}` (zero padding kept) and lists `{a,b}`, left to right."""
    found = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end():]
    if match.re is _BRACE_RANGE:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        choices = match.group(1).split(",")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def absolute_url(value: str) -> str:
    """Local paths made absolute at parse time: Beam workers run in other
    working directories (and on other machines); URLs are kept as given."""
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def join(base: str, *parts: str) -> str:
    """Join URL or path parts with '/' (fsspec URLs always use '/')."""
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def unstrip(fs, original: str, path: str) -> str:
    """Put the protocol back on a path that fsspec returned without it."""
    return fs.unstrip_protocol(path) if "://" in original else path


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def remove_if_present(url: str, storage_options: dict | None = None, recursive: bool = False) -> bool:
    """Delete a file (or, with recursive, a folder) if it is there; True when something went.

    Stands for the `fs = get_fs(...); if fs.exists(p): fs.rm(p)` sequence, so
    that every job removes things the same way (and a missing name is no error).
    """
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return False
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:  # removed meanwhile by someone else: the outcome is the same
        return False
    return True


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """The sorted entry names (not paths) of a folder; [] when it does not exist.

    The listing cache is dropped first: object stores list what other
    processes (Beam workers) wrote since, not what this process saw before.
    """
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    try:
        if not fs.isdir(path):
            return []
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries})


def require_readable_file(url: str, storage_options: dict | None = None, what: str = "file") -> None:
    """Raise UsageError (one line) unless `url` is an existing file that can be opened."""
    try:
        fs, path = get_fs(url, storage_options)
        if not fs.isfile(path):
            raise UsageError(f"{what} {url} does not exist or is not a file")
        with fs.open(path, "rb") as handle:
            handle.read(1)
    except UsageError:
        raise
    except Exception as exc:  # permissions, bad protocol, bad options
        raise UsageError(f"cannot read {what} {url}: {exc.__class__.__name__}: {exc}") from None


def is_temporary(name: str) -> bool:
    """Whether a file name is one of atomic_open's hidden `.NAME.tmp-*` names (clipbeam's alone)."""
    return name.startswith(".") and ".tmp-" in name


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Write `data` to `url` only if nothing is there yet; False when something was.

    Local disks use O_EXCL; object stores use a conditional write (`If-None-Match: *`,
    which S3, moto and s3fs support). Stores without one fall back to check-then-write,
    which is best effort: two writers racing within one round trip can both succeed.
    """
    fs, path = get_fs(url, storage_options)
    make_parents(fs, path)
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # the store has no exclusive mode
        if fs.exists(path):
            return False
        with atomic_open(url, "wb", storage_options) as handle:
            handle.write(data)
        return True


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb", storage_options: dict | None = None) -> Iterator[Any]:
    """Open `url` for writing under a temporary name; rename on success.

    On failure the temporary file is removed and the final name is untouched;
    a process killed mid-write leaves at most a hidden `.NAME.tmp-*` file.
    """
    fs, path = get_fs(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    make_parents(fs, path)
    name = path.rsplit("/", 1)[-1]
    # A hidden name that keeps no suffix of the final one: globbing readers
    # (`*.parquet`, pyarrow datasets, DuckDB) never pick up a half-written file.
    tmp = (parent + "/" if parent else "") + f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def write_json(url: str, value: Any, storage_options: dict | None = None) -> None:
    """Write JSON atomically (indent 2, sorted keys off: order is meaningful)."""
    data = json.dumps(value, indent=2, default=_json_default).encode("utf-8")
    with atomic_open(url, "wb", storage_options) as handle:
        handle.write(data)


def read_bytes(url: str, storage_options: dict | None = None, start: int | None = None,
               size: int | None = None) -> bytes:
    """A whole file, or `size` bytes from `start` with one range request (one sample inside a tar shard)."""
    fs, path = get_fs(url, storage_options)
    if start is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=start, end=start + (size or 0))


class HashingWriter(io.RawIOBase):
    """A write-only stream that passes bytes on to `handle` and hashes them on the way, so a file's
    SHA-256 is known when it is written, without reading it back."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self._handle = handle
        self._digest = hashlib.sha256()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._handle.write(view)
        self._digest.update(view)
        self._written += len(view)
        return len(view)

    def tell(self) -> int:
        return self._written

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def file_sha256(url: str, storage_options: dict | None = None) -> str:
    """Hex SHA-256 of a file's bytes, streamed in 8 MB chunks (any fsspec URL); FileNotFoundError if missing."""
    digest = hashlib.sha256()
    with open_input(url, storage_options) as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(url: str, storage_options: dict | None = None) -> Any:
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def decode_utf8(data: bytes, url: str, what: str = "file", field: str | None = None) -> str:
    """UTF-8 text (a BOM dropped), or a UsageError naming the first byte that is not (a FieldError
    naming `field` where the file is a field's value, so the CLI names its flag).

    For files a user names on the command line (--prompts): a Latin-1 file is
    one line and exit 2, never a UnicodeDecodeError traceback.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"{url} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        if field is not None:
            raise FieldError(field, "{field} " + problem) from None
        raise UsageError(f"{what} {problem}") from None


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_writable(url: str, storage_options: dict | None = None) -> None:
    """Raise UsageError unless `url` (a folder) can be created and written.

    Creates the folder, writes and removes a probe file; leaves an empty folder
    at most, and nothing where the check fails. Never creates a bucket: on an
    object store a missing bucket (a typo) is a UsageError.
    """
    try:
        fs, path = get_fs(url, storage_options)
    except UsageError:
        raise
    except Exception as exc:  # bad protocol, bad options
        raise UsageError(f"cannot open output {url}: {exc}") from None
    created = not fs.exists(path)
    probe = join(path, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        if fs.exists(path) and not fs.isdir(path):
            raise UsageError(f"output {url} exists and is not a folder")
        if not _is_bucket_store(fs):
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"")
        fs.rm(probe)
    except UsageError:
        raise
    except Exception as exc:
        if created:
            with contextlib.suppress(Exception):
                fs.rm(path, recursive=True)
        if _is_bucket_store(fs) and not _bucket_exists(fs, path):
            bucket = path.strip("/").split("/", 1)[0]
            raise UsageError(f"output {url}: bucket {bucket!r} does not exist (clipbeam never creates buckets)"
                             ) from None
        raise UsageError(f"output {url} is not writable: {exc.__class__.__name__}: {exc}") from None


def _bucket_exists(fs, path: str) -> bool:
    """Asked only after a write failed (a probe can also fail for want of permission to look)."""
    try:
        return bool(fs.exists(path.strip("/").split("/", 1)[0]))
    except Exception as exc:
        LOG.debug("cannot check the bucket of %s: %s", path, exc)
        return True


def local_path(url: str) -> str | None:
    """The local filesystem path for a local URL, else None."""
    if "://" in url and not url.startswith("file://"):
        return None
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def open_input(url: str, storage_options: dict | None = None):
    """Open a file for binary reading through fsspec."""
    return fsspec.open(url, "rb", **(storage_options or {})).open()
