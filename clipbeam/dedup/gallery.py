"""The dedup gallery: where a user chooses a threshold by looking.

The largest groups and the borderline pairs (the duplicates least similar to
what their group keeps) at the lowest threshold, each with the kept image
first and the cosine to it under every image, and the histogram of every
sample's nearest-neighbour similarity with the thresholds marked. Images come
from where the corpus keeps them (one range read per tar sample); one that
cannot be read is drawn as a grey tile that says so.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from clipbeam import storage
from clipbeam.corpus.fetch import ImageUnavailable, fetch_image
from clipbeam.gallery import DuplicateSection, Gallery, Histogram, Hit, SearchPanel, write_gallery
from clipbeam.layout.dedup import GALLERY, WORK

LOG = logging.getLogger(__name__)
MEMBERS_SHOWN = 8
LOOKUP_COLUMNS = ("source", "source_offset", "source_size", "caption")


def _groups(url: str, parts: list[dict], threshold: float, storage_options: dict | None) -> pa.Table:
    tables = []
    for part in parts:
        with storage.open_input(storage.join(url, part["path"]), storage_options) as handle:
            table = pq.read_table(handle)
        tables.append(table.filter(pc.equal(table["threshold"], pa.scalar(threshold, pa.float32()))))
    return pa.concat_tables(tables) if tables else pa.table({})


def _lookup(files: list[str], id_column: str, ids: set[str], storage_options: dict | None) -> dict[str, dict]:
    """Where each wanted sample's image lies, and its caption, from the embeddings parts (no vectors read)."""
    found: dict[str, dict] = {}
    wanted = pa.array(sorted(ids), pa.string())
    for url in files:
        with storage.open_input(url, storage_options) as handle:
            parquet = pq.ParquetFile(handle)
            columns = [id_column, *(c for c in LOOKUP_COLUMNS if c in parquet.schema_arrow.names)]
            table = parquet.read(columns=columns)
        table = table.filter(pc.is_in(pc.cast(table[id_column], pa.string()), value_set=wanted))
        for row in table.to_pylist():
            found[str(row.pop(id_column))] = row
    return found


def _image(row: dict | None, storage_options: dict | None) -> Image.Image:
    try:
        if row is None:
            raise ImageUnavailable("not found in the embeddings")
        return Image.open(io.BytesIO(fetch_image(row, storage_options))).convert("RGB")
    except (ImageUnavailable, OSError) as exc:
        LOG.debug("gallery: image unavailable: %s", exc)
        return Image.new("RGB", (64, 64), (200, 200, 200))


def _panel(title: str, rows: list[dict], lookup: dict, storage_options: dict | None) -> SearchPanel:
    hits = [Hit(rank + 1, row["similarity_to_kept"], row["id"], ("kept " if row["kept"] else "") +
                ((lookup.get(row["id"]) or {}).get("caption") or ""), _image(lookup.get(row["id"]), storage_options))
            for rank, row in enumerate(rows)]
    return SearchPanel(title, hits)


def _largest_and_borderline(table: pa.Table, count: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """The `count` largest groups (first rows of each), and the `count` near pairs least similar to their kept
    sample; only these rows become Python objects, however many groups the output holds."""
    if table.num_rows == 0:
        return [], []
    sizes = table.group_by("group").aggregate([("id", "count"), ("kept_id", "min")])
    top = sizes.sort_by([("id_count", "descending"), ("kept_id_min", "ascending")]).slice(0, count)
    chosen = table.filter(pc.is_in(table["group"], value_set=top["group"])).to_pylist()
    by_group: dict[int, list[dict]] = {}
    for row in sorted(chosen, key=lambda r: (not r["kept"], r["id"])):
        by_group.setdefault(row["group"], []).append(row)
    largest = [by_group[g] for g in top["group"].to_pylist()]
    near = table.filter(pc.and_(pc.invert(table["kept"]), pc.equal(table["kind"], "near")))
    borderline = near.sort_by([("similarity_to_kept", "ascending"), ("id", "ascending")]).slice(0, count).to_pylist()
    kept = table.filter(pc.and_(table["kept"], pc.is_in(table["id"], value_set=pa.array(
        [r["kept_id"] for r in borderline], pa.string())))).to_pylist()
    kept_rows = {r["id"]: r for r in kept}
    return largest, [[kept_rows[r["kept_id"]], r] for r in borderline if r["kept_id"] in kept_rows]


def build_gallery(table: pa.Table, threshold: float, thresholds: tuple[float, ...], histogram: dict | None,
                  files: list[str], id_column: str, count: int, storage_options: dict | None) -> Gallery:
    largest, pairs = _largest_and_borderline(table, count)
    groups = len(pc.unique(table["group"])) if table.num_rows else 0
    shown = [g[:MEMBERS_SHOWN] for g in largest]
    lookup = _lookup(files, id_column, {r["id"] for g in shown + pairs for r in g}, storage_options)
    sections = [
        DuplicateSection(f"Largest groups at cos >= {threshold}",
                         "The kept sample first; the cosine similarity to it under each image.",
                         [_panel(f"{len(g)} samples, kind {g[0]['kind']}", g[:MEMBERS_SHOWN], lookup, storage_options)
                          for g in largest]),
        DuplicateSection(f"Borderline pairs at cos >= {threshold}",
                         "The near-duplicates least similar to what their group keeps: if these are not "
                         "copies, raise the threshold.",
                         [_panel(f"{pair[1]['similarity_to_kept']:.4f}", pair, lookup, storage_options)
                          for pair in pairs])]
    plot = None if histogram is None else Histogram(histogram["counts"], *histogram["range"],
                                                    "cosine similarity to the nearest other sample", list(thresholds))
    return Gallery(title="clipbeam dedup", notes=[f"{groups} groups at cos >= {threshold}"],
                   duplicates=sections, histogram=plot)


def write_dedup_gallery(out, config, inputs, count: int) -> list[str]:
    """OUT/gallery/ (index.html, contact_sheet.png, images/); the names written, relative to OUT."""
    if count == 0:
        return []
    so = config.storage_options
    parts = [m for m in out.done_units().values() if m.get("rows")]
    threshold = min(config.thresholds)
    histogram_url = storage.join(config.output, WORK, "nn.json")
    histogram = storage.read_json(histogram_url, so) if storage.exists(histogram_url, so) else None
    gallery = build_gallery(_groups(config.output, parts, threshold, so), threshold, config.thresholds, histogram,
                            [f.url for f in inputs.files], config.id_column, count, so)
    with tempfile.TemporaryDirectory(prefix="clipbeam-gallery-") as local:
        write_gallery(gallery, local)
        names = sorted(os.path.relpath(os.path.join(root, f), local)
                       for root, _, files in os.walk(local) for f in files)
        out.claim([f"{GALLERY}/{name}" for name in names])
        for name in names:
            with open(os.path.join(local, name), "rb") as source, \
                    storage.atomic_open(storage.join(config.output, GALLERY, name), "wb", so) as target:
                target.write(source.read())
    return [f"{GALLERY}/{name}" for name in names]
