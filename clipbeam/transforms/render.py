"""The render step of `clipbeam generate`: one (prompt, seed) element -> one PNG.

`RenderPrompts` is the job's core as one composite transform: it spreads
RenderJobs over workers and renders each with RenderDoFn, which loads the
VQGAN and CLIP once per worker (DoFn.setup), renders with the seeded
VQGAN+CLIP loop, writes the image (PNG text chunks), the optional frames and
animation, and marks the render done (its marker lists its files); a render
that fails goes to the `failures` output instead of stopping the run.
`WriteRenderTables` gathers the rows into renders.parquet and failures.parquet.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam

from clipbeam.corpus.render_plan import RenderJob
from clipbeam.layout import LeaseLost, UnitLedger
from clipbeam.layout.owned import remove_owned
from clipbeam.layout.renders import (
    FAILURES_TABLE,
    RENDERS_TABLE,
    animation_name,
    frame_name,
    image_name,
    write_failures,
    write_renders,
)
from clipbeam.models.images import DEFAULT_MAX_PIXELS, load_image
from clipbeam.models.prompts import parse_prompts
from clipbeam.models.vqgan_clip import RenderSettings
from clipbeam.storage import atomic_open, join, read_bytes

LOG = logging.getLogger(__name__)


class InitImageError(Exception):
    """A render's init image could not be read or decoded: its failure row says stage `init_image`."""


@dataclass(frozen=True)
class ImagePromptSpec:
    """An `--image-prompt PATH[:weight[:stop]]`, before the image is loaded (on the worker)."""

    url: str
    weight: float = 1.0
    stop: float = float("-inf")


@dataclass(frozen=True)
class RenderConfig:
    """Everything the render step needs, fixed before the pipeline is built; picklable for workers."""

    vqgan: Any  # models.vqgan_checkpoint.VQGANSource
    clip: Any  # models.clip.ClipSpec
    settings: RenderSettings
    image_prompts: tuple[ImagePromptSpec, ...]
    output: str
    storage_options: dict
    animation: str  # gif | apng
    metadata: dict  # written into every PNG's text chunks
    accelerator: str | None = None
    ledger: UnitLedger | None = None  # the output folder's done-markers, set once the folder is opened


def _write_bytes(url: str, data: bytes, storage_options: dict | None) -> None:
    with atomic_open(url, "wb", storage_options) as handle:
        handle.write(data)


def png_bytes(pixels, text: dict[str, str]) -> bytes:
    """Encode uint8 [H, W, 3] as PNG with text chunks (deterministic bytes for equal inputs)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def animation_bytes(frames: list, kind: str) -> bytes:
    """GIF or APNG of the frames, 0.1 s each, looping; the last frame held for a second."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    durations = [100] * (len(images) - 1) + [1000]
    out = io.BytesIO()
    images[0].save(out, format="GIF" if kind == "gif" else "PNG", save_all=True, append_images=images[1:],
                   duration=durations, loop=0)
    return out.getvalue()


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RenderDoFn(beam.DoFn):
    """Loads VQGAN and CLIP once per worker; renders one job per element; failures to a tagged output."""

    def __init__(self, config: RenderConfig) -> None:
        self.config = config
        self.renders = beam.metrics.Metrics.counter("clipbeam.generate", "renders")
        self.failed = beam.metrics.Metrics.counter("clipbeam.generate", "failures")

    def setup(self) -> None:
        from clipbeam.models.clip import load_clip
        from clipbeam.models.embedder import QueryImages
        from clipbeam.models.pixels import DEFAULT_FAST_DECODE
        from clipbeam.models.vqgan_checkpoint import load_vqgan
        from clipbeam.models.vqgan_clip import ImagePrompt, Renderer

        config = self.config
        clip = load_clip(config.clip, config.storage_options)
        vqgan = load_vqgan(config.vqgan, clip.device, config.storage_options)
        self.renderer = Renderer(vqgan, clip)
        self.clip_weights = clip.weights
        queries = QueryImages(clip, DEFAULT_MAX_PIXELS, DEFAULT_FAST_DECODE)  # embed's defaults: embed's vector
        self.image_prompts = [ImagePrompt(queries.embed([read_bytes(p.url, config.storage_options)])[0],
                                          p.weight, p.stop, p.url) for p in config.image_prompts]
        self.finished = 0

    def process(self, job: RenderJob) -> Iterator[Any]:
        try:
            yield self._render(job)
            self.renders.inc()
        except (OSError, LeaseLost):  # the output cannot be written: the run stops (exit 1, rerun resumes)
            raise
        except Exception as exc:  # a render that fails (out of memory, a bad init image) never stops the others
            stage = "init_image" if isinstance(exc, InitImageError) else "render"
            cause = exc.__cause__ if isinstance(exc, InitImageError) and exc.__cause__ else exc
            LOG.warning("render %d/%d %s failed (%s): %s: %s", job.ordinal, job.total, job.row_id, stage,
                        type(cause).__name__, cause)
            self.failed.inc()
            _free_device_memory()
            yield beam.pvalue.TaggedOutput("failures", {
                "id": job.row_id, "prompt": job.prompt, "seed": job.seed, "stage": stage,
                "error": f"{type(cause).__name__}: {cause}"[:2000],
            })

    def _init_image(self, job: RenderJob):
        if not job.init_image:
            return None
        try:
            return load_image(job.init_image, self.config.storage_options)
        except Exception as exc:
            raise InitImageError(job.init_image) from exc

    def _render(self, job: RenderJob) -> dict:
        config = self.config
        init = self._init_image(job)
        frames = _Frames(config, job) if config.settings.save_every else None
        result = self.renderer.render(
            parse_prompts(job.prompt), seed=job.seed, steps=job.steps, width=job.width, height=job.height,
            settings=config.settings, image_prompts=self.image_prompts, init_image=init,
            progress=_progress_logger(job), on_frame=frames.add if frames else None,
        )
        animation = frames.write_animation() if frames else None
        _write_bytes(_join(config, image_name(job.row_id)), png_bytes(result.image, self._text_chunks(job)),
                     config.storage_options)
        row = {
            "id": job.row_id, "prompt": job.prompt, "seed": job.seed, "steps": job.steps,
            "width": job.width, "height": job.height, "loss_initial": result.loss_initial,
            "loss_final": result.loss_final, "clip_similarity": result.clip_similarity,
            "path": image_name(job.row_id), "animation": animation, "seconds": round(result.seconds, 3),
        }
        files = [image_name(job.row_id)] + (frames.names + [animation] if frames else [])
        config.ledger.mark_done(job.row_id, dict(row, key=job.settings_hash, losses=result.losses), files)
        self.finished += 1
        LOG.info("render %d/%d %s done in %s: loss %.4f -> %.4f (%d finished in this worker)", job.ordinal,
                 job.total, job.row_id, _format_eta(result.seconds), result.loss_initial, result.loss_final,
                 self.finished)
        return row

    def _text_chunks(self, job: RenderJob) -> dict[str, str]:
        """What a PNG says about itself: prompt, seed, size, models and every setting."""
        config = self.config
        return {
            "prompt": job.prompt,
            "seed": str(job.seed),
            "steps": str(job.steps),
            "size": f"{job.width}x{job.height}",
            "requested_size": f"{job.requested[0]}x{job.requested[1]}",
            "init_image": job.init_image or "",
            "clip_model": config.clip.model,
            "clip_pretrained": config.clip.pretrained,
            "clip_weights": self.clip_weights,
            "settings": json.dumps(config.metadata, sort_keys=True),
            "software": config.metadata["software"],
        }


