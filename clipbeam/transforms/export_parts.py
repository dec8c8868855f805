"""The core of `clipbeam export`: one embeddings part in, one clip-retrieval partition out.

A partition is img_emb/img_emb_N.npy, text_emb/text_emb_N.npy (float16, 2-D,
C order, NPY v1) and metadata/metadata_N.parquet, row for row: clip-retrieval,
autofaiss and embedding-reader pair the three by sorted position, so a row
can never be dropped from one of them. A part is streamed in row batches; the
.npy headers are written first from the row count in the Parquet footer.

Rows without a text embedding (no caption) get a zero vector in text_emb and
`has_text = false` in the metadata, so one missing caption does not cost the
other rows their text vectors. `text_missing="drop"` keeps the old rule
instead: a partition's text_emb is written only when every row has one.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.layout import UnitLedger
from clipbeam.layout.clip_retrieval import npy_header, partition_file
from clipbeam.layout.embeddings import part_name
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart
from clipbeam.layout.embeddings.read import to_matrix

TEXT_MISSING = ("zero", "drop")
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
LEADING_COLUMNS = ("image_path", "caption", "has_text")


@dataclass(frozen=True)
class ExportConfig:
    """What every partition needs, decided before the pipeline starts.

    `with_text` says whether the embeddings carry text vectors at all (no
    text_emb when embed ran with --no-text); `ledger` marks each finished
    partition done (None in tests that only look at the files).
    """

    output: str
    storage_options: dict
    dim: int
    width: int
    batch_rows: int
    with_text: bool
    text_missing: str
    ledger: UnitLedger | None
    exclude: frozenset[str] = frozenset()  # ids left out (`--exclude` of a dedup output)

    def name(self, kind: str, number: int) -> str:
        return partition_file(kind, number, self.width)

    def url(self, kind: str, number: int) -> str:
        return storage.join(self.output, self.name(kind, number))


@dataclass(frozen=True)
class Partition:
    """A finished partition: rows written, whether its text_emb file was kept, where its rows came from.

    `source` and `rows_in` name the embeddings file, so that a rerun redoes a partition whose part changed.
    """

    number: int
    rows: int
    text: bool
    source: str
    rows_in: int


def image_path(ids: pa.Array, sources: pa.Array) -> pa.Array:
    """clip-retrieval's image_path: the file for image files, the sample key for webdataset tars."""
    is_tar = pc.ends_with(pc.fill_null(sources, ""), ".tar")
    return pc.if_else(is_tar, ids, sources)


def text_matrix(table: pa.Table, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, dim] text vectors with zeros where there is none, bool [n] has_text)."""
    out = np.zeros((table.num_rows, dim), np.float32)
    if "text_embedding" not in table.column_names:
        return out, np.zeros(table.num_rows, bool)
    column = table.column("text_embedding")
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    if valid.any():
        out[valid] = to_matrix(column.filter(pa.array(valid)), dim, where)
    return out, valid


def metadata_table(table: pa.Table, has_text: np.ndarray) -> pa.Table:
    """image_path, caption, has_text, then every other non-embedding column of the part."""
    names = table.column_names
    nulls = pa.nulls(table.num_rows, pa.string())
    ids = table.column("id") if "id" in names else nulls
    sources = table.column("source") if "source" in names else nulls
    rest = [c for c in names if c not in EMBEDDING_COLUMNS and c not in LEADING_COLUMNS]
    return pa.table({"image_path": image_path(ids, sources),
                     "caption": table.column("caption") if "caption" in names else nulls,
                     "has_text": pa.array(has_text, pa.bool_()),
                     **{c: table.column(c) for c in rest}})


def _excluded(part: EmbeddingsPart, config: ExportConfig) -> tuple[pa.Array | None, int]:
    """The excluded ids as a value set, and the rows of the part that stay (the .npy headers need it first)."""
    if not config.exclude:
        return None, part.file.rows
    excluded = pa.array(list(config.exclude), pa.string())
    with storage.open_input(part.file.url, config.storage_options) as source:
        ids = pq.read_table(source, columns=["id"]).column("id")
    return excluded, part.file.rows - pc.sum(pc.is_in(pc.cast(ids, pa.string()), value_set=excluded)).as_py()


def export_part(part: EmbeddingsPart, config: ExportConfig) -> Partition:
    """Stream one embeddings part into one partition; a part with a null image vector is an error."""
    storage_options, file, where = config.storage_options, part.file, f"{part.file.url}: "
    rows, complete_text = 0, True
    text_url = config.url("text_emb", part.number)
    excluded, rows_out = _excluded(part, config)
    if rows_out == 0:  # every row removed: no 0-row partition (readers pair the files by position)
        result = Partition(part.number, 0, False, file.url, file.rows)
        if config.ledger is not None:
            config.ledger.mark_done(part_name(part.number), asdict(result))
        return result

    def write(url: str):
        return stack.enter_context(storage.atomic_open(url, "wb", storage_options))

    with storage.open_input(file.url, storage_options) as source, contextlib.ExitStack() as stack:
        img = write(config.url("img_emb", part.number))
        text = write(text_url) if config.with_text else None
        meta = write(config.url("metadata", part.number))
        for handle in filter(None, (img, text)):
            handle.write(npy_header(rows_out, config.dim))
        writer = None
        for batch in pq.ParquetFile(source).iter_batches(batch_size=config.batch_rows):
            table = pa.Table.from_batches([batch])
            if excluded is not None:
                table = table.filter(pc.invert(pc.is_in(pc.cast(table.column("id"), pa.string()), value_set=excluded)))
            if table.column("image_embedding").null_count:
                raise ValueError(f"{where}rows without an image embedding cannot be exported row-aligned")
            img.write(to_matrix(table.column("image_embedding"), config.dim, where).astype("<f2").tobytes())
            vectors, has_text = text_matrix(table, config.dim, where)
            if text is not None:
                text.write(vectors.astype("<f2").tobytes())
            complete_text &= bool(has_text.all())
            out = metadata_table(table, has_text)
            writer = writer or stack.enter_context(pq.ParquetWriter(meta, out.schema))
            writer.write_table(out)
            rows += table.num_rows
        if rows != rows_out:
            raise ValueError(f"{where}read {rows} rows to export, expected {rows_out}")
    keep_text = config.with_text and (complete_text or config.text_missing == "zero")
    if not keep_text:
        storage.remove_if_present(text_url, storage_options)
    result = Partition(part.number, rows, keep_text, file.url, file.rows)
    if config.ledger is not None:
        # Under "drop" the commit may remove text_emb later: a text file is not part of what makes a unit done.
        kinds = ("img_emb", "metadata", *(("text_emb",) if keep_text and config.text_missing == "zero" else ()))
        config.ledger.mark_done(part_name(part.number), asdict(result),
                                files=[config.name(kind, part.number) for kind in kinds])
    return result


class ExportParts(beam.PTransform):
    """PCollection[EmbeddingsPart] -> PCollection[Partition], parts spread over workers."""

    def __init__(self, config: ExportConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, parts):
        return (parts
                | "Spread" >> beam.Reshuffle()
                | "Export" >> beam.Map(export_part, self.config))
