"""Reading one planned part into raw samples, or into failure records.

Samples are plain dicts so that they pickle cheaply between Beam stages:
  {"id", "part", "source", "image": bytes, "caption": bytes|str|None, "meta": dict}
plus, for tar samples, "source_offset" and "source_size": where the image
member's bytes lie in an uncompressed shard (None in a compressed one).
Failures are {"id", "part", "source", "stage", "error"}. A part that cannot be
read at all (missing object, truncated tar) yields failure records and never
raises: the run goes on with the other parts.

Tar shards are read as a stream (`tarfile` mode "r|*"); member names are only
ever used as strings, never as paths on disk, so `../x` or `/etc/x` are harmless.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from clipbeam.corpus.manifest_table import choose_columns, read_manifest_table
from clipbeam.corpus.plan import IMAGE_SUFFIXES, PartSpec
from clipbeam.storage import get_fs, join

LOG = logging.getLogger(__name__)

IMAGE_EXTS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
# webdataset's convention: the key is everything up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
_INT64 = 2 ** 63


@dataclass(frozen=True)
class ReadLimits:
    """What a reader refuses to do with hostile input (see README, "Security and failure model").

    max_member_bytes: a tar member, manifest image or folder file larger than
    this fails as a read failure before a byte of it is read (tar bombs, GNU
    sparse members that expand to gigabytes). allow_any_path: let a manifest
    name images outside its own filesystem (another scheme, or an absolute
    local path named by a remote manifest).
    """

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    allow_any_path: bool = False


DEFAULT_LIMITS = ReadLimits()


def failure(part: int, sample_id: str, source: str, stage: str, error: str) -> dict:
    return {"id": sample_id, "part": part, "source": source, "stage": stage, "error": error[:2000]}


def read_part(index: int, spec: PartSpec, storage_options: dict | None, columns=None,
              limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Yield samples and failures of one part; every sample goes out as exactly one of them."""
    if spec.kind == "tar":
        yield from _read_tar(index, spec, storage_options, limits)
    elif spec.kind == "manifest":
        yield from _read_manifest(index, spec, storage_options, columns, limits)
    elif spec.kind == "folder":
        yield from _read_folder(index, spec, storage_options, limits)
    else:  # pragma: no cover - plan_parts never makes another kind
        raise ValueError(f"unknown part kind {spec.kind}")


