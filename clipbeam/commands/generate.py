"""Render prompt lists with VQGAN+CLIP, one Beam element per (prompt, seed).

The VQGAN and CLIP are loaded once per worker (DoFn.setup), so a list of a
thousand prompts costs one model load per worker, not one per image. Output:

    OUT/images/NNNNN-<slug>-s<seed>.png   PNG text chunks: prompt, seed, settings, models
    OUT/renders/NNNNN-<slug>-s<seed>.json one per finished render (the resume marker, with its loss history)
    OUT/frames/<stem>/step-SSSSS.png      with --save-every N
    OUT/animations/<stem>.gif|.png        with --save-every N (GIF or APNG)
    OUT/renders.parquet                   one row per finished render
    OUT/failures.parquet                  one row per failed render (only when there are some)
    OUT/manifest.json                     written last: models, settings, counts

NNNNN is the prompt's row in the prompts file. A rerun into the same output
skips renders whose marker matches the current settings and redoes the rest;
`--overwrite` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from clipbeam.errors import UsageError
from clipbeam.models.prompts import parse_prompt, parse_prompts
from clipbeam.models.vqgan_clip import AUGMENTATIONS, RenderSettings, output_size
from clipbeam.transforms.render import (
    ANIMATIONS,
    FRAMES,
    IMAGES,
    MARKERS,
    RenderDoFn,
    RenderJob,
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

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
RENDERS_TABLE, FAILURES_TABLE, MANIFEST = "renders.parquet", "failures.parquet", "manifest.json"
TABLE_SUFFIXES = (".parquet", ".csv", ".txt")


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
    loop.add_argument("--steps", type=int, default=300, help="Adam steps per render (default %(default)s)")
    loop.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"),
                      help="output size, rounded down to a multiple of the VQGAN factor (default 256 256)")
    loop.add_argument("--cutn", type=int, default=32, help="cutouts per step (default %(default)s)")
    loop.add_argument("--cut-pow", type=float, default=1.0, help=">1 favours small cutouts (default %(default)s)")
    loop.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default %(default)s)")
    loop.add_argument("--augment", default=",".join(AUGMENTATIONS),
                      help="comma-separated augmentations, or 'none' (default %(default)s)")
    loop.add_argument("--noise-fac", type=float, default=0.1, help="cutout noise amplitude (default %(default)s)")
    loop.add_argument("--init-image", metavar="PATH", help="start from this image instead of random tokens")
    loop.add_argument("--init-weight", type=float, default=0.0,
                      help="pull toward the init image's latent: init_weight/2 * MSE (default 0)")
    loop.add_argument("--image-prompt", action="append", default=[], metavar="PATH[:WEIGHT[:STOP]]",
                      help="an image to match (repeatable)")
    loop.add_argument("--save-every", type=int, default=0, metavar="N",
                      help="save a frame every N steps and a progress animation (default off)")
    loop.add_argument("--animation", choices=("gif", "apng"), default="gif",
                      help="progress animation format with --save-every (default %(default)s)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    add_model_arguments(parser)
    add_accelerator_argument(parser)


@dataclass(frozen=True)
class PromptRow:
    """One row of the prompts file; None means "use the command-line value"."""

    prompt: str
    seed: int | None = None
    steps: int | None = None
    size: tuple[int, int] | None = None
    init_image: str | None = None


def slugify(text: str, limit: int = 48) -> str:
    """A file-name-safe, lowercase ASCII slug of a prompt ("prompt" when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > limit:
        slug = slug[:limit].rsplit("-", 1)[0] if "-" in slug[:limit] else slug[:limit]
    return slug or "prompt"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (duplicates dropped, order kept)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"-?\d+", part):
            raise UsageError(f"--seeds must be comma-separated integers, not {text!r}")
        if int(part) not in seeds:
            seeds.append(int(part))
    return seeds


