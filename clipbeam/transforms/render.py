"""The render step of `clipbeam generate`: one (prompt, seed) element -> one PNG.

RenderDoFn loads the VQGAN and CLIP once per worker (DoFn.setup), renders each
job with the seeded VQGAN+CLIP loop, writes the image (PNG text chunks), the
optional frames and animation, and a per-render marker used by resume; a
render that fails goes to the `failures` output instead of stopping the run.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam

from clipbeam.models.prompts import parse_prompts
from clipbeam.models.vqgan_clip import RenderSettings

LOG = logging.getLogger(__name__)

IMAGES, MARKERS, FRAMES, ANIMATIONS = "images", "renders", "frames", "animations"


@dataclass(frozen=True)
class RenderJob:
    """One Beam element: a (prompt, seed) render with everything it needs to be redone identically."""

    index: int
    ordinal: int
    total: int
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    requested: tuple[int, int]
    init_image: str | None
    stem: str
    key: str


def _load_image(url: str, storage_options: dict | None):
    from PIL import Image

    from clipbeam.storage import open_input

    with open_input(url, storage_options) as handle:
        image = Image.open(io.BytesIO(handle.read()))
        image.load()
    return image.convert("RGB")


def _write_bytes(url: str, data: bytes, storage_options: dict | None) -> None:
    from clipbeam.storage import atomic_open

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

    def __init__(self, vqgan_source, clip_spec, settings: RenderSettings, image_prompts: list[tuple],
                 output: str, storage_options: dict, animation: str, metadata: dict) -> None:
        self.vqgan_source = vqgan_source
        self.clip_spec = clip_spec
        self.settings = settings
        self.image_prompt_specs = image_prompts
        self.output = output
        self.storage_options = storage_options
        self.animation = animation
        self.metadata = metadata
        self.renders = beam.metrics.Metrics.counter("clipbeam.generate", "renders")
        self.failed = beam.metrics.Metrics.counter("clipbeam.generate", "failures")

    def setup(self) -> None:
        from clipbeam.models.clip import load_clip
        from clipbeam.models.vqgan_checkpoint import load_vqgan
        from clipbeam.models.vqgan_clip import ImagePrompt, Renderer

        clip = load_clip(self.clip_spec, self.storage_options)
        vqgan = load_vqgan(self.vqgan_source, clip.device, self.storage_options)
        self.renderer = Renderer(vqgan, clip)
        self.clip_weights = clip.weights
        self.image_prompts = [
            ImagePrompt(_load_image(url, self.storage_options), weight, stop, url)
            for url, weight, stop in self.image_prompt_specs
        ]
        self.finished = 0

    def process(self, job: RenderJob) -> Iterator[Any]:
        try:
            yield self._render(job)
            self.renders.inc()
        except Exception as exc:  # a failed render never stops the others
            stage = getattr(exc, "clipbeam_stage", "render")
            LOG.warning("render %d/%d %s failed (%s): %s: %s", job.ordinal, job.total, job.stem, stage,
                        type(exc).__name__, exc)
            self.failed.inc()
            _free_device_memory()
            yield beam.pvalue.TaggedOutput("failures", {
                "id": job.stem, "prompt": job.prompt, "seed": job.seed, "stage": stage,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
            })

    def _render(self, job: RenderJob) -> dict:
        from clipbeam.storage import get_fs, join

        init = None
        if job.init_image:
            try:
                init = _load_image(job.init_image, self.storage_options)
            except Exception as exc:
                exc.clipbeam_stage = "init_image"  # type: ignore[attr-defined]
                raise
        prompts = parse_prompts(job.prompt)
        frames: list = []
        started = time.monotonic()
        every = max(1, job.steps // 10)

        def progress(step: int, steps: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                rate = step / max(time.monotonic() - started, 1e-9)
                LOG.info("render %d/%d %s: step %d/%d, loss %.4f, %.2f it/s, eta %s", job.ordinal, job.total,
                         job.stem, step, steps, loss, rate, _format_eta((steps - step) / max(rate, 1e-9)))

        if self.settings.save_every:  # frames of an earlier, different render of this job
            fs, frames_path = get_fs(join(self.output, FRAMES, job.stem), self.storage_options)
            if fs.exists(frames_path):
                fs.rm(frames_path, recursive=True)

        def on_frame(step: int, pixels) -> None:
            frames.append(pixels)
            url = join(self.output, FRAMES, job.stem, f"step-{step:05d}.png")
            _write_bytes(url, png_bytes(pixels, {"step": str(step)}), self.storage_options)

        result = self.renderer.render(
            prompts, seed=job.seed, steps=job.steps, width=job.width, height=job.height,
            settings=self.settings, image_prompts=self.image_prompts, init_image=init,
            progress=progress, on_frame=on_frame if self.settings.save_every else None,
        )
        animation_path = None
        if frames:
            suffix = "gif" if self.animation == "gif" else "png"
            animation_path = f"{ANIMATIONS}/{job.stem}.{suffix}"
            _write_bytes(join(self.output, animation_path), animation_bytes(frames, self.animation),
                         self.storage_options)
        text = {
            "prompt": job.prompt,
            "seed": str(job.seed),
            "steps": str(job.steps),
            "size": f"{job.width}x{job.height}",
            "requested_size": f"{job.requested[0]}x{job.requested[1]}",
            "init_image": job.init_image or "",
            "clip_model": self.clip_spec.model,
            "clip_pretrained": self.clip_spec.pretrained,
            "clip_weights": self.clip_weights,
            "settings": json.dumps(self.metadata, sort_keys=True),
            "software": self.metadata["software"],
        }
        image_path = f"{IMAGES}/{job.stem}.png"
        _write_bytes(join(self.output, image_path), png_bytes(result.image, text), self.storage_options)
        row = {
            "id": job.stem, "prompt": job.prompt, "seed": job.seed, "steps": job.steps,
            "width": job.width, "height": job.height, "loss_initial": result.loss_initial,
            "loss_final": result.loss_final, "clip_similarity": result.clip_similarity,
            "path": image_path, "animation": animation_path, "seconds": round(result.seconds, 3),
        }
        marker = dict(row, key=job.key, losses=result.losses)
        _write_bytes(join(self.output, MARKERS, job.stem + ".json"), json.dumps(marker).encode(),
                     self.storage_options)
        self.finished += 1
        LOG.info("render %d/%d %s done in %s: loss %.4f -> %.4f (%d finished in this worker)", job.ordinal,
                 job.total, job.stem, _format_eta(result.seconds), result.loss_initial, result.loss_final,
                 self.finished)
        return row


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
