"""One sample's image bytes, from where the corpus keeps them.

Search results are only useful when their pictures can be shown, and a corpus
of tar shards on S3 must not be downloaded to show ten thumbnails. `clipbeam
embed` records where each image member lies inside its (uncompressed) shard,
so a tar sample costs one range read; manifest rows that name a file and
folder samples have that file as their `source`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, Mapping

from clipbeam import storage
from clipbeam.corpus.plan import MANIFEST_SUFFIXES, TAR_SUFFIXES


class ImageUnavailable(LookupError):
    """The row does not say where its image bytes are, or they are no longer there."""


class ImageTooLarge(ImageUnavailable):
    """The bytes the row points to are over the caller's cap (they are not read)."""


class ImageChanged(ImageUnavailable):
    """The bytes there now are not the ones that were embedded (their sha256 differs)."""


def fetch_image(row: Mapping[str, Any], storage_options: dict | None = None, max_bytes: int | None = None,
                sha256: str | None = None) -> bytes:
    """The image bytes of an embeddings or id-table row (`source`, `source_offset`, `source_size`).

    Tar rows: one range read of `source_size` bytes at `source_offset`.
    Manifest rows naming a file, and folder rows: the file at `source`, if it is a regular file.
    Raises ImageUnavailable when neither applies or the bytes cannot be read, ImageTooLarge over
    `max_bytes` (before reading), and ImageChanged when `sha256` (the embedded bytes') differs:
    a corpus file replaced since, by another file or by a link to one.
    """
    source = row.get("source")
    if not source:
        raise ImageUnavailable("the row has no source")
    offset, size = row.get("source_offset"), row.get("source_size")
    lower = source.lower()
    if offset is None or size is None:
        if lower.endswith(TAR_SUFFIXES):
            raise ImageUnavailable(f"no byte offset recorded for this sample of {source} (a compressed shard, "
                                   "or embeddings older than format 2: embed the corpus again from scratch)")
        if lower.endswith(MANIFEST_SUFFIXES):
            raise ImageUnavailable(f"the image bytes are stored inside the manifest table {source}")
        offset, size = None, _file_size(source, storage_options)
    elif offset < 0 or size < 0:
        raise ImageUnavailable(f"invalid byte range {offset}+{size} in {source}")
    if max_bytes is not None and size is not None and size > max_bytes:
        raise ImageTooLarge(f"{source}: the image is {size} bytes, over the limit of {max_bytes}")
    data = _read(source, storage_options, None if offset is None else int(offset),
                 size if size is not None else max_bytes)
    if size is None and max_bytes is not None and len(data) > max_bytes:  # a store that told no size
        raise ImageTooLarge(f"{source}: the image is over the limit of {max_bytes} bytes")
    if size is not None and len(data) != size:
        raise ImageChanged(f"{source} ends before byte {(offset or 0) + size}: it changed since it was embedded")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ImageChanged(f"{source} holds other bytes than were embedded: the corpus changed since")
    return data


def _file_size(url: str, storage_options: dict | None) -> int | None:
    """The size of the file at `url` (None where the store tells none); ImageUnavailable unless it is a
    regular file (never a FIFO or device)."""
    try:
        fs, path = storage.get_fs(url, storage_options)
        info = fs.info(path)
    except FileNotFoundError:
        raise ImageUnavailable(f"{url} no longer exists") from None
    except OSError as exc:
        raise ImageUnavailable(f"cannot read {url}: {exc.__class__.__name__}: {exc}") from None
    if info.get("type") != "file" or (getattr(fs, "local_file", False) and not stat.S_ISREG(os.stat(path).st_mode)):
        raise ImageUnavailable(f"{url} is not a regular file")
    return None if info.get("size") is None else int(info["size"])


def _read(url: str, storage_options: dict | None, start: int | None, size: int | None) -> bytes:
    """`size` bytes from `start` (a range read), or the file's first `size` + 1 bytes (a file that grew
    since it was measured costs no more; `size` None: all of it)."""
    try:
        if start is not None:
            return storage.read_bytes(url, storage_options, start, size)
        with storage.open_input(url, storage_options) as handle:
            return handle.read(-1 if size is None else size + 1)
    except FileNotFoundError:
        raise ImageUnavailable(f"{url} no longer exists") from None
    except OSError as exc:
        raise ImageUnavailable(f"cannot read {url}: {exc.__class__.__name__}: {exc}") from None
