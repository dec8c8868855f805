"""Planning which input goes into which output part, before any pipeline runs.

Pure functions over listings: no image is read here. Parts come out sorted
by source; their numbers belong to their sources and are kept by the output
folder (clipbeam.layout.embeddings), so a new source never renumbers the
others. Sample ids are derived from a short, stable label of the source plus
the sample key, so ids do not drift when files are listed in another order or
when inputs are added.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field

from clipbeam.errors import FieldError, UsageError, first_line
from clipbeam.storage import expand_braces, get_fs, has_magic, unstrip

LOG = logging.getLogger(__name__)

FORMATS = ("auto", "webdataset", "manifest", "folder")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class PartSpec:
    """One unit of work and one output part.

    kind: "tar" (a whole shard), "manifest" (rows [start, stop) of a table) or
    "folder" (a list of image files with optional caption sidecars).
    duplicates: manifest rows of this part whose --id-column value an earlier
    row already has, with the reason; the reader records them as read failures.
    byte_range: where a CSV/JSONL part's rows lie in its file, so that it reads
    only those bytes (None for Parquet, tars and folders).
    """

    kind: str
    url: str
    label: str
    start: int = 0
    stop: int = 0
    files: tuple[tuple[str, str | None], ...] = field(default=())
    duplicates: tuple[tuple[int, str], ...] = field(default=())
    byte_range: tuple[int, int] | None = None

    @property
    def source(self) -> str:
        if self.kind == "manifest":
            return f"{self.url}#rows={self.start}-{self.stop}"
        if self.kind == "folder":
            return f"{self.url}#files={self.start}-{self.stop}"
        return self.url

    @property
    def fingerprint(self) -> str:
        """Changes when the part would hold other samples (used by resume)."""
        digest = hashlib.sha256(self.source.encode())
        for image, caption in self.files:
            digest.update(f"\0{image}\0{caption}".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ManifestColumns:
    image: str | None = None
    caption: str | None = None
    id: str | None = None


def expand_inputs(inputs: list[str], storage_options: dict | None) -> list[str]:
    """Expand brace ranges and globs; every pattern must match something."""
    urls: list[str] = []
    for given in inputs:
        for pattern in expand_braces(given):
            fs, path = get_fs(pattern, storage_options)
            if has_magic(path):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise FieldError("inputs", f"{{field}} {given}: no files match {pattern}")
                urls.extend(unstrip(fs, pattern, m) for m in matches)
            else:
                urls.append(pattern)
    return sorted(dict.fromkeys(urls))


def detect_format(url: str, is_dir: bool) -> str:
    lower = url.lower()
    if is_dir:
        return "folder"
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    raise FieldError("format", f"cannot tell the format of {url}: use {{field}} webdataset|manifest|folder")


def unique_labels(urls: list[str]) -> dict[str, str]:
    """Short labels for sources: the file name without suffix, with as many parent
    folders as needed to tell sources apart. Stable for a given set of names."""
    def stem(url: str) -> list[str]:
        path = url.split("://", 1)[-1].rstrip("/")
        parts = [p for p in path.split("/") if p]
        name = parts[-1] if parts else path
        for suffix in TAR_SUFFIXES + MANIFEST_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        return parts[:-1] + [name]

    split = {url: stem(url) for url in urls}
    depth = {url: 1 for url in urls}
    while True:
        labels = {url: "/".join(split[url][-depth[url]:]) for url in urls}
        seen: dict[str, list[str]] = {}
        for url, label in labels.items():
            seen.setdefault(label, []).append(url)
        clashes = [group for group in seen.values() if len(group) > 1]
        if not clashes:
            return labels
        grown = False
        for group in clashes:
            for url in group:
                if depth[url] < len(split[url]):
                    depth[url] += 1
                    grown = True
        if not grown:  # identical paths on different filesystems
            return {url: url for url in urls}


def cut_ranges(total: int, rows_per_part: int) -> list[tuple[int, int]]:
    """[0, total) cut into consecutive ranges of at most rows_per_part rows."""
    if rows_per_part <= 0:
        raise FieldError("rows_per_part", f"{{field}} must be at least 1, not {rows_per_part}")
    return [(start, min(start + rows_per_part, total)) for start in range(0, total, rows_per_part)]


def pair_captions(files: list[str]) -> list[tuple[str, str | None]]:
    """(image, caption sidecar or None) for each image file of a folder listing."""
    names = set(files)
    pairs = []
    for path in sorted(files):
        root, ext = posixpath.splitext(path)
        if ext.lower() in IMAGE_SUFFIXES:
            caption = root + ".txt"
            pairs.append((path, caption if caption in names else None))
    return pairs


def check_manifest(url: str, storage_options: dict | None, columns: ManifestColumns | None,
                   rows_per_part: int):
    """A manifest's ManifestInfo (rows, schema, part offsets, ids), after checking that every row
    parses and that it has the columns asked for.

    Runs before any pipeline starts, so a corrupt Parquet file, a malformed
    CSV or a missing --image-column is one line and exit 2, not a run that
    writes a failure row for every sample.
    """
    from clipbeam.corpus.manifest_table import choose_columns, inspect_manifest

    columns = columns or ManifestColumns()
    try:
        info = inspect_manifest(url, storage_options, rows_per_part, columns.id)
    except UsageError:
        raise
    except Exception as exc:  # ArrowInvalid, OSError, UnicodeDecodeError: the file is not a readable table
        first = first_line(exc, 300)
        raise UsageError(f"cannot read manifest {url}: {exc.__class__.__name__}: {first}") from None
    choose_columns(info.schema, columns.image, columns.caption, columns.id, url)
    return info


def duplicate_ids(manifests: list[tuple[str, str]], ids: dict) -> dict[str, dict[int, str]]:
    """{url: {row: reason}} for every manifest row whose id an earlier row (of any manifest) already has.

    `ids` holds each manifest's id column as strings (ManifestInfo.ids). The
    first row with an id keeps it; each later one becomes a read failure
    "duplicate id X, first at row N of LABEL", so that ids stay unique and a
    rerun can finish.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = [ids[url] for url, _ in manifests]
    if not columns:
        return {}
    owners = [pa.array([n] * len(col), pa.int32()) for n, col in enumerate(columns)]
    table = pa.table({"id": pa.chunked_array([c for col in columns for c in col.chunks], pa.string()),
                      "owner": pa.chunked_array(owners),
                      "row": pa.chunked_array([pa.array(range(len(col)), pa.int64()) for col in columns])})
    table = table.filter(pc.is_valid(table["id"]))
    counts = table.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts["id_count"], 1))["id"]
    out: dict[str, dict[int, str]] = {}
    first: dict[str, tuple[int, int]] = {}
    for row in table.filter(pc.is_in(table["id"], value_set=repeated)).to_pylist():
        if row["id"] not in first:
            first[row["id"]] = (row["owner"], row["row"])
            continue
        owner, first_row = first[row["id"]]
        out.setdefault(manifests[row["owner"]][0], {})[row["row"]] = (
            f"duplicate id {row['id']}, first at row {first_row} of {manifests[owner][1]}")
    return out


