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
import posixpath
import re
import tarfile
from typing import Iterator

from clipbeam.storage import get_fs, join
from clipbeam.transforms.corpus_plan import IMAGE_SUFFIXES, PartSpec
from clipbeam.transforms.manifest_table import choose_columns, read_manifest_table

LOG = logging.getLogger(__name__)

IMAGE_EXTS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
# webdataset's convention: the key is everything up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def failure(part: int, sample_id: str, source: str, stage: str, error: str) -> dict:
    return {"id": sample_id, "part": part, "source": source, "stage": stage, "error": error[:2000]}


def read_part(index: int, spec: PartSpec, storage_options: dict | None, columns=None) -> Iterator[dict]:
    """Yield samples and failures of one part; every sample goes out as exactly one of them."""
    if spec.kind == "tar":
        yield from _read_tar(index, spec, storage_options)
    elif spec.kind == "manifest":
        yield from _read_manifest(index, spec, storage_options, columns)
    elif spec.kind == "folder":
        yield from _read_folder(index, spec, storage_options)
    else:  # pragma: no cover - plan_parts never makes another kind
        raise ValueError(f"unknown part kind {spec.kind}")


def _error(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _read_tar(index: int, spec: PartSpec, storage_options: dict | None) -> Iterator[dict]:
    source = spec.url
    seen: set[str] = set()
    pending: dict | None = None

    def finish(group: dict) -> dict:
        sample_id = f"{spec.label}/{group['key']}"
        if group["key"] in seen:
            return failure(index, sample_id, source, "read", "duplicate key in shard (members not contiguous)")
        seen.add(group["key"])
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
                               "offset": None, "size": None}
                pending["exts"].add(ext)
                handle_member = tar.extractfile(member)
                data = handle_member.read() if handle_member is not None else b""
                if ext in IMAGE_EXTS and pending["image"] is None:
                    pending["image"] = data
                    if plain:
                        pending["offset"], pending["size"] = member.offset_data, member.size
                elif ext == "txt":
                    pending["caption"] = data
                elif ext == "json":
                    pending["meta"] = _parse_json_meta(data)
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


def _parse_json_meta(data: bytes) -> dict:
    """Top-level fields of a sample's JSON; unparseable metadata is kept as text."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"json_raw": data.decode("utf-8", errors="replace")}
    return value if isinstance(value, dict) else {"json_value": value}


def _read_manifest(index: int, spec: PartSpec, storage_options: dict | None, columns) -> Iterator[dict]:
    source = spec.url
    base = spec.url.rsplit("/", 1)[0] if "/" in spec.url else "."
    try:
        table = read_manifest_table(spec.url, storage_options, spec.start, spec.stop)
        image_col, caption_col, id_col = choose_columns(
            table.schema, columns.image if columns else None, columns.caption if columns else None,
            columns.id if columns else None, spec.url)
    except Exception as exc:
        for row in range(spec.start, spec.stop):
            yield failure(index, f"{spec.label}/{row}", source, "read", f"manifest unreadable: {_error(exc)}")
        return
    rows = table.to_pylist()
    skip = {image_col, caption_col, id_col}
    for offset, row in enumerate(rows):
        number = spec.start + offset
        sample_id = str(row[id_col]) if id_col and row.get(id_col) is not None else f"{spec.label}/{number}"
        value = row.get(image_col)
        meta = {k: v for k, v in row.items() if k not in skip}
        caption = row.get(caption_col) if caption_col else None
        if isinstance(value, (bytes, bytearray)):
            image, image_source = bytes(value), source
        elif isinstance(value, str) and value:
            image_source = value if "://" in value or value.startswith("/") else join(base, value)
            try:
                fs, path = get_fs(image_source, storage_options)
                with fs.open(path, "rb") as handle:
                    image = handle.read()
            except Exception as exc:
                yield failure(index, sample_id, image_source, "read", _error(exc))
                continue
        else:
            yield failure(index, sample_id, source, "read", f"row {number} has no image in column {image_col!r}")
            continue
        yield {"id": sample_id, "part": index, "source": image_source, "image": image, "caption": caption,
               "meta": meta}


def _read_folder(index: int, spec: PartSpec, storage_options: dict | None) -> Iterator[dict]:
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
            with fs.open(posixpath.join(root, image), "rb") as handle:
                data = handle.read()
            caption = None
            if caption_path is not None:
                with fs.open(posixpath.join(root, caption_path), "rb") as handle:
                    caption = handle.read()
        except Exception as exc:
            yield failure(index, sample_id, source, "read", _error(exc))
            continue
        yield {"id": sample_id, "part": index, "source": source, "image": data, "caption": caption, "meta": {}}
