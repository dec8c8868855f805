"""Zero-shot labels from stored image embeddings (`clipbeam classify`).

As in the CLIP paper: each label's prompt templates are encoded with the model
the embeddings came from, averaged and renormalised; an image's class
probabilities are the softmax of 100 x cosine similarity. Images are never
embedded again: a Beam pipeline streams the embedding parts and writes one
labels part per embeddings part (id, label, score, top_labels, top_scores),
then a manifest, last. Finished parts are kept on a rerun.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import __version__, storage
from clipbeam.errors import UsageError
from clipbeam.index.inputs import InputFile, iter_batches, resolve_embeddings
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    storage_options_from_args,
)
from clipbeam.commands.query_model import add_query_model_arguments, load_query_model, query_spec

LOG = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0
SCHEMA = pa.schema([("id", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                    ("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url, help="embed output folder (any fsspec URL)")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,person"')
    labels.add_argument("--labels-file", help="text file with one label a line")
    parser.add_argument("--template", action="append", default=None,
                        help=f'prompt template with {{}} for the label (repeatable; default "{DEFAULT_TEMPLATE}")')
    parser.add_argument("--top-k", type=int, default=3, help="labels kept per image (default %(default)s)")
    parser.add_argument("--column", default="image_embedding", help="vector column (default %(default)s)")
    parser.add_argument("--batch-rows", type=int, default=65_536, help="rows read at a time (default %(default)s)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    add_query_model_arguments(parser)


def read_labels(args: argparse.Namespace, storage_options: dict) -> list[str]:
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
    else:
        try:
            with storage.open_input(args.labels_file, storage_options) as handle:
                labels = [line.strip() for line in handle.read().decode("utf-8").splitlines()]
        except FileNotFoundError:
            raise UsageError(f"--labels-file {args.labels_file} does not exist") from None
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise UsageError("zero-shot classification needs at least two labels")
    if len(set(labels)) != len(labels):
        raise UsageError("labels must be distinct")
    return labels


def label_embeddings(clip, labels: list[str], templates: list[str]) -> np.ndarray:
    """One unit vector per label: the mean of its templates' text embeddings, renormalised."""
    from clipbeam.models.clip import encode_texts

    out = []
    for label in labels:
        mean = encode_texts(clip, [t.format(label) for t in templates]).mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out).astype(np.float32)


def zero_shot(vectors: np.ndarray, classes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top label indices [n, k], their probabilities [n, k]) from softmax(100 x cosine)."""
    logits = LOGIT_SCALE * vectors @ classes.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return top, np.take_along_axis(probs, top, axis=1)


@dataclass(frozen=True)
class ClassifyJob:
    output: str
    storage_options: dict
    column: str
    dim: int
    labels: tuple[str, ...]
    classes: np.ndarray
    top_k: int
    batch_rows: int


def _part_name(number: int) -> str:
    return f"labels/part-{number:05d}.parquet"


def _classify_part(task: tuple[int, InputFile], job: ClassifyJob) -> dict:
    number, file = task
    url = storage.join(job.output, _part_name(number))
    if storage.exists(url, job.storage_options):
        with storage.open_input(url, job.storage_options) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        return {"path": _part_name(number), "rows": rows, "source": file.url, "skipped": 0}
    labels = np.array(job.labels, dtype=object)
    rows = skipped = 0
    with storage.atomic_open(url, "wb", job.storage_options) as handle, pq.ParquetWriter(handle, SCHEMA) as writer:
        for batch in iter_batches(file, job.column, "id", [], job.dim, batch_rows=job.batch_rows,
                                  storage_options=job.storage_options):
            top, probs = zero_shot(batch.vectors, job.classes, job.top_k)
            n, k = top.shape
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
            writer.write_table(pa.table({
                "id": batch.metadata.column("id"),
                "label": pa.array(labels[top[:, 0]].tolist(), pa.string()),
                "score": pa.array(probs[:, 0].astype(np.float32)),
                "top_labels": pa.ListArray.from_arrays(offsets, pa.array(labels[top].ravel().tolist(), pa.string())),
                "top_scores": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel().astype(np.float32))),
            }, schema=SCHEMA))
            rows += n
            skipped += batch.skipped
    return {"path": _part_name(number), "rows": rows, "source": file.url, "skipped": skipped}


def _write_manifest(parts: list[dict], job: ClassifyJob, extra: dict) -> None:
    manifest = {**extra, "labels": list(job.labels), "top_k": job.top_k, "logit_scale": LOGIT_SCALE,
                "parts": sorted(parts, key=lambda p: p["path"]), "rows": sum(p["rows"] for p in parts),
                "clipbeam_version": __version__}
    storage.write_json(storage.join(job.output, "manifest.json"), manifest, job.storage_options)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    so = storage_options_from_args(args)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {args.top_k}")
    templates = args.template or [DEFAULT_TEMPLATE]
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"--template {template!r} has no {{}} for the label")
    labels = read_labels(args, so)
    inputs = resolve_embeddings(args.embeddings, args.column, "id", [], so)
    manifest_url = storage.join(args.output, "manifest.json")
    if storage.exists(manifest_url, so) and not args.overwrite:
        raise UsageError(f"{args.output} already holds labels; pass --overwrite to redo them")
    spec = query_spec(args, inputs.manifest)
    clip = load_query_model(spec, inputs.dim, so)
    storage.check_writable(args.output, so)
    if args.overwrite:
        fs, path = storage.get_fs(args.output, so)
        if fs.exists(storage.join(path, "manifest.json")):
            fs.rm(storage.join(path, "manifest.json"))
        if fs.exists(storage.join(path, "labels")):
            fs.rm(storage.join(path, "labels"), recursive=True)
    classes = label_embeddings(clip, labels, templates)
    job = ClassifyJob(args.output, so, args.column, inputs.dim, tuple(labels), classes, min(args.top_k, len(labels)),
                      args.batch_rows)
    extra = {"embeddings": args.embeddings, "templates": templates, "model": spec.model, "pretrained": spec.pretrained,
             "seed": spec.seed, "weights": clip.weights}
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Parts" >> beam.Create(list(enumerate(inputs.files)))
             | "Spread" >> beam.Reshuffle()
             | "Classify" >> beam.Map(_classify_part, job)
             | "Gather" >> beam.combiners.ToList()
             | "WriteManifest" >> beam.Map(_write_manifest, job, extra))
    manifest = storage.read_json(manifest_url, so)
    print_summary(f"clipbeam classify -> {args.output}", [
        ("labels", ", ".join(labels)), ("templates", len(templates)),
        ("images", manifest["rows"]), ("parts", len(manifest["parts"])), ("seconds", f"{watch.seconds:.1f}")])
    return 0