def plan_parts(
    inputs: list[str],
    fmt: str = "auto",
    storage_options: dict | None = None,
    rows_per_part: int = 10_000,
    columns: ManifestColumns | None = None,
) -> list[PartSpec]:
    """Every part of the run, sorted by source. Raises UsageError for inputs that
    do not exist, whose format cannot be told, or manifests that cannot be read
    or lack the `columns` asked for. (Part numbers are not given here: the
    output folder keeps them per source, see clipbeam.layout.embeddings.)"""
    if fmt not in FORMATS:
        raise FieldError("format", f"{{field}} must be one of {', '.join(FORMATS)}, not {fmt!r}")
    sources = list_sources(expand_inputs(inputs, storage_options), fmt, storage_options)
    labels = unique_labels([url for url, _ in sources])
    manifests = sorted((url, labels[url]) for url, kind in sources if kind == "manifest")
    infos = {url: check_manifest(url, storage_options, columns, rows_per_part) for url, _ in manifests}
    repeated = duplicate_ids(manifests, {u: i.ids for u, i in infos.items()}) if columns and columns.id else {}
    parts: list[PartSpec] = []
    for url, kind in sources:
        label = labels[url]
        if kind == "webdataset":
            parts.append(PartSpec("tar", url, label))
        elif kind == "manifest":
            total, offsets, dups = infos[url].rows, infos[url].offsets, repeated.get(url, {})
            parts.extend(PartSpec("manifest", url, label, a, b,
                                  duplicates=tuple((r, dups[r]) for r in range(a, b) if r in dups),
                                  byte_range=(offsets[k], offsets[k + 1]) if offsets else None)
                         for k, (a, b) in enumerate(cut_ranges(total, rows_per_part)))
            if total == 0:
                LOG.warning("manifest %s has no rows", url)
        else:
            parts.extend(_folder_parts(url, label, storage_options, rows_per_part))
    return sorted(parts, key=lambda p: (p.url, p.start))