def _error(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _read_tar(index: int, spec: PartSpec, storage_options: dict | None, limits: ReadLimits) -> Iterator[dict]:
    source = spec.url
    seen: set[str] = set()
    pending: dict | None = None

    def finish(group: dict) -> dict:
        sample_id = f"{spec.label}/{group['key']}"
        if group["key"] in seen:
            return failure(index, sample_id, source, "read", "duplicate key in shard (members not contiguous)")
        seen.add(group["key"])
        if group["error"]:
            return failure(index, sample_id, source, "read", group["error"])
        if group["image"] is None:
            found = ", ".join(sorted(group["exts"])) or "nothing"
            return failure(index, sample_id, source, "read", f"no image member for this key (found: {found})")
        return {
            "id": sample_id,
            "part": index,
            "source": source,
            "image": group["image"],
            "caption": group["caption"],
            "meta": group["meta"],
            "source_offset": group["offset"],
            "source_size": group["size"],
        }

    try:
        fs, path = get_fs(source, storage_options)
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            # Offsets into a compressed stream cannot be range-read, so only plain tars record them.
            plain = getattr(tar.fileobj, "comptype", None) == "tar"
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if match is None:
                    yield failure(index, f"{spec.label}/{member.name}", source, "read",
                                  "tar member name has no key.extension form")
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if pending is not None and pending["key"] != key:
                    yield finish(pending)
                    pending = None
                if pending is None:
                    pending = {"key": key, "image": None, "caption": None, "meta": {}, "exts": set(),
                               "offset": None, "size": None, "error": None}
                _add_member(pending, tar, member, ext, plain, limits.max_member_bytes)
            if pending is not None:
                yield finish(pending)
                pending = None
    except Exception as exc:  # missing object, truncated or corrupt tar, network errors
        message = _error(exc)
        if pending is not None:
            yield failure(index, f"{spec.label}/{pending['key']}", source, "read", f"shard unreadable: {message}")
        else:
            yield failure(index, f"{spec.label}/<shard>", source, "read", f"shard unreadable: {message}")
        LOG.warning("shard %s could not be read to the end: %s", source, message)


def _add_member(group: dict, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, plain: bool,
                max_bytes: int) -> None:
    """Read one tar member into its sample's group.

    What is wrong with one member (over the size cap, unparseable metadata)
    marks only its own sample; only errors of the tar stream itself (a
    truncated or corrupt shard) reach the caller. The size is checked from the
    header before a byte is read: a GNU sparse member or a compressed bomb
    never reaches memory, and the stream skips its data in bounded blocks.
    """
    group["exts"].add(ext)
    if member.size > max_bytes:
        group["error"] = group["error"] or (
            f"tar member {member.name} is {member.size} bytes, over --max-member-bytes {max_bytes}")
        return
    if group["error"]:
        return
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if ext in IMAGE_EXTS and group["image"] is None:
        group["image"] = data
        if plain:
            group["offset"], group["size"] = member.offset_data, member.size
    elif ext == "txt":
        group["caption"] = data
    elif ext == "json":
        group["meta"] = parse_json_meta(data)


def parse_json_meta(data: bytes) -> dict:
    """Top-level fields of a sample's JSON sidecar; metadata that cannot be used is kept as text.

    Any failure to parse (bad UTF-8, bad JSON, an integer over Python's
    4300-digit limit, nesting deep enough for RecursionError) keeps the raw
    text in `json_raw` and fails nothing: the sample is still embedded and the
    shard goes on. Integers beyond int64 become strings, so that one sample
    cannot break its part's Parquet column.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except Exception:  # ValueError, RecursionError, MemoryError: all the sample's own
        return {"json_raw": data.decode("utf-8", errors="replace")}
    if not isinstance(value, dict):
        return {"json_value": _parquet_safe(value)}
    return {str(k): _parquet_safe(v) for k, v in value.items()}


def _parquet_safe(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return str(value)
    return value


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url and not url.startswith("file://") else "file"


def image_url(value: str, manifest_url: str, allow_any_path: bool = False) -> str:
    """Where a manifest row's image lives; ValueError for one outside the manifest's own filesystem.

    Relative paths are joined to the manifest's folder. An absolute path or a
    URL is read only when it has the manifest's scheme (a local manifest may
    name local files, an s3:// manifest s3:// objects): a manifest from a shared
    bucket must not make workers read `/etc/...` or `file:///...` into an
    output its author can read. `--allow-any-path` lifts this.
    """
    if "://" not in value and not value.startswith("/"):
        base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
        return join(base, value)
    if allow_any_path or _scheme(value) == _scheme(manifest_url):
        return value
    raise ValueError(f"image path {value!r} is outside the manifest's filesystem ({_scheme(manifest_url)}); "
                     "pass --allow-any-path to read it")


def read_capped(fs, path: str, max_bytes: int) -> bytes:
    """A file's bytes, or ValueError once it proves longer than max_bytes (at most max_bytes + 1 are read)."""
    with fs.open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than --max-member-bytes {max_bytes}")
    return data


def _with_named_columns(table, columns):
    """JSON lines may hold a field only in some rows, so a part may lack a column that planning found
    in the manifest (corpus.plan.check_manifest): here it reads as nulls."""
    import pyarrow as pa

    for name in (columns.image, columns.caption, columns.id) if columns else ():
        if name and name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table


def _read_manifest(index: int, spec: PartSpec, storage_options: dict | None, columns,
                   limits: ReadLimits) -> Iterator[dict]:
    source = spec.url
    try:
        table = _with_named_columns(read_manifest_table(spec.url, storage_options, spec.start, spec.stop,
                                                        spec.byte_range), columns)
        image_col, caption_col, id_col = choose_columns(
            table.schema, columns.image if columns else None, columns.caption if columns else None,
            columns.id if columns else None, spec.url)
    except Exception as exc:
        for row in range(spec.start, spec.stop):
            yield failure(index, f"{spec.label}/{row}", source, "read", f"manifest unreadable: {_error(exc)}")
        return
    rows = table.to_pylist()
    skip = {image_col, caption_col, id_col}
    duplicates = dict(spec.duplicates)
    for offset, row in enumerate(rows):
        number = spec.start + offset
        if number in duplicates:  # the first row with this id keeps it (corpus.plan.duplicate_ids)
            yield failure(index, f"{spec.label}/{number}", source, "read", duplicates[number])
            continue
        sample_id = str(row[id_col]) if id_col and row.get(id_col) is not None else f"{spec.label}/{number}"
        value = row.get(image_col)
        meta = {k: v for k, v in row.items() if k not in skip}
        caption = row.get(caption_col) if caption_col else None
        if isinstance(value, (bytes, bytearray)):
            image, image_source = bytes(value), source
        elif isinstance(value, str) and value:
            image_source = value
            try:
                image_source = image_url(value, spec.url, limits.allow_any_path)
                fs, path = get_fs(image_source, storage_options)
                image = read_capped(fs, path, limits.max_member_bytes)
            except Exception as exc:
                yield failure(index, sample_id, image_source, "read", _error(exc))
                continue
        else:
            yield failure(index, sample_id, source, "read", f"row {number} has no image in column {image_col!r}")
            continue
        yield {"id": sample_id, "part": index, "source": image_source, "image": image, "caption": caption,
               "meta": meta}


def _regular(fs, root: str, path: str) -> str:
    """`path`, if it is a regular file inside `root`. On local disks a FIFO, socket or device in a folder
    input would block the read forever or never end, and a symbolic link may point anywhere (a caption
    linked to /etc/passwd): both are ValueError (a read failure) instead. Links inside the folder are read."""
    if getattr(fs, "local_file", False):
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ValueError(f"{path} is a symbolic link out of the input folder")
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path} is not a regular file (a FIFO, socket or device)")
    return path


def _read_folder(index: int, spec: PartSpec, storage_options: dict | None, limits: ReadLimits) -> Iterator[dict]:
    try:
        fs, root = get_fs(spec.url, storage_options)
    except Exception as exc:
        for image, _ in spec.files:
            yield failure(index, f"{spec.label}/{image}", spec.url, "read", _error(exc))
        return
    for image, caption_path in spec.files:
        sample_id = f"{spec.label}/{image}"
        source = join(spec.url, image)
        try:
            data = read_capped(fs, _regular(fs, root, posixpath.join(root, image)), limits.max_member_bytes)
            caption = None
            if caption_path is not None:
                caption = read_capped(fs, _regular(fs, root, posixpath.join(root, caption_path)),
                                      limits.max_member_bytes)
        except Exception as exc:
            yield failure(index, sample_id, source, "read", _error(exc))
            continue
        yield {"id": sample_id, "part": index, "source": source, "image": data, "caption": caption, "meta": {}}