def _join(config: RenderConfig, name: str) -> str:
    return join(config.output, name)


class _Frames:
    """The frames of one render with --save-every, written as they come, then the animation."""

    def __init__(self, config: RenderConfig, job: RenderJob) -> None:
        self.config, self.job = config, job
        self.pixels: list = []
        self.names: list[str] = []
        # Frames of an earlier, different render of this job must not mix with these.
        remove_owned(config.output, frame_name(job.row_id, 0).rsplit("/", 1)[0], config.storage_options,
                     recursive=True)  # never through a link

    def add(self, step: int, pixels) -> None:
        self.pixels.append(pixels)
        name = frame_name(self.job.row_id, step)
        _write_bytes(_join(self.config, name), png_bytes(pixels, {"step": str(step)}), self.config.storage_options)
        self.names.append(name)

    def write_animation(self) -> str | None:
        if not self.pixels:
            return None
        name = animation_name(self.job.row_id, self.config.animation)
        _write_bytes(_join(self.config, name), animation_bytes(self.pixels, self.config.animation),
                     self.config.storage_options)
        return name


def _progress_logger(job: RenderJob):
    """A progress callback that logs about ten lines per render, with the rate and the time left."""
    started = time.monotonic()
    every = max(1, job.steps // 10)

    def progress(step: int, steps: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            rate = step / max(time.monotonic() - started, 1e-9)
            LOG.info("render %d/%d %s: step %d/%d, loss %.4f, %.2f it/s, eta %s", job.ordinal, job.total,
                     job.row_id, step, steps, loss, rate, _format_eta((steps - step) / max(rate, 1e-9)))

    return progress


class RenderPrompts(beam.PTransform):
    """RenderJobs -> (rows, failures): the renders spread over workers, each rendered once."""

    def __init__(self, config: RenderConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, jobs):
        render = beam.ParDo(RenderDoFn(self.config)).with_outputs("failures", main="rows")
        if self.config.accelerator:  # only this step goes to GPU workers (Dataflow reads the hint)
            render = render.with_resource_hints(accelerator=self.config.accelerator)
        results = jobs | "Spread" >> beam.Reshuffle() | "Render" >> render
        return results.rows, results.failures


class WriteRenderTables(beam.PTransform):
    """(rows, failures) -> renders.parquet (with the rows of renders finished earlier) and failures.parquet."""

    def __init__(self, output: str, storage_options: dict, previous_rows: list[dict]) -> None:
        super().__init__()
        self.output = output
        self.storage_options = storage_options
        self.previous_rows = previous_rows

    def expand(self, rendered):
        rows, failures = rendered
        previous = rows.pipeline | "Completed" >> beam.Create(self.previous_rows)
        written = (
            (rows, previous)
            | "AllRows" >> beam.Flatten()
            | "RowList" >> beam.combiners.ToList()
            | "WriteRenders" >> beam.Map(write_renders, join(self.output, RENDERS_TABLE), self.storage_options)
        )
        failed = (
            failures
            | "FailureList" >> beam.combiners.ToList()
            | "WriteFailures" >> beam.Map(write_failures, join(self.output, FAILURES_TABLE), self.storage_options)
        )
        return written, failed


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