def list_sources(urls: list[str], fmt: str, storage_options: dict | None) -> list[tuple[str, str]]:
    """(url, format) of every source: folders of shards expanded, missing shards kept (they fail as read)."""
    sources: list[tuple[str, str]] = []
    missing: list[str] = []
    for url in urls:
        fs, path = get_fs(url, storage_options)
        try:
            is_dir = fs.isdir(path)
            exists = is_dir or fs.exists(path)
        except Exception as exc:
            raise FieldError("inputs", f"{{field}} {url}: {exc.__class__.__name__}: {exc}") from None
        if not exists:
            if fmt in ("auto", "webdataset") and url.lower().endswith(TAR_SUFFIXES):
                # A gap in a shard list: that shard fails as unreadable, the run goes on.
                missing.append(url)
                sources.append((url, "webdataset"))
                continue
            raise FieldError("inputs", f"{{field}} {url} does not exist")
        kind = detect_format(url, is_dir) if fmt == "auto" else fmt
        if is_dir and kind == "webdataset":
            tars = sorted(p for p in fs.find(path) if p.lower().endswith(TAR_SUFFIXES))
            if not tars:
                raise FieldError("inputs", f"{{field}} {url}: folder holds no .tar shards")
            sources.extend((unstrip(fs, url, p), "webdataset") for p in tars)
        elif is_dir and kind == "folder" and fmt == "auto" and _holds_only_tars(fs, path):
            tars = sorted(p for p in fs.find(path) if p.lower().endswith(TAR_SUFFIXES))
            sources.extend((unstrip(fs, url, p), "webdataset") for p in tars)
        else:
            sources.append((url, kind))
    if missing and len(missing) == len(urls):
        raise FieldError("inputs", f"{{field}}: none of the {len(urls)} shards exist (first: {missing[0]})")
    for url in missing:
        LOG.warning("shard %s does not exist; its samples will be recorded as failed", url)
    return sources


def _folder_parts(url: str, label: str, storage_options: dict | None, rows_per_part: int) -> list[PartSpec]:
    fs, path = get_fs(url, storage_options)
    root = path.rstrip("/")
    pairs = pair_captions([p[len(root) + 1:] for p in fs.find(root)])
    if not pairs:
        LOG.warning("folder %s holds no images", url)
    return [PartSpec("folder", url.rstrip("/"), label, a, b, tuple(pairs[a:b]))
            for a, b in cut_ranges(len(pairs), rows_per_part)]


def _holds_only_tars(fs, path: str) -> bool:
    files = fs.find(path)
    return bool(files) and all(p.lower().endswith(TAR_SUFFIXES) for p in files)
