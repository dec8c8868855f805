"""Embeddings -> the clip-retrieval / autofaiss folder layout (`clipbeam export`).

Writes img_emb/img_emb_NNNNN.npy and text_emb/text_emb_NNNNN.npy (float16,
2-D, C order, NPY v1) and metadata/metadata_NNNNN.parquet (image_path,
caption, then the other columns), row for row, one partition per non-empty
embeddings part. The partition number has a fixed width chosen up front and
no 0-row file is ever written, because clip-retrieval, autofaiss and
embedding-reader pair the files by sorted position. Text embeddings are
exported only when every row has one (a partial text_emb would misalign).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbeam import __version__, storage
from clipbeam.errors import UsageError
from clipbeam.index.inputs import InputFile, resolve_embeddings, to_matrix
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    storage_options_from_args,
)

LOG = logging.getLogger(__name__)
FORMATS = ("clip-retrieval",)
EXPORT_JSON = "export.json"
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url, help="embed output folder (any fsspec URL)")
    parser.add_argument("--format", default="clip-retrieval", choices=FORMATS, help="output layout")
    parser.add_argument("--batch-rows", type=int, default=65_536, help="rows read at a time (default %(default)s)")
    add_output_arguments(parser)
    add_storage_arguments(parser)


def partition_width(count: int) -> int:
    """Digits of the partition number: at least 5, fixed for the whole export so names sort."""
    return max(5, len(str(max(count - 1, 0))))


def image_path(ids: pa.Array, sources: pa.Array) -> pa.Array:
    """clip-retrieval's image_path: the file for image files, the sample key for webdataset tars."""
    is_tar = pc.ends_with(pc.fill_null(sources, ""), ".tar")
    return pc.if_else(is_tar, ids, sources)


@dataclass(frozen=True)
class ExportJob:
    output: str
    storage_options: dict
    dim: int
    width: int
    batch_rows: int

    def name(self, kind: str, number: int, ext: str) -> str:
        return f"{kind}/{kind}_{number:0{self.width}d}.{ext}"


def _npy_header(rows: int, dim: int) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    return buffer.getvalue()


def _export_part(task: tuple[int, InputFile], job: ExportJob) -> dict:
    """One embeddings part -> one partition: streamed, img/text .npy headers written from the known row count."""
    number, file = task
    done = storage.join(job.output, "_work", f"{number:0{job.width}d}.json")
    if storage.exists(done, job.storage_options):
        return storage.read_json(done, job.storage_options)
    so = job.storage_options
    img_url = storage.join(job.output, job.name("img_emb", number, "npy"))
    text_url = storage.join(job.output, job.name("text_emb", number, "npy"))
    meta_url = storage.join(job.output, job.name("metadata", number, "parquet"))
    has_text, rows = True, 0
    with storage.open_input(file.url, so) as source, \
            storage.atomic_open(img_url, "wb", so) as img, \
            storage.atomic_open(text_url + ".partial", "wb", so) as text, \
            storage.atomic_open(meta_url, "wb", so) as meta:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        has_text = "text_embedding" in names
        img.write(_npy_header(file.rows, job.dim))
        text.write(_npy_header(file.rows, job.dim))
        writer = None
        for batch in parquet.iter_batches(batch_size=job.batch_rows):
            table = pa.Table.from_batches([batch])
            if table.column("image_embedding").null_count:
                raise ValueError(f"{file.url}: rows without an image embedding cannot be exported row-aligned")
            img.write(to_matrix(table.column("image_embedding"), job.dim, f"{file.url}: ").astype("<f2").tobytes())
            if has_text and table.column("text_embedding").null_count == 0:
                text.write(to_matrix(table.column("text_embedding"), job.dim, f"{file.url}: ").astype("<f2").tobytes())
            else:
                has_text = False
            rest = [c for c in names if c not in EMBEDDING_COLUMNS and c not in ("image_path", "caption")]
            caption = table.column("caption") if "caption" in names else pa.nulls(table.num_rows, pa.string())
            ids = table.column("id") if "id" in names else pa.nulls(table.num_rows, pa.string())
            sources = table.column("source") if "source" in names else pa.nulls(table.num_rows, pa.string())
            out = pa.table({"image_path": image_path(ids, sources), "caption": caption,
                            **{c: table.column(c) for c in rest}})
            if writer is None:
                writer = pq.ParquetWriter(meta, out.schema)
            writer.write_table(out)
            rows += table.num_rows
        if writer is not None:
            writer.close()
    if rows != file.rows:
        raise ValueError(f"{file.url}: read {rows} rows, its footer says {file.rows}")
    fs, path = storage.get_fs(text_url + ".partial", so)
    if has_text:
        fs.mv(path, storage.get_fs(text_url, so)[1])
    else:
        fs.rm(path)
    result = {"partition": f"{number:0{job.width}d}", "rows": rows, "text": has_text, "source": file.url}
    storage.write_json(done, result, so)
    return result


def _commit(results: list[dict], job: ExportJob, extra: dict) -> None:
    """Keep text_emb only if every partition has it; then export.json, last."""
    results = sorted(results, key=lambda r: r["partition"])
    text = all(r["text"] for r in results)
    fs, path = storage.get_fs(job.output, job.storage_options)
    if not text:
        if any(r["text"] for r in results):
            LOG.warning("some rows have no text embedding: text_emb is not exported")
        if fs.exists(storage.join(path, "text_emb")):
            fs.rm(storage.join(path, "text_emb"), recursive=True)
    storage.write_json(storage.join(job.output, EXPORT_JSON), {
        **extra, "dim": job.dim, "dtype": "float16", "text": text, "partitions": results,
        "rows": sum(r["rows"] for r in results), "clipbeam_version": __version__}, job.storage_options)
    if fs.exists(storage.join(path, "_work")):
        fs.rm(storage.join(path, "_work"), recursive=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    so = storage_options_from_args(args)
    inputs = resolve_embeddings(args.embeddings, "image_embedding", "id", [], so)
    export_url = storage.join(args.output, EXPORT_JSON)
    if storage.exists(export_url, so) and not args.overwrite:
        raise UsageError(f"{args.output} already holds an export; pass --overwrite to redo it")
    storage.check_writable(args.output, so)
    if args.overwrite:
        fs, path = storage.get_fs(args.output, so)
        for name in (EXPORT_JSON, "img_emb", "text_emb", "metadata", "_work"):
            if fs.exists(storage.join(path, name)):
                fs.rm(storage.join(path, name), recursive=True)
    job = ExportJob(args.output, so, inputs.dim, partition_width(len(inputs.files)), args.batch_rows)
    extra = {"format": args.format, "embeddings": args.embeddings, "embeddings_manifest": inputs.manifest}
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Parts" >> beam.Create(list(enumerate(inputs.files)))
             | "Spread" >> beam.Reshuffle()
             | "Export" >> beam.Map(_export_part, job)
             | "Gather" >> beam.combiners.ToList()
             | "Commit" >> beam.Map(_commit, job, extra))
    manifest = storage.read_json(export_url, so)
    print_summary(f"clipbeam export -> {args.output}", [
        ("format", args.format), ("partitions", len(manifest["partitions"])), ("rows", manifest["rows"]),
        ("text_emb", "yes" if manifest["text"] else "no (some rows have no caption)"),
        ("seconds", f"{watch.seconds:.1f}")])
    return 0
