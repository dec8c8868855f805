"""clipbeam embed: image-text corpora -> CLIP embeddings in Parquet, every sample accounted for.

Reads webdataset tar shards, manifest tables or folders of images from any
fsspec URL, runs open_clip through Beam's RunInference (transforms.embed_corpus),
and writes one Parquet part per input part, failure parts, and manifest.json
last, through the shared output lifecycle (clipbeam.layout). Reruns resume,
and a grown input costs only its new parts. Reads: parse -> validate into one
frozen EmbedJob -> build the pipeline from transforms -> commit.
Exit codes: 0 all samples embedded; 3 finished, but some samples failed (see
failures/); 1 the run did not finish; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import apache_beam as beam

from clipbeam import __version__
from clipbeam.commands.argtypes import non_negative_int, positive_int
from clipbeam.commands.common import (
    EXIT_UNFINISHED,
    Stopwatch,
    add_accelerator_argument,
    add_model_arguments,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    check_accelerator,
    clip_spec_from_args,
    print_summary,
    run_pipeline,
    runner_is_local,
    storage_options_from_args,
)
from clipbeam.commands.progress import MarkerProgress
from clipbeam.corpus.plan import FORMATS, ManifestColumns, PartSpec, plan_parts
from clipbeam.corpus.read import DEFAULT_MAX_MEMBER_BYTES, ReadLimits
from clipbeam.errors import UsageError
from clipbeam.layout import Mode, OutputFolder, open_output
from clipbeam.layout.embeddings import (
    EMBEDDINGS,
    FRAGMENTS,
    NUMBERS_NOTE,
    PartPlan,
    build_manifest,
    embeddings_file,
    failures_file,
    known_numbers,
    part_name,
    plan_numbers,
)
from clipbeam.layout.embeddings.metadata import DEFAULT_MAX_METADATA_COLUMNS
from clipbeam.layout.embeddings.schema import DIM_KEY
from clipbeam.layout.owned import remove_owned, remove_owned_temporaries
from clipbeam.models.clip import (
    SHIPPED_CHECKPOINTS,
    ClipSpec,
    embedding_dim,
    fetch_pretrained,
    is_checkpoint_path,
    load_clip,
    preprocess_config,
    validate_spec,
    weights_label,
)
from clipbeam.models.images import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_MAX_PIXELS
from clipbeam.storage import absolute_url
from clipbeam.transforms.clip_handler import DECODE_DEVICES, EmbedTuning, inference_summary
from clipbeam.transforms.embed_corpus import EmbedCorpus, EmbedCorpusConfig
from clipbeam.transforms.embed_write import PartInfo

LOG = logging.getLogger(__name__)
FLAGS = {"inputs": "--input"}  # library field -> this command's flag, where they differ (argtypes.flag_message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--input", action="append", required=True, metavar="URL", type=absolute_url,
                       help="tar shards, manifest tables or image folders; globs and brace ranges "
                            "(shards/{00000..00099}.tar); repeat for several")
    group.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: by suffix)")
    group.add_argument("--image-column", default=None, help="manifest column with image paths/URLs or bytes")
    group.add_argument("--caption-column", default=None, help="manifest column with captions")
    group.add_argument("--id-column", default=None, help="manifest column with ids (default: derived)")
    group.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                       help="images with more pixels fail as decompression bombs (default %(default)s)")
    group.add_argument("--max-member-bytes", type=positive_int, default=DEFAULT_MAX_MEMBER_BYTES,
                       help="tar members and image files larger than this fail as read failures, "
                            "before they are read (default %(default)s, 256 MB)")
    group.add_argument("--max-caption-chars", type=positive_int, default=DEFAULT_MAX_CAPTION_CHARS, metavar="N",
                       help="longer captions keep their first N characters, counted and noted in caption_note "
                            "(default %(default)s)")
    group.add_argument("--max-metadata-columns", type=positive_int, default=DEFAULT_MAX_METADATA_COLUMNS, metavar="N",
                       help="sidecar/manifest fields kept as columns per part; the rest go into json_raw, "
                            "counted (default %(default)s)")
    group.add_argument("--allow-any-path", action="store_true",
                       help="let a manifest name images outside its own filesystem (absolute local paths "
                            "in a remote manifest, another URL scheme)")
    add_storage_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--rows-per-part", type=positive_int, default=10_000,
                        help="manifests and folders are cut into parts of at most this many rows")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="stored embedding type (default %(default)s)")
    add_model_arguments(parser, default_model="ViT-B-32", default_pretrained="laion2b_s34b_b79k")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="fixed inference batch size")
    parser.add_argument("--model-copies", type=positive_int, default=1,
                        help="model copies shared by a GPU worker's processes (default 1: one per process)")
    add_accelerator_argument(parser)
    parser.add_argument("--no-text", action="store_true", help="do not embed captions")
    add_speed_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument("--prune", action="store_true",
                        help="drop the parts whose source is no longer in the input (default: keep them)")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed (none of these change the vectors, except --exact-decode)")
    group.add_argument("--decode-threads", type=non_negative_int, default=0, metavar="N",
                       help="threads decoding and resizing images in each worker (default: the worker's cores)")
    group.add_argument("--decode-device", default="cpu", choices=DECODE_DEVICES,
                       help="cuda: decode JPEGs in batches on the model's GPU (others fall back to CPU, counted)")
    group.add_argument("--exact-decode", action="store_true",
                       help="decode every JPEG at full size (default: JPEGs at least twice the model's input "
                            "are decoded at a reduced scale, never below it; README gives the measured effect)")
    group.add_argument("--caption-cache-mb", type=non_negative_int, default=64, metavar="MB",
                       help="per-worker cache of caption embeddings, for repeated captions (0: off; default 64)")
    group.add_argument("--full-text-context", action="store_true",
                       help="encode captions at the full context as open_clip does (same vectors, slower)")


def tuning_from_args(args: argparse.Namespace) -> EmbedTuning:
    if args.decode_device == "cuda" and args.device == "cpu":
        raise UsageError("--decode-device cuda decodes on the model's GPU; it needs --device cuda (or auto)")
    return EmbedTuning(decode_threads=args.decode_threads, decode_device=args.decode_device,
                       fast_decode=not args.exact_decode, caption_cache_mb=args.caption_cache_mb,
                       trim_text=not args.full_text_context)


@dataclass(frozen=True)
class EmbedJob:
    """One embed run's validated arguments."""

    inputs: tuple[str, ...]
    fmt: str
    output: str
    storage_options: dict
    spec: ClipSpec
    columns: ManifestColumns
    max_pixels: int
    max_caption_chars: int
    max_metadata_columns: int
    rows_per_part: int
    dtype: str
    embed_text: bool
    batch_size: int
    model_copies: int
    accelerator: str | None
    overwrite: bool
    prune: bool
    progress: bool
    limits: ReadLimits = ReadLimits()
    tuning: EmbedTuning = EmbedTuning()

    def settings(self, weights: str, dim: int) -> dict:
        """The resume fingerprint: every setting that changes what a part holds (not the input list,
        which may grow, nor batch sizes or workers, which change only speed). The caption and
        metadata caps count only when they differ from their defaults, so outputs written before
        the caps existed still resume."""
        settings = {
            "model": self.spec.model, "pretrained": self.spec.pretrained, "weights": weights,
            "seed": self.spec.seed, "precision": self.spec.precision, "dtype": self.dtype, "dim": dim,
            "embed_text": self.embed_text, "format": self.fmt, "image_column": self.columns.image,
            "caption_column": self.columns.caption, "id_column": self.columns.id,
            "max_pixels": self.max_pixels, "rows_per_part": self.rows_per_part,
            "max_member_bytes": self.limits.max_member_bytes, "allow_any_path": self.limits.allow_any_path,
            "fast_decode": self.tuning.fast_decode,
        }
        for key, value, default in (("max_caption_chars", self.max_caption_chars, DEFAULT_MAX_CAPTION_CHARS),
                                    ("max_metadata_columns", self.max_metadata_columns,
                                     DEFAULT_MAX_METADATA_COLUMNS)):
            if value != default:
                settings[key] = value
        return settings