def parse_size(value: Any) -> tuple[int, int]:
    """'256x128', '256 128' or (256, 128) -> (256, 128)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    match = re.fullmatch(r"\s*(\d+)\s*[x× ,]\s*(\d+)\s*", str(value))
    if not match:
        raise ValueError(f"size {value!r} is not WxH")
    return int(match.group(1)), int(match.group(2))


def _resolve_relative(path: str, base: str) -> str:
    if "://" in path or path.startswith("/") or "/" not in base:
        return path
    return base.rsplit("/", 1)[0] + "/" + path


def read_prompt_rows(url: str, storage_options: dict | None = None) -> list[PromptRow]:
    """Read a prompts file; raises UsageError naming the row for anything malformed.

    .txt: one prompt a line, blank lines and lines starting with '#' skipped.
    .csv/.parquet: a `prompt` column and optional `seed`, `steps`, `size`, `init_image`
    (init images relative to the prompts file).
    """
    from clipbeam.storage import get_fs

    lower = url.lower()
    if not lower.endswith(TABLE_SUFFIXES):
        raise UsageError(f"--prompts must be a .txt, .csv or .parquet file, not {url}")
    try:
        fs, path = get_fs(url, storage_options)
        if not fs.isfile(path):
            raise UsageError(f"prompts file {url} does not exist")
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read prompts file {url}: {exc}") from None
    if lower.endswith(".txt"):
        lines = data.decode("utf-8-sig").splitlines()
        return [PromptRow(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if lower.endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={"prompt": "string", "size": "string", "init_image": "string"}))
        else:
            table = pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise UsageError(f"cannot read prompts table {url}: {str(exc).splitlines()[0]}") from None
    if "prompt" not in table.column_names:
        raise UsageError(f"prompts table {url} has no 'prompt' column (columns: {', '.join(table.column_names)})")
    rows = []
    for number, record in enumerate(table.to_pylist(), start=1):
        try:
            prompt = record["prompt"]
            if prompt is None or not str(prompt).strip():
                raise ValueError("empty prompt")
            seed = _optional_int(record.get("seed"), "seed")
            steps = _optional_int(record.get("steps"), "steps")
            size = parse_size(record["size"]) if record.get("size") not in (None, "") else None
            init = record.get("init_image") or None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"prompts table {url}, row {number}: {exc}") from None
        rows.append(PromptRow(str(prompt).strip(), seed, steps, size,
                              _resolve_relative(str(init), url) if init else None))
    return rows


def _optional_int(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} {value!r} is not an integer")
    return int(value)


def plan_renders(rows: list[PromptRow], seeds: list[int], steps: int, size: tuple[int, int], factor: int,
                 fingerprint: str) -> list[RenderJob]:
    """Expand prompt rows x seeds into jobs (pure: no I/O). Raises UsageError for bad steps or sizes."""
    planned = []
    for index, row in enumerate(rows):
        try:
            parse_prompts(row.prompt)
        except ValueError as exc:
            raise UsageError(f"prompt {index}: {exc}") from None
        row_steps = row.steps if row.steps is not None else steps
        if row_steps < 1:
            raise UsageError(f"prompt {index}: steps must be at least 1")
        requested = row.size or tuple(size)
        try:
            width, height = output_size(requested[0], requested[1], factor)
        except ValueError as exc:
            raise UsageError(f"prompt {index}: {exc}") from None
        for seed in ([row.seed] if row.seed is not None else seeds):
            stem = f"{index:05d}-{slugify(row.prompt)}-s{seed}"
            identity = json.dumps([row.prompt, seed, row_steps, width, height, row.init_image, fingerprint])
            key = hashlib.sha256(identity.encode()).hexdigest()[:32]
            planned.append((index, row.prompt, seed, row_steps, width, height, tuple(requested), row.init_image,
                            stem, key))
    return [RenderJob(p[0], n, len(planned), *p[1:]) for n, p in enumerate(planned, start=1)]


def _check_image(url: str, what: str, storage_options: dict | None) -> None:
    from PIL import Image

    from clipbeam.storage import open_input

    try:
        with open_input(url, storage_options) as handle:
            Image.open(io.BytesIO(handle.read())).convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"{what} {url} does not exist") from None
    except Exception as exc:
        raise UsageError(f"{what} {url} cannot be decoded: {exc}") from None


RENDER_COLUMNS = ("id", "prompt", "seed", "steps", "width", "height", "loss_initial", "loss_final",
                  "clip_similarity", "path", "animation", "seconds")


def _renders_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("steps", pa.int32()),
        ("width", pa.int32()), ("height", pa.int32()), ("loss_initial", pa.float64()),
        ("loss_final", pa.float64()), ("clip_similarity", pa.float64()), ("path", pa.string()),
        ("animation", pa.string()), ("seconds", pa.float64()),
    ])


def _failures_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("stage", pa.string()),
                      ("error", pa.string())])


def write_table(rows: list[dict], schema, url: str, storage_options: dict | None) -> int:
    """Write rows (sorted by id) as one Parquet file, atomically; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipbeam.storage import atomic_open

    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)
    with atomic_open(url, "wb", storage_options) as handle:
        pq.write_table(table, handle)
    return len(rows)


