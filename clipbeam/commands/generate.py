"""Render prompt lists with VQGAN+CLIP, one Beam element per (prompt, seed).

Reads: parse -> validate into one frozen GenerateConfig -> open the output
(refuse / clear / resume by settings fingerprint, clipbeam.layout) -> build the
pipeline from transforms.render (RenderPrompts, WriteRenderTables) -> commit
the manifest. The VQGAN and CLIP are loaded once per worker, so a list of a
thousand prompts costs one model load per worker, not one per image. The
folder format is clipbeam.layout.renders. A rerun into the same output skips
renders finished with the same settings and redoes the rest; `--overwrite`
starts over, deleting only the files earlier runs of this job wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass

import apache_beam as beam

from clipbeam import __version__
from clipbeam.commands.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
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
    run_pipeline,
    runner_is_local,
    storage_options_from_args,
)
from clipbeam.corpus.render_plan import PromptRow, RenderJob, parse_seeds, plan_renders, read_prompt_rows
from clipbeam.errors import UsageError, first_line
from clipbeam.layout import Mode, OutputFolder, open_output
from clipbeam.layout.renders import FAILURES_TABLE, FORMAT_VERSION, RENDER_COLUMNS, RENDERS, RENDERS_TABLE
from clipbeam.models.prompts import parse_prompt
from clipbeam.models.vqgan_clip import DEFAULT_AUGMENTATIONS, INITS, LR_SCHEDULES, RenderSettings
from clipbeam.storage import file_sha256, join, open_input
from clipbeam.transforms.render import ImagePromptSpec, RenderConfig, RenderPrompts, WriteRenderTables

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", metavar="FILE",
                        help=".txt (one prompt a line) or .csv/.parquet with a prompt column and optional "
                             "seed, steps, size (WxH), init_image columns")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt given inline (repeatable; rows after those of --prompts)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; one render per prompt and seed")
    parser.add_argument("--vqgan", required=True, metavar="PATH_OR_NAME",
                        help="taming .ckpt or .safetensors (YAML config beside it), or a shipped name")
    parser.add_argument("--vqgan-config", metavar="YAML", help="the checkpoint's taming config, if not beside it")
    loop = parser.add_argument_group("loop")
    loop.add_argument("--steps", type=positive_int, default=300, help="Adam steps per render (default %(default)s)")
    loop.add_argument("--size", type=positive_int, nargs=2, default=(256, 256), metavar=("W", "H"),
                      help="output size, rounded down to a multiple of the VQGAN factor (default 256 256)")
    loop.add_argument("--cutn", type=positive_int, default=32, help="cutouts per step (default %(default)s)")
    loop.add_argument("--cut-pow", type=positive_float, default=1.0,
                      help=">1 favours small cutouts (default %(default)s)")
    loop.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate (default %(default)s)")
    loop.add_argument("--augment", default=",".join(DEFAULT_AUGMENTATIONS),
                      help="comma-separated augmentations, or 'none' (default %(default)s)")
    loop.add_argument("--noise-fac", type=non_negative_float, default=0.1,
                      help="cutout noise amplitude (default %(default)s)")
    loop.add_argument("--init-image", metavar="PATH", help="start from this image instead of random tokens")
    loop.add_argument("--init-weight", type=non_negative_float, default=0.0,
                      help="pull toward the init image's latent: init_weight/2 * MSE (default 0)")
    loop.add_argument("--image-prompt", action="append", default=[], metavar="PATH[:WEIGHT[:STOP]]",
                      help="an image to match (repeatable)")
    loop.add_argument("--init", choices=INITS, default="tokens",
                      help="tokens: random codebook tokens; plain: a flat gray image (default %(default)s)")
    loop.add_argument("--tv-weight", type=non_negative_float, default=0.0,
                      help="weight of a total-variation term: flat regions, clean edges (default 0)")
    loop.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                      help="drop: lr/10 for the last quarter; cosine: down to lr/10 (default %(default)s)")
    loop.add_argument("--augment-scale", type=positive_float, default=1.0,
                      help="multiplies the affine and perspective magnitudes (default %(default)s)")
    loop.add_argument("--contrast", metavar="FILE",
                      help="texts (one a line) each prompt must win against: a softmax over CLIP's logits, e.g. the "
                           "other classes of a world (default: none)")
    loop.add_argument("--contrast-weight", type=non_negative_float, default=1.0,
                      help="weight of --contrast (default 1)")
    loop.add_argument("--save-every", type=non_negative_int, default=0, metavar="N",
                      help="save a frame every N steps and a progress animation (default off)")
    loop.add_argument("--animation", choices=("gif", "apng"), default="gif",
                      help="progress animation format with --save-every (default %(default)s)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    add_model_arguments(parser)
    add_accelerator_argument(parser)


@dataclass(frozen=True)
class GenerateConfig:
    """A validated generate run: what to render, with what, into where."""

    output: str
    storage_options: dict
    jobs: tuple[RenderJob, ...]
    render: RenderConfig
    resume_settings: dict  # the fingerprint a rerun must match to resume
    manifest: dict  # the manifest's fixed part (models, settings)
    factor: int


def _contrast_texts(url: str | None, storage_options: dict) -> tuple[str, ...]:
    if url is None:
        return ()
    try:
        with open_input(url, storage_options) as handle:
            texts = tuple(line.strip() for line in handle.read().decode("utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--contrast {url}: {first_line(exc)}") from None
    if not texts:
        raise UsageError(f"--contrast {url}: no texts in the file")
    return texts


def _check_loop_args(args: argparse.Namespace, storage_options: dict) -> RenderSettings:
    augment = () if args.augment.strip().lower() == "none" else tuple(
        a.strip() for a in args.augment.split(",") if a.strip())
    try:
        return RenderSettings(cutn=args.cutn, cut_pow=args.cut_pow, lr=args.lr, augment=augment,
                              noise_fac=args.noise_fac, init_weight=args.init_weight, save_every=args.save_every,
                              init=args.init, tv_weight=args.tv_weight, lr_schedule=args.lr_schedule,
                              augment_scale=args.augment_scale,
                              contrast=_contrast_texts(args.contrast, storage_options),
                              contrast_weight=args.contrast_weight)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_image(url: str, what: str, storage_options: dict) -> None:
    """An image argument must decode here, as the workers will decode it (models.images.load_image)."""
    from clipbeam.models.images import load_image

    try:
        load_image(url, storage_options)
    except FileNotFoundError:
        raise UsageError(f"{what} {url} does not exist") from None
    except Exception as exc:
        raise UsageError(f"{what} {url} cannot be decoded: {exc}") from None


def _image_prompts(args: argparse.Namespace, storage_options: dict) -> tuple[ImagePromptSpec, ...]:
    specs = []
    for text in args.image_prompt:
        try:
            prompt = parse_prompt(text)
        except ValueError as exc:
            raise UsageError(f"--image-prompt: {exc}") from None
        specs.append(ImagePromptSpec(prompt.text, prompt.weight, prompt.stop))
    for spec in specs:
        _check_image(spec.url, "image prompt", storage_options)
    if args.init_image:
        _check_image(args.init_image, "init image", storage_options)
    return tuple(specs)


def _prompt_rows(args: argparse.Namespace, storage_options: dict) -> list[PromptRow]:
    if not args.prompts and not args.prompt:
        raise UsageError("give --prompts FILE or --prompt TEXT")
    rows = read_prompt_rows(args.prompts, storage_options) if args.prompts else []
    rows += [PromptRow(text) for text in args.prompt]
    if not rows:
        raise UsageError(f"no prompts in {args.prompts}")
    if args.init_image:  # rows without their own init image start from --init-image
        rows = [r if r.init_image else dataclasses.replace(r, init_image=args.init_image) for r in rows]
    return rows


def _models(args: argparse.Namespace, storage_options: dict):
    """(CLIP spec, VQGAN source, model metadata) after checking both can be loaded."""
    from clipbeam.models.clip import resolve_device, validate_spec, weights_label
    from clipbeam.models.vqgan_checkpoint import resolve_vqgan

    spec = clip_spec_from_args(args)
    validate_spec(spec, storage_options)
    if spec.precision == "fp16" and resolve_device(spec.device) == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    source = resolve_vqgan(args.vqgan, args.vqgan_config, storage_options)
    models = {"software": f"clipbeam {__version__}", "vqgan": source.name,
              "vqgan_sha256": file_sha256(source.checkpoint, storage_options), "clip_model": spec.model,
              "clip_pretrained": spec.pretrained, "clip_weights": weights_label(spec, storage_options),
              "precision": spec.precision}
    return spec, source, models


def validate(args: argparse.Namespace) -> GenerateConfig:
    """Everything checkable, checked before anything is written; UsageError (exit 2) otherwise."""
    storage_options = storage_options_from_args(args)
    check_accelerator(args.accelerator)
    settings = _check_loop_args(args, storage_options)
    seeds = parse_seeds(args.seeds)
    rows = _prompt_rows(args, storage_options)
    spec, source, models = _models(args, storage_options)
    image_prompts = _image_prompts(args, storage_options)
    metadata = dict(models, cutn=settings.cutn, cut_pow=settings.cut_pow, lr=settings.lr,
                    augment=list(settings.augment), noise_fac=settings.noise_fac, init_weight=settings.init_weight,
                    save_every=settings.save_every, init=settings.init, tv_weight=settings.tv_weight,
                    lr_schedule=settings.lr_schedule, augment_scale=settings.augment_scale,
                    contrast=list(settings.contrast), contrast_weight=settings.contrast_weight,
                    animation=args.animation if settings.save_every else None,
                    image_prompts=[[p.url, p.weight, p.stop if math.isfinite(p.stop) else None]
                                   for p in image_prompts])
    # What makes a finished render reusable: everything but how the VQGAN was named (its hash is in).
    fingerprint = json.dumps({k: v for k, v in metadata.items() if k != "vqgan"}, sort_keys=True, default=str)
    jobs = plan_renders(rows, seeds, args.steps, tuple(args.size), source.config.factor, fingerprint)
    run_settings = dict(metadata, steps=args.steps, size=list(args.size), init_image=args.init_image)
    render = RenderConfig(vqgan=source, clip=spec, settings=settings, image_prompts=image_prompts,
                          output=args.output, storage_options=storage_options, animation=args.animation,
                          metadata=metadata, accelerator=args.accelerator)
    manifest = {
        "kind": "clipbeam.generate", "format_version": FORMAT_VERSION, "clipbeam_version": __version__,
        "model": spec.model, "pretrained": spec.pretrained, "weights": models["clip_weights"],
        "precision": spec.precision,
        "vqgan": {"name": source.name, "checkpoint": source.checkpoint, "sha256": models["vqgan_sha256"],
                  "config_origin": source.config_origin, "config": source.config.to_yaml_dict(),
                  "factor": source.config.factor},
        "settings": dict(run_settings, seeds=seeds), "prompts": args.prompts,
    }
    return GenerateConfig(args.output, storage_options, tuple(jobs), render,
                          {k: v for k, v in run_settings.items() if k != "vqgan"}, manifest, source.config.factor)


def completed_rows(jobs: tuple[RenderJob, ...], out: OutputFolder) -> dict[str, dict]:
    """Table rows of the jobs already rendered with the same settings (marker hash matches, files present)."""
    done = out.done_units()
    return {job.row_id: {name: done[job.row_id].get(name) for name in RENDER_COLUMNS}
            for job in jobs if done.get(job.row_id, {}).get("key") == job.settings_hash}


def _rounding_note(config: GenerateConfig) -> str | None:
    rounded = next((job for job in config.jobs if (job.width, job.height) != job.requested), None)
    if rounded is None:
        return None
    return f"{rounded.requested[0]}x{rounded.requested[1]} -> {rounded.width}x{rounded.height}"


def _table_rows(url: str, storage_options: dict) -> int:
    """Rows of a Parquet table, 0 when there is none."""
    import pyarrow.parquet as pq

    from clipbeam.storage import exists, open_input

    if not exists(url, storage_options):
        return 0
    with open_input(url, storage_options) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _render(config: GenerateConfig, out: OutputFolder, options, done: dict[str, dict]) -> int:
    """Build and run the pipeline over the renders not done yet; 0 or the unfinished exit code."""
    todo = [job for job in config.jobs if job.row_id not in done]
    LOG.info("%d renders planned, %d already complete, %d to render", len(config.jobs), len(done), len(todo))
    out.claim([RENDERS_TABLE, FAILURES_TABLE])
    render = dataclasses.replace(config.render, ledger=out.ledger)
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | "Jobs" >> beam.Create(todo)
        | "RenderPrompts" >> RenderPrompts(render)
        | "WriteTables" >> WriteRenderTables(config.output, config.storage_options, list(done.values()))
    )
    return run_pipeline(pipeline, "generate")


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    clock = Stopwatch()
    options = beam_options(beam_args)
    config = validate(args)
    from clipbeam.models.clip import fetch_pretrained

    remote_note = fetch_pretrained(config.render.clip, runner_is_local(beam_args))  # before the pipeline
    if remote_note:
        LOG.info("%s", remote_note)
    # Warnings only now: a bad argument must leave exactly one line on stderr.
    if config.render.clip.pretrained == "none":
        LOG.warning("--pretrained none: CLIP has random weights, so renders will not follow the prompts")
    rounding = _rounding_note(config)
    if rounding:
        LOG.warning("size %s rounded down to a multiple of the VQGAN factor %d", rounding, config.factor)
    out = open_output(config.output, RENDERS, config.resume_settings, Mode.from_flags(args.overwrite),
                      config.storage_options)
    with out:
        done = completed_rows(config.jobs, out)
        code = _render(config, out, options, done)
        if code:
            return code
        renders = _table_rows(join(config.output, RENDERS_TABLE), config.storage_options)
        failures = _table_rows(join(config.output, FAILURES_TABLE), config.storage_options)
        out.commit(dict(config.manifest, renders_planned=len(config.jobs), renders=renders, failures=failures,
                        renders_table=RENDERS_TABLE, failures_table=FAILURES_TABLE if failures else None,
                        files=[RENDERS_TABLE] + ([FAILURES_TABLE] if failures else [])))
    summary = [
        ("output", config.output),
        ("renders", f"{renders} of {len(config.jobs)} ({len(done)} resumed, {len(config.jobs) - len(done)} "
                    "rendered now)"),
        ("failures", failures),
        ("seconds", f"{clock.seconds:.1f}"),
    ]
    if rounding:
        summary.insert(2, ("size rounded", rounding))
    print_summary("clipbeam generate", summary)
    return 0