def job_from_args(args: argparse.Namespace) -> EmbedJob:
    """Validate the arguments (UsageError: one line, exit 2) into one frozen EmbedJob."""
    check_accelerator(args.accelerator)
    return EmbedJob(
        inputs=tuple(args.input), fmt=args.format, output=args.output,
        storage_options=storage_options_from_args(args), spec=clip_spec_from_args(args),
        columns=ManifestColumns(args.image_column, args.caption_column, args.id_column),
        max_pixels=args.max_pixels, max_caption_chars=args.max_caption_chars,
        max_metadata_columns=args.max_metadata_columns, rows_per_part=args.rows_per_part,
        dtype=args.dtype,
        embed_text=not args.no_text, batch_size=args.batch_size, model_copies=args.model_copies,
        accelerator=args.accelerator, overwrite=args.overwrite, prune=args.prune,
        progress=not args.no_progress,
        limits=ReadLimits(args.max_member_bytes, args.allow_any_path),
        tuning=tuning_from_args(args),
    )


def _model_identity(spec: ClipSpec, storage_options: dict) -> tuple[str, int]:
    """(weights identity, dim). Checkpoints are loaded once here, so that an
    unreadable one is reported before any work starts."""
    if (spec.model, spec.pretrained) in SHIPPED_CHECKPOINTS or is_checkpoint_path(spec.pretrained):
        clip = load_clip(spec.replace(device="cpu", precision="fp32"), storage_options)
        return clip.weights, clip.dim
    return weights_label(spec, storage_options), embedding_dim(spec)