def write_failures(rows: list[dict], url: str, storage_options: dict | None) -> int:
    """failures.parquet when there are failures; a stale one from an earlier run is removed."""
    from clipbeam.storage import get_fs

    if rows:
        return write_table(rows, _failures_schema(), url, storage_options)
    fs, path = get_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path)
    return 0


def _clear_output(output: str, storage_options: dict | None, everything: bool) -> None:
    """Remove the manifest (the run is incomplete until it is rewritten); with everything, all our outputs."""
    from clipbeam.storage import get_fs, join

    fs, _ = get_fs(output, storage_options)
    names = [MANIFEST] + ([RENDERS_TABLE, FAILURES_TABLE, IMAGES, MARKERS, FRAMES, ANIMATIONS] if everything else [])
    for name in names:
        path = get_fs(join(output, name), storage_options)[1]
        if fs.exists(path):
            fs.rm(path, recursive=True)


def completed_rows(jobs: list[RenderJob], output: str, storage_options: dict | None) -> dict[str, dict]:
    """Rows of the jobs already rendered with the same settings (marker key matches, image present)."""
    from clipbeam.storage import get_fs, join

    fs, markers_path = get_fs(join(output, MARKERS), storage_options)
    if not fs.exists(markers_path):
        return {}
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(markers_path, detail=False)}
    images = get_fs(join(output, IMAGES), storage_options)[1]
    have_images = {p.rsplit("/", 1)[-1] for p in fs.ls(images, detail=False)} if fs.exists(images) else set()
    done = {}
    for job in jobs:
        if job.stem + ".json" not in present or job.stem + ".png" not in have_images:
            continue
        with contextlib.suppress(Exception):
            with fs.open(get_fs(join(output, MARKERS, job.stem + ".json"), storage_options)[1], "rb") as handle:
                marker = json.loads(handle.read())
            if marker.get("key") == job.key:
                done[job.stem] = {name: marker.get(name) for name in RENDER_COLUMNS}
    return done


def _parse_image_prompt(spec: str) -> tuple[str, float, float]:
    prompt = parse_prompt(spec)
    return prompt.text, prompt.weight, prompt.stop


