"""One sample's image bytes, from where the corpus keeps them.

Search results are only useful when their pictures can be shown, and a corpus
of tar shards on S3 must not be downloaded to show ten thumbnails. `clipbeam
embed` records where each image member lies inside its (uncompressed) shard,
so a tar sample costs one range read; manifest rows that name a file and
folder samples have that file as their `source`.
"""

from __future__ import annotations

from typing import Any, Mapping

from clipbeam import storage
from clipbeam.corpus.plan import MANIFEST_SUFFIXES, TAR_SUFFIXES


class ImageUnavailable(LookupError):
    """The row does not say where its image bytes are, or they are no longer there."""


def fetch_image(row: Mapping[str, Any], storage_options: dict | None = None) -> bytes:
    """The image bytes of an embeddings or id-table row (`source`, `source_offset`, `source_size`).

    Tar rows: one range read of `source_size` bytes at `source_offset`.
    Manifest rows naming a file, and folder rows: the file at `source`.
    Raises ImageUnavailable when neither applies or the bytes cannot be read.
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
        return _read(source, storage_options)
    if offset < 0 or size < 0:
        raise ImageUnavailable(f"invalid byte range {offset}+{size} in {source}")
    data = _read(source, storage_options, int(offset), int(size))
    if len(data) != size:
        raise ImageUnavailable(f"{source} ends before byte {offset + size}: the shard changed since it was embedded")
    return data


def _read(url: str, storage_options: dict | None, start: int | None = None, size: int | None = None) -> bytes:
    try:
        return storage.read_bytes(url, storage_options, start, size)
    except FileNotFoundError:
        raise ImageUnavailable(f"{url} no longer exists") from None
    except OSError as exc:
        raise ImageUnavailable(f"cannot read {url}: {exc.__class__.__name__}: {exc}") from None