def start_parts(out: OutputFolder, parts: list[PartSpec], overwrite: bool) -> PartPlan:
    """Number the input parts by source, clear what the pending ones left, claim their file names.

    After --overwrite nothing is known, so numbering starts again from the sorted sources."""
    markers = out.ledger.markers()
    complete = out.ledger.complete(markers)
    previous = None if overwrite else out.previous_manifest
    known = known_numbers(out.notes.get(NUMBERS_NOTE), previous, markers.values())  # lost parts keep theirs
    plan = plan_numbers(parts, known, {n: m for n, m in markers.items() if n in complete})
    out.note(NUMBERS_NOTE, {**known, **{spec.source: n for n, spec in plan.numbered.items()}})
    keep = {part_name(n) for n in (*plan.done, *plan.gone)}
    out.ledger.forget([name for name in markers if name not in keep])  # stale or partial
    pending = [number for number, _ in plan.pending]
    out.claim([name for n in pending for name in (embeddings_file(n), failures_file(n))])
    for number in pending:  # files a killed run of these parts may have left
        for name in (embeddings_file(number), failures_file(number)):
            remove_owned(out.url, name, out.storage_options)
        remove_owned(out.url, f"{FRAGMENTS}/{part_name(number)}", out.storage_options, recursive=True)
    sys.stderr.write(f"clipbeam embed: {len(plan.done)} parts done already, {len(pending)} to run\n")
    return plan


def build_pipeline(pipeline: beam.Pipeline, pending: list[tuple[int, PartSpec]],
                   config: EmbedCorpusConfig) -> None:
    """The whole embed pipeline: the pending parts into EmbedCorpus."""
    _ = pipeline | "Parts" >> beam.Create(pending) | "EmbedCorpus" >> EmbedCorpus(config)


def corpus_config(job: EmbedJob, out: OutputFolder, plan: PartPlan, weights: str, dim: int) -> EmbedCorpusConfig:
    schema_meta = {DIM_KEY: str(dim), "clipbeam.model": job.spec.model, "clipbeam.weights": weights,
                   "clipbeam.dtype": job.dtype, "clipbeam.version": __version__}
    return EmbedCorpusConfig(
        ledger=out.ledger, spec=job.spec, dim=dim, preprocess=preprocess_config(job.spec),
        parts={n: PartInfo(p.source, p.fingerprint) for n, p in plan.pending}, columns=job.columns,
        limits=job.limits, max_pixels=job.max_pixels, max_caption_chars=job.max_caption_chars,
        max_metadata_columns=job.max_metadata_columns,
        embed_text=job.embed_text, batch_size=job.batch_size,
        model_copies=job.model_copies, dtype=job.dtype, schema_meta=schema_meta, accelerator=job.accelerator,
        tuning=job.tuning,
    )