def _settings_from_args(args: argparse.Namespace) -> RenderSettings:
    augment = () if args.augment.strip().lower() == "none" else tuple(
        a.strip() for a in args.augment.split(",") if a.strip())
    try:
        return RenderSettings(cutn=args.cutn, cut_pow=args.cut_pow, lr=args.lr, augment=augment,
                              noise_fac=args.noise_fac, init_weight=args.init_weight, save_every=args.save_every)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from clipbeam import __version__
    from clipbeam.models.clip import resolve_device, validate_spec, weights_label
    from clipbeam.models.vqgan_checkpoint import checkpoint_sha256, resolve_vqgan
    from clipbeam.storage import check_writable, join

    clock = Stopwatch()
    options = beam_options(beam_args)
    so = storage_options_from_args(args)
    # Everything checkable is checked before anything is written.
    check_accelerator(args.accelerator)
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.save_every < 0:
        raise UsageError("--save-every must be 0 (off) or positive")
    if args.noise_fac < 0:
        raise UsageError("--noise-fac must not be negative")
    settings = _settings_from_args(args)
    seeds = parse_seeds(args.seeds)
    if not args.prompts and not args.prompt:
        raise UsageError("give --prompts FILE or --prompt TEXT")
    rows = read_prompt_rows(args.prompts, so) if args.prompts else []
    rows += [PromptRow(text) for text in args.prompt]
    if not rows:
        raise UsageError(f"no prompts in {args.prompts}")
    spec = clip_spec_from_args(args)
    validate_spec(spec, so)
    if spec.precision == "fp16" and resolve_device(spec.device) == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    source = resolve_vqgan(args.vqgan, args.vqgan_config, so)
    factor = source.config.factor
    try:
        image_prompts = [_parse_image_prompt(s) for s in args.image_prompt]
    except ValueError as exc:
        raise UsageError(f"--image-prompt: {exc}") from None
    for url, _, _ in image_prompts:
        _check_image(url, "image prompt", so)
    if args.init_image:
        _check_image(args.init_image, "init image", so)
    vqgan_sha256 = checkpoint_sha256(source.checkpoint, so)
    clip_weights = weights_label(spec, so)
    metadata = {
        "software": f"clipbeam {__version__}",
        "vqgan": source.name,
        "vqgan_sha256": vqgan_sha256,
        "clip_model": spec.model,
        "clip_pretrained": spec.pretrained,
        "clip_weights": clip_weights,
        "precision": spec.precision,
        "cutn": settings.cutn, "cut_pow": settings.cut_pow, "lr": settings.lr,
        "augment": list(settings.augment), "noise_fac": settings.noise_fac,
        "init_weight": settings.init_weight, "save_every": settings.save_every,
        "animation": args.animation if settings.save_every else None,
        "image_prompts": [[url, w, stop if math.isfinite(stop) else None] for url, w, stop in image_prompts],
    }
    # What makes a finished render reusable: everything but how the VQGAN was named (its hash is in).
    fingerprint = json.dumps({k: v for k, v in metadata.items() if k != "vqgan"}, sort_keys=True, default=str)
    if args.init_image:
        rows = [r if r.init_image else PromptRow(r.prompt, r.seed, r.steps, r.size, args.init_image) for r in rows]
    jobs = plan_renders(rows, seeds, args.steps, tuple(args.size), factor, fingerprint)
    rounded = next((job for job in jobs if (job.width, job.height) != job.requested), None)
    rounding_note = None
    if rounded is not None:
        rounding_note = f"{rounded.requested[0]}x{rounded.requested[1]} -> {rounded.width}x{rounded.height}"
    check_writable(args.output, so)
    # Warnings only now: a bad argument must leave exactly one line on stderr.
    if spec.pretrained == "none":
        LOG.warning("--pretrained none: CLIP has random weights, so renders will not follow the prompts")
    if rounded is not None:
        LOG.warning("size %s rounded down to a multiple of the VQGAN factor %d", rounding_note, factor)

    _clear_output(args.output, so, everything=args.overwrite)
    done = completed_rows(jobs, args.output, so)
    todo = [job for job in jobs if job.stem not in done]
    LOG.info("%d renders planned, %d already complete, %d to render", len(jobs), len(done), len(todo))
    renders_url, failures_url = join(args.output, RENDERS_TABLE), join(args.output, FAILURES_TABLE)
    counts: dict[str, int] = {}
    dofn = RenderDoFn(source, spec, settings, image_prompts, args.output, so, args.animation, metadata)
    with beam.Pipeline(options=options) as pipeline:
        results = (
            pipeline
            | "Jobs" >> beam.Create(todo)
            | "Spread" >> beam.Reshuffle()
            | "Render" >> with_accelerator(beam.ParDo(dofn).with_outputs("failures", main="rows"), args.accelerator)
        )
        previous = pipeline | "Completed" >> beam.Create(list(done.values()))
        (
            (results.rows, previous)
            | "AllRows" >> beam.Flatten()
            | "RowList" >> beam.combiners.ToList()
            | "WriteRenders" >> beam.Map(write_table, _renders_schema(), renders_url, so)
        )
        (
            results.failures
            | "FailureList" >> beam.combiners.ToList()
            | "WriteFailures" >> beam.Map(write_failures, failures_url, so)
        )
    import pyarrow.parquet as pq

    from clipbeam.storage import get_fs, write_json

    fs, _ = get_fs(args.output, so)
    with fs.open(get_fs(renders_url, so)[1], "rb") as handle:
        counts["renders"] = pq.ParquetFile(handle).metadata.num_rows
    failures_path = get_fs(failures_url, so)[1]
    if fs.exists(failures_path):
        with fs.open(failures_path, "rb") as handle:
            counts["failures"] = pq.ParquetFile(handle).metadata.num_rows
    else:
        counts["failures"] = 0
    manifest = {
        "kind": "clipbeam.generate",
        "format_version": FORMAT_VERSION,
        "clipbeam_version": __version__,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "weights": clip_weights,
        "precision": spec.precision,
        "vqgan": {
            "name": source.name,
            "checkpoint": source.checkpoint,
            "sha256": vqgan_sha256,
            "config_origin": source.config_origin,
            "config": source.config.to_yaml_dict(),
            "factor": factor,
        },
        "settings": dict(metadata, steps=args.steps, size=list(args.size), seeds=seeds,
                         init_image=args.init_image),
        "prompts": args.prompts,
        "renders_planned": len(jobs),
        "renders": counts["renders"],
        "failures": counts["failures"],
        "renders_table": RENDERS_TABLE,
        "failures_table": FAILURES_TABLE if counts["failures"] else None,
    }
    write_json(join(args.output, MANIFEST), manifest, so)
    summary = [
        ("output", args.output),
        ("renders", f"{counts['renders']} of {len(jobs)} ({len(done)} resumed, {len(todo)} rendered now)"),
        ("failures", counts["failures"]),
        ("seconds", f"{clock.seconds:.1f}"),
    ]
    if rounding_note:
        summary.insert(2, ("size rounded", rounding_note))
    print_summary("clipbeam generate", summary)
    return 0
