"""clipbeam embed: image-text corpora -> CLIP embeddings in Parquet, every sample accounted for.

Reads webdataset tar shards, manifest tables or folders of images from any
fsspec URL, runs open_clip through Beam's RunInference, and writes one Parquet
part per input part, failure parts, and manifest.json last. Reruns resume.
Exit codes: 0 all samples embedded; 3 finished, but some samples failed (see
failures/); 1 the run did not finish; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from clipbeam import __version__
from clipbeam.errors import UsageError
from clipbeam.models.clip import (
    SHIPPED_CHECKPOINTS,
    ClipSpec,
    embedding_dim,
    is_checkpoint_path,
    load_clip,
    preprocess_config,
    validate_spec,
    weights_label,
)
from clipbeam.commands.common import (
    Stopwatch,
    add_accelerator_argument,
    add_model_arguments,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    check_accelerator,
    clip_spec_from_args,
    print_summary,
    storage_options_from_args,
    with_accelerator,
)
from clipbeam.commands.embed_output import EmbedOutput
from clipbeam.commands.progress import MarkerProgress
from clipbeam.storage import absolute_url, check_writable
from clipbeam.transforms.clip_handler import ClipModelHandler
from clipbeam.transforms.corpus_plan import FORMATS, ManifestColumns, PartSpec, plan_parts
from clipbeam.models.images import DEFAULT_MAX_PIXELS
from clipbeam.transforms.embed_dofns import COUNTS, FAILURES, DecodeDoFn, ReadPartDoFn
from clipbeam.transforms.embed_write import SplitResultsDoFn, WritePartDoFn

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--input", action="append", required=True, metavar="URL", type=absolute_url,
                       help="tar shards, manifest tables or image folders; globs and brace ranges "
                            "(shards/{00000..00099}.tar); repeat for several")
    group.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: by suffix)")
    group.add_argument("--image-column", default=None, help="manifest column with image paths/URLs or bytes")
    group.add_argument("--caption-column", default=None, help="manifest column with captions")
    group.add_argument("--id-column", default=None, help="manifest column with ids (default: derived)")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="images with more pixels fail as decompression bombs (default %(default)s)")
    add_storage_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--rows-per-part", type=int, default=10_000,
                        help="manifests and folders are cut into parts of at most this many rows")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="stored embedding type (default %(default)s)")
    add_model_arguments(parser, default_model="ViT-B-32", default_pretrained="laion2b_s34b_b79k")
    parser.add_argument("--batch-size", type=int, default=64, help="fixed inference batch size")
    parser.add_argument("--model-copies", type=int, default=1,
                        help="model copies shared by a GPU worker's processes (default 1: one per process)")
    add_accelerator_argument(parser)
    parser.add_argument("--no-text", action="store_true", help="do not embed captions")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size <= 0:
        raise UsageError("--batch-size must be positive")
    if args.model_copies <= 0:
        raise UsageError("--model-copies must be positive")
    if args.rows_per_part <= 0:
        raise UsageError("--rows-per-part must be positive")
    if args.max_pixels <= 0:
        raise UsageError("--max-pixels must be positive")
    check_accelerator(args.accelerator)


def _model_identity(spec: ClipSpec, storage_options: dict) -> tuple[str, int]:
    """(weights identity, dim). Checkpoints are loaded once here, so that an
    unreadable one is reported before any work starts."""
    if (spec.model, spec.pretrained) in SHIPPED_CHECKPOINTS or is_checkpoint_path(spec.pretrained):
        clip = load_clip(spec.replace(device="cpu", precision="fp32"), storage_options)
        return clip.weights, clip.dim
    return weights_label(spec, storage_options), embedding_dim(spec)


def build_pipeline(pipeline: beam.Pipeline, pending: list[tuple[int, PartSpec]], *, output: str,
                   parts: dict[int, tuple[str, str]], spec: ClipSpec, storage_options: dict,
                   columns: ManifestColumns, preprocess_cfg: dict, max_pixels: int, embed_text: bool,
                   batch_size: int, model_copies: int, dim: int, dtype: str, schema_meta: dict,
                   accelerator: str | None = None) -> None:
    """read part -> decode/preprocess -> RunInference(CLIP) -> row fragments -> group by part -> write part."""
    read = (
        pipeline
        | "Parts" >> beam.Create(pending)
        | "SpreadParts" >> beam.Reshuffle()
        | "ReadPart" >> beam.ParDo(ReadPartDoFn(storage_options, columns)).with_outputs(
            FAILURES, COUNTS, main="samples")
    )
    decoded = read.samples | "Decode" >> beam.ParDo(DecodeDoFn(preprocess_cfg, max_pixels, embed_text)).with_outputs(
        FAILURES, main="decoded")
    handler = ClipModelHandler(spec, storage_options, batch_size=batch_size, model_copies=model_copies)
    results = decoded.decoded | "Embed" >> with_accelerator(RunInference(handler), accelerator)
    split = results | "Split" >> beam.ParDo(SplitResultsDoFn(output, dim, dtype, storage_options)).with_outputs(
        FAILURES, main="rows")

    def as_failure(record: dict):
        return record["part"], ("fail", record)

    (
        (
            split.rows,
            read[FAILURES] | "ReadFailures" >> beam.Map(as_failure),
            decoded[FAILURES] | "DecodeFailures" >> beam.Map(as_failure),
            split[FAILURES] | "EmbedFailures" >> beam.Map(as_failure),
            read[COUNTS] | "Counts" >> beam.Map(lambda kv: (kv[0], ("count", kv[1]))),
        )
        | "All" >> beam.Flatten()
        | "ByPart" >> beam.GroupByKey()
        | "WritePart" >> beam.ParDo(WritePartDoFn(output, parts, schema_meta, storage_options))
    )


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    _check_args(args)
    storage_options = storage_options_from_args(args)
    options = beam_options(beam_args)
    spec = clip_spec_from_args(args)
    validate_spec(spec, storage_options)
    parts = plan_parts(args.input, args.format, storage_options, args.rows_per_part)
    if not parts:
        raise UsageError("the inputs hold no samples")
    weights, dim = _model_identity(spec, storage_options)
    check_writable(args.output, storage_options)

    out = EmbedOutput(args.output, storage_options)
    if args.overwrite:
        out.clear()
    settings = {
        "clipbeam_version": __version__,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "weights": weights,
        "seed": spec.seed,
        "precision": spec.precision,
        "dtype": args.dtype,
        "dim": dim,
        "embed_text": not args.no_text,
        "inputs": list(args.input),
        "format": args.format,
    }
    out.prepare(settings)
    done = out.done_parts(parts)
    pending = [(i, p) for i, p in enumerate(parts) if i not in done]
    out.forget([i for i, _ in pending])
    LOG.info("%d parts planned, %d already done, %d to run", len(parts), len(done), len(pending))

    clock = Stopwatch()
    if pending:
        schema_meta = {"clipbeam.dim": str(dim), "clipbeam.model": spec.model, "clipbeam.weights": weights,
                       "clipbeam.dtype": args.dtype, "clipbeam.version": __version__}
        pipeline = beam.Pipeline(options=options)
        build_pipeline(
            pipeline, pending, output=args.output,
            parts={i: (p.source, p.fingerprint) for i, p in pending}, spec=spec,
            storage_options=storage_options,
            columns=ManifestColumns(args.image_column, args.caption_column, args.id_column),
            preprocess_cfg=preprocess_config(spec), max_pixels=args.max_pixels, embed_text=not args.no_text,
            batch_size=args.batch_size, model_copies=args.model_copies, dim=dim, dtype=args.dtype,
            schema_meta=schema_meta, accelerator=args.accelerator)
        try:
            if args.no_progress:
                pipeline.run().wait_until_finish()
            else:
                with MarkerProgress(args.output, len(pending), storage_options):
                    pipeline.run().wait_until_finish()
        except Exception as exc:
            LOG.error("pipeline failed: %s", exc)
            sys.stderr.write(f"clipbeam embed: the run did not finish ({exc.__class__.__name__}: {exc}); "
                             "rerun the same command to resume\n")
            return 1

    markers = out.done_parts(parts)
    missing = [i for i in range(len(parts)) if i not in markers]
    if missing:
        sys.stderr.write(f"clipbeam embed: {len(missing)} of {len(parts)} parts did not complete; "
                         "rerun the same command to resume\n")
        return 1
    out.remove_stale(markers)
    manifest = out.write_manifest(settings, parts, markers, clock.seconds)
    ran = sum(markers[i]["samples"] for i, _ in pending)
    rows = [
        ("output", args.output),
        ("parts", f"{len(parts)} ({len(done)} skipped as done)"),
        ("samples in", manifest["samples"]),
        ("embedded", manifest["rows"]),
        ("failed", manifest["failures"]),
    ]
    rows += [(f"  failed at {stage}", count) for stage, count in sorted(manifest["failed_by_stage"].items())]
    rows += [("seconds", f"{clock.seconds:.1f}"),
             ("samples/s", f"{ran / clock.seconds:.1f}" if clock.seconds > 0 else "-")]
    print_summary("clipbeam embed: done", rows)
    return 3 if manifest["failures"] else 0