def _drop_gone(out: OutputFolder, plan: PartPlan) -> None:
    """--prune: remove the files and markers of the parts whose source left the input."""
    for number, marker in sorted(plan.gone.items()):
        out.ledger.discard({part_name(number): marker})
        LOG.info("pruned part %d (%s)", number, marker["source"])
    kept = {s: n for s, n in out.notes.get(NUMBERS_NOTE, {}).items() if n not in plan.gone}
    out.note(NUMBERS_NOTE, kept)  # a pruned source that comes back is a new part


def commit(out: OutputFolder, job: EmbedJob, plan: PartPlan, seconds: float) -> dict | None:
    """Check every input part is done, drop or keep the gone parts, write the manifest last."""
    done = {int(m["part"]): m for m in out.done_units().values()}
    missing = [n for n in plan.numbered if n not in done]
    if missing:
        sys.stderr.write(f"clipbeam embed: {len(missing)} of {len(plan.numbered)} parts did not complete; "
                         "rerun the same command to resume\n")
        return None
    if job.prune:
        _drop_gone(out, plan)
    listed = {n: m for n, m in done.items() if n in plan.numbered or (n in plan.gone and not job.prune)}
    for folder in ("embeddings", "failures"):  # files left half-written by a killed run
        remove_owned_temporaries(out.url, folder, out.storage_options)
    remove_owned(out.url, FRAGMENTS, out.storage_options, recursive=True)
    extra = {"clipbeam_version": __version__, "inputs": list(job.inputs), "seconds_last_run": round(seconds, 3)}
    return out.commit(build_manifest(out.settings, listed, set(plan.numbered), extra))


def print_embed_summary(job: EmbedJob, plan: PartPlan, manifest: dict, seconds: float,
                        inference: list[tuple[str, object]] = ()) -> None:
    ran = sum(p["samples"] for p in manifest["parts"] if p["part"] not in plan.done and p["in_input"])
    rows = [
        ("output", job.output),
        ("parts", f"{len(plan.numbered)} ({len(plan.done)} skipped as done)"),
    ]
    if plan.gone:
        what = "dropped (--prune)" if job.prune else "kept (--prune drops them)"
        rows.append(("not in input", f"{len(plan.gone)} parts {what}"))
    rows += [("samples in", manifest["samples"]), ("embedded", manifest["rows"]), ("failed", manifest["failures"])]
    rows += [(f"  failed at {stage}", count) for stage, count in sorted(manifest["failed_by_stage"].items())]
    if manifest.get("metadata_folded"):
        rows.append(("metadata columns", f"{manifest['metadata_folded']} over --max-metadata-columns, in json_raw"))
    rows += [("seconds", f"{seconds:.1f}"), ("samples/s", f"{ran / seconds:.1f}" if seconds > 0 else "-")]
    print_summary("clipbeam embed: done", rows + list(inference))


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    job = job_from_args(args)
    options = beam_options(beam_args)
    validate_spec(job.spec, job.storage_options)
    remote_note = fetch_pretrained(job.spec, runner_is_local(beam_args))
    if remote_note:
        LOG.info("%s", remote_note)
    parts = plan_parts(list(job.inputs), job.fmt, job.storage_options, job.rows_per_part, job.columns)
    if not parts:
        raise UsageError("the inputs hold no samples")
    weights, dim = _model_identity(job.spec, job.storage_options)
    settings = job.settings(weights, dim)
    with open_output(job.output, EMBEDDINGS, settings, Mode.from_flags(job.overwrite), job.storage_options) as out:
        plan = start_parts(out, parts, job.overwrite)
        clock = Stopwatch()
        results: list = []  # the finished PipelineResult, for the caption cache's hit rate
        if plan.pending:
            pipeline = beam.Pipeline(options=options)
            build_pipeline(pipeline, plan.pending, corpus_config(job, out, plan, weights, dim))
            watch = MarkerProgress(job.output, len(plan.pending), job.storage_options) if job.progress else None
            if run_pipeline(pipeline, "embed", watch, results):
                return EXIT_UNFINISHED
        manifest = commit(out, job, plan, clock.seconds)
        if manifest is None:
            return EXIT_UNFINISHED
    print_embed_summary(job, plan, manifest, clock.seconds, inference_summary(results[0]) if results else [])
    return 3 if manifest["failures"] else 0
