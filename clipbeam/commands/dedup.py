"""Exact and near-duplicate groups over a corpus's embeddings (`clipbeam dedup`).

parse -> validate into one frozen DedupConfig -> cluster centroids (the
coarse quantizer of --index, or k-means on a sample), kept in OUT/_work/ ->
the Dedup pipeline (transforms/dedup_job.py) -> the gallery -> manifest.json,
last, through the output lifecycle. A rerun after a kill reuses the
centroids and every block pair's cached links; a rerun with other settings or
over grown embeddings is refused with one line (exit 2) naming what changed,
and `--overwrite` redoes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa

from clipbeam import __version__, storage
from clipbeam.commands.argtypes import non_negative_int, positive_int, unit_interval
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    run_pipeline,
    storage_options_from_args,
)
from clipbeam.dedup.clusters import Quantizer, block_counts, default_clusters, index_quantizer, train_quantizer
from clipbeam.dedup.gallery import write_dedup_gallery
from clipbeam.dedup.keep import COLUMNS, RULES
from clipbeam.errors import UsageError
from clipbeam.index import manifest as index_layout
from clipbeam.index.faiss_io import read_index
from clipbeam.index.plan import plan_sample, sample_reads
from clipbeam.index.sample import read_sample
from clipbeam.layout import Mode, OutputFolder, open_output, settings_fingerprint
from clipbeam.layout.dedup import DEDUP, MANIFEST, WORK, groups_file
from clipbeam.layout.embeddings.input_parts import embeddings_parts
from clipbeam.layout.embeddings.read import EmbeddingsInput, describe, part_keys, resolve_embeddings
from clipbeam.layout.owned import remove_owned
from clipbeam.transforms.dedup_job import Dedup, DedupConfig

LOG = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.95
SAMPLE_PER_CLUSTER = 64
MIN_SAMPLE = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url,
                        help="embed output folder, or Parquet file(s) (any fsspec URL)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    parser.add_argument("--threshold", type=unit_interval, action="append", default=None,
                        help=f"cosine similarity at or above which two samples are duplicates, in (0, 1]; "
                             f"repeat for several (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--keep", default="first", choices=RULES,
                        help="the sample each group keeps; ties go to the smallest id (default %(default)s)")
    parser.add_argument("--index", default=None, type=storage.absolute_url,
                        help="a clipbeam index of these embeddings: reuse its coarse quantizer as the clusters")
    parser.add_argument("--probe", type=positive_int, default=2,
                        help="clusters each vector is compared in: its own and the N-1 next nearest "
                             "(default %(default)s)")
    parser.add_argument("--clusters", type=positive_int, default=None,
                        help="k-means clusters (default: rows / --cluster-size)")
    parser.add_argument("--cluster-size", type=positive_int, default=1000,
                        help="rows per cluster when --clusters is not given (default %(default)s)")
    parser.add_argument("--block-rows", type=positive_int, default=4096,
                        help="rows per block: a cluster is compared a pair of blocks at a time (default %(default)s)")
    parser.add_argument("--column", default="image_embedding", help="vector column (default %(default)s)")
    parser.add_argument("--id-column", default="id", help="id column (default %(default)s)")
    parser.add_argument("--parts", type=positive_int, default=None,
                        help="groups/part-*.parquet files (default: one per embeddings part)")
    parser.add_argument("--gallery-groups", type=non_negative_int, default=8,
                        help="largest groups and borderline pairs shown in the gallery; 0: no gallery")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means sample (default 0)")
    parser.add_argument("--batch-rows", type=positive_int, default=65_536,
                        help="rows read at a time (default %(default)s)")


def _thresholds(values: list[float] | None) -> tuple[float, ...]:
    return tuple(sorted(set(values or [DEFAULT_THRESHOLD]), reverse=True))


def _check_index(url: str, inputs: EmbeddingsInput, storage_options: dict) -> dict:
    """--index: it must be a finished index of exactly these embeddings parts, with a coarse quantizer."""
    manifest = index_layout.read_manifest(url, storage_options)
    indexed = {key for source in manifest.get("embeddings", []) for key in part_keys(source)}
    given = part_keys(describe(inputs))
    if indexed != given or int(manifest["dim"]) != inputs.dim:
        raise UsageError(f"--index {url} was built from other embeddings than {inputs.url} "
                         f"({len(given - indexed)} part(s) not in it, {len(indexed - given)} not in the input)")
    return manifest


def _inputs_summary(inputs: EmbeddingsInput) -> str:
    """The embeddings parts as one short value: a grown corpus changes it, and the refusal names it."""
    files = sorted(part_keys(describe(inputs)))
    return f"{len(files)} parts, {inputs.rows} rows, {settings_fingerprint({'files': files})}"


def prepare(args: argparse.Namespace) -> tuple[DedupConfig, dict, EmbeddingsInput]:
    """Check arguments and inputs: (config without centroids, settings compared on resume, the input)."""
    storage_options = storage_options_from_args(args)
    thresholds = _thresholds(args.threshold)
    inputs = resolve_embeddings(args.embeddings, args.column, args.id_column, [], storage_options)
    missing = [c for c in COLUMNS[args.keep] if c not in inputs.schema.names]
    if missing:
        raise UsageError(f"--keep {args.keep} needs column(s) {', '.join(missing)}, which {args.embeddings} lacks")
    index = _check_index(args.index, inputs, storage_options) if args.index else None
    parts = embeddings_parts(inputs)
    hashes = "sha256" in inputs.schema.names
    if not hashes:
        LOG.warning("%s has no sha256 column: exact duplicates are found as near-duplicates only", args.embeddings)
    clusters = args.clusters or default_clusters(inputs.rows, args.cluster_size)
    settings = {"embeddings": args.embeddings, "inputs": _inputs_summary(inputs), "column": args.column,
                "id_column": args.id_column, "thresholds": list(thresholds), "keep": args.keep, "probe": args.probe,
                "clusters": None if index else clusters, "block_rows": args.block_rows, "seed": args.seed,
                "index": None if index is None else {"url": args.index, "fingerprint": index.get("fingerprint")},
                "parts": args.parts or len(parts), "gallery_groups": args.gallery_groups}
    stored = inputs.schema.field(args.column).type.value_type
    config = DedupConfig(args.output, storage_options, args.column, args.id_column, inputs.dim, thresholds,
                         args.keep, args.probe, None, None, args.batch_rows,
                         "float16" if stored == pa.float16() else "float32", settings["parts"], hashes, ledger=None)
    return config, settings, inputs


def _sample(inputs: EmbeddingsInput, rows: int, seed: int, config: DedupConfig) -> np.ndarray:
    train_ids, _ = plan_sample(inputs.files, min(rows, inputs.rows), 0, seed)
    reads = sample_reads(inputs.files, train_ids, np.zeros(0, np.int64))
    return read_sample(reads, config.column, config.dim, config.batch_rows, config.storage_options).train


def clusters(config: DedupConfig, settings: dict, inputs: EmbeddingsInput, index_url: str | None) -> DedupConfig:
    """The centroids and blocks per cluster: from OUT/_work/ when an earlier run of these settings left them."""
    url = config.url(WORK, "clusters.npz")
    if storage.exists(url, config.storage_options):
        with storage.open_input(url, config.storage_options) as handle:
            data = np.load(io.BytesIO(handle.read()))
            transform = data["transform"].tobytes() if len(data["transform"]) else None
            quantizer = Quantizer(data["centroids"], int(data["metric"]), transform)
            return dataclasses.replace(config, quantizer=quantizer, blocks=data["blocks"])
    wanted = settings["clusters"] or 1
    sample = _sample(inputs, max(SAMPLE_PER_CLUSTER * wanted, MIN_SAMPLE), settings["seed"], config)
    if index_url is not None:
        quantizer = index_quantizer(read_index(storage.join(index_url, index_layout.TRAINED_INDEX),
                                               config.storage_options, mmap=False))
        if quantizer is None:
            raise UsageError(f"--index {index_url} has no coarse quantizer (not an IVF index); "
                             "drop --index to cluster with k-means")
    else:
        quantizer = train_quantizer(sample, wanted, settings["seed"])
    blocks = block_counts(quantizer.assign(sample, 1)[:, 0], quantizer.count, inputs.rows, settings["block_rows"])
    buffer = io.BytesIO()
    np.savez(buffer, centroids=quantizer.centroids, metric=quantizer.metric, blocks=blocks,
             transform=np.frombuffer(quantizer.transform or b"", np.uint8))
    with storage.atomic_open(url, "wb", config.storage_options) as handle:
        handle.write(buffer.getvalue())
    LOG.info("%d clusters (%s), %d block pair units", quantizer.count, "from --index" if index_url else "k-means",
             int(sum(b * (b + 1) // 2 for b in blocks)))
    return dataclasses.replace(config, quantizer=quantizer, blocks=blocks)


def commit(out: OutputFolder, config: DedupConfig, settings: dict, inputs: EmbeddingsInput,
           gallery_files: list[str]) -> dict:
    """manifest.json, last: per threshold the samples, groups and removed samples; the parts; the histogram."""
    done = out.done_units()
    parts = sorted((m for m in done.values() if m.get("number", -1) < config.parts), key=lambda m: m["number"])
    samples = inputs.rows
    per_threshold = []
    for t in config.thresholds:
        counts = [p["counts"][str(t)] for p in parts]
        rows, groups = sum(c["rows"] for c in counts), sum(c["groups"] for c in counts)
        per_threshold.append({"threshold": t, "samples": samples, "groups": groups,
                              "exact_groups": sum(c["exact_groups"] for c in counts), "in_groups": rows,
                              "removed": rows - groups, "removed_percent": round(100 * (rows - groups) / samples, 3)})
    histogram_url = config.url(WORK, "nn.json")
    histogram = storage.read_json(histogram_url, config.storage_options) \
        if storage.exists(histogram_url, config.storage_options) else None
    manifest = out.commit({
        "version": 1, "clipbeam_version": __version__, **settings, "thresholds": list(config.thresholds),
        "clusters_used": config.quantizer.count, "per_threshold": per_threshold,
        "parts": [{"path": p["path"], "rows": p["rows"]} for p in parts if p["rows"]],
        "embeddings": describe(inputs), "nn_histogram": histogram, "gallery_files": gallery_files,
        "fingerprint": settings_fingerprint(settings)})
    remove_owned(config.output, WORK, config.storage_options, recursive=True)
    return manifest


def _already_done(args: argparse.Namespace, settings: dict, storage_options: dict) -> bool:
    url = storage.join(args.output, MANIFEST)
    if args.overwrite or not storage.exists(url, storage_options):
        return False
    manifest = storage.read_json(url, storage_options)
    return manifest.get("format") == DEDUP.name and manifest.get("fingerprint") == settings_fingerprint(settings)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    config, settings, inputs = prepare(args)
    if _already_done(args, settings, config.storage_options):
        LOG.info("%s already holds this dedup output: nothing to do (--overwrite redoes it)", args.output)
        return 0
    with open_output(args.output, DEDUP, settings, Mode.from_flags(args.overwrite), config.storage_options) as out:
        out.claim([groups_file(n) for n in range(config.parts)])
        config = clusters(dataclasses.replace(config, ledger=out.ledger), settings, inputs, args.index)
        pipeline = beam.Pipeline(options=options)
        _ = pipeline | "Parts" >> beam.Create(embeddings_parts(inputs)) | "Dedup" >> Dedup(config)
        code = run_pipeline(pipeline, "dedup")
        if code:
            return code
        gallery = write_dedup_gallery(out, config, inputs, args.gallery_groups)
        manifest = commit(out, config, settings, inputs, gallery)
    _print_summary(manifest, args.output, watch)
    return 0


def _print_summary(manifest: dict, output: str, watch: Stopwatch) -> None:
    rows = [("samples", manifest["per_threshold"][0]["samples"] if manifest["per_threshold"] else 0),
            ("clusters", manifest["clusters_used"])]
    for entry in manifest["per_threshold"]:
        rows.append((f"cos >= {entry['threshold']}",
                     f"{entry['groups']} groups ({entry['exact_groups']} exact), {entry['removed']} removed "
                     f"({entry['removed_percent']}%)"))
    if manifest["gallery_files"]:
        rows.append(("gallery", storage.join(output, "gallery", "index.html")))
    rows.append(("seconds", f"{watch.seconds:.1f}"))
    print_summary(f"clipbeam dedup -> {output}", rows)
