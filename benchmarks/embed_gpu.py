"""One GPU run of clipbeam's embed data plane and model code: CPU decode against GPU decode (issue 10).

Needs only torch, torchvision, pillow, numpy and open_clip (no Beam, webdataset
or faiss): it runs the functions the embed pipeline's DoFn and ModelHandler
call (models.pixels.decode_or_defer on a models.ordered_pool of threads, then
models.embedder.ClipEmbedder and models.caption_cache.CaptionCache), in one
process, over 256 px webdataset shards it writes itself with tarfile.

Modes, each run for at most --seconds over the shards (repeating them):
- model only: pixels decoded once up front, the model's own ceiling;
- cpu decode: decode + resize + crop on --threads CPU threads, uint8 to the GPU;
- gpu decode: JPEG headers checked on the CPU threads, batched nvjpeg decode,
  resize and crop on the GPU (what `--decode-device cuda` does).
Prints images/s (steady state, the first batch excluded) and GPU utilisation
(nvidia-smi, sampled every 200 ms). Without CUDA it says so and runs on CPU.

    python benchmarks/embed_gpu.py --out embed_gpu.txt            # on the GPU machine (see embed_gpu.sh)
    python benchmarks/embed_gpu.py --n 64 --seconds 3 --batch-size 16   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SIDE = 256
WORDS = "a red green blue photo of the small large dog cat car house on in with near street beach tree".split()


def log(message: str) -> None:
    print(message, flush=True)


def write_shards(root: str, n: int, shard_size: int, threads: int) -> list[str]:
    """n 256 px JPEGs (smooth colour fields with noise, ~20 KB) with captions, as webdataset tars."""
    import numpy as np
    from PIL import Image

    def jpeg(i: int) -> bytes:
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:SIDE, 0:SIDE]
        base, slope = rng.uniform(0, 255, 3), rng.uniform(-1, 1, (2, 3))
        arr = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 10, (SIDE, SIDE, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(jpeg, range(n)))
    rng = np.random.default_rng(0)
    paths = []
    for start in range(0, n, shard_size):
        path = os.path.join(root, f"{start // shard_size:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(n, start + shard_size)):
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 20)))).encode()
                for name, data in ((f"{i:09d}.jpg", images[i]), (f"{i:09d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def samples(paths: list[str], deadline: float):
    """(jpeg bytes, caption) from the shards, over and over until the deadline."""
    while time.monotonic() < deadline:
        for path in paths:
            with tarfile.open(path) as tar:
                image = None
                for member in tar:
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".jpg"):
                        image = data
                    else:
                        yield image, data.decode()
            if time.monotonic() >= deadline:
                return


class GpuUtilisation:
    """Samples the GPU's utilisation every 200 ms while active (nvidia-smi, else torch.cuda.utilization)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            return float(out.strip().splitlines()[0])
        except Exception:
            try:
                import torch

                return float(torch.cuda.utilization())
            except Exception:
                return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{sum(self.samples) / len(self.samples):.0f}% mean, {max(self.samples):.0f}% max"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_mode(mode: str, embedder, recipe, paths: list[str], args) -> dict:
    """Embed batches until the deadline; images/s after the first (warm-up) batch."""
    from clipbeam.models.caption_cache import CaptionCache
    from clipbeam.models.images import sha256_hex
    from clipbeam.models.ordered_pool import ordered_map
    from clipbeam.models.pixels import decode_or_defer, uint8_transform

    transform = uint8_transform(recipe)
    on_device = mode == "gpu decode"
    cache = CaptionCache(64 << 20)

    def decode(sample):  # what DecodeDoFn does for each sample, on its pool of threads
        data, caption = sample
        return decode_or_defer(data, recipe, transform, on_device), sha256_hex(data), caption

    deadline = time.monotonic() + args.seconds
    stream = samples(paths, deadline)
    if mode == "model only":  # one batch decoded up front, embedded over and over
        batches = _repeat_until([decode(next(stream)) for _ in range(args.batch_size)], deadline)
    else:
        work = ordered_map(decode, stream, args.threads, 2 * args.batch_size)
        batches = _batched(work, args.batch_size)
    fallbacks, count, start, first = 0, 0, None, 0
    with GpuUtilisation() as util:
        for batch in batches:
            items = [d.pixels if d.pixels is not None else d.jpeg for d, _, _ in batch]
            images = embedder.embed_images(items)
            fallbacks += images.fallbacks
            if args.text and mode == "model only":  # the same batch over and over: no cache
                embedder.embed_texts([caption for _, _, caption in batch])
            elif args.text:
                cache.embed([caption for _, _, caption in batch], embedder.embed_texts)
            synchronize(embedder.clip.device)
            if start is None:  # the first batch pays for cuDNN autotuning and allocator growth
                start, first = time.monotonic(), len(batch)
            count += len(batch)
    seconds = time.monotonic() - start if start else 0.0
    rate = (count - first) / seconds if seconds > 0 else 0.0
    return {"mode": mode, "images": count, "images_per_s": rate, "gpu": util.summary(), "fallbacks": fallbacks,
            "cache_hits": f"{cache.hits / max(1, cache.hits + cache.misses):.0%}"}


def _repeat_until(batch: list, deadline: float):
    while time.monotonic() < deadline:
        yield batch


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n", type=int, default=12_800, help="images in the shards (read repeatedly)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60, help="time per mode")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="decode threads")
    parser.add_argument("--no-text", dest="text", action="store_false", help="images only")
    parser.add_argument("--modes", default="model only,cpu decode,gpu decode")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()

    import torch

    from clipbeam.models.clip import ClipSpec, load_clip, preprocess_config
    from clipbeam.models.embedder import ClipEmbedder
    from clipbeam.models.pixels import PixelRecipe

    cuda = torch.cuda.is_available()
    device, precision = ("cuda", "fp16") if cuda else ("cpu", "fp32")
    where = torch.cuda.get_device_name(0) if cuda else "no CUDA: running on CPU, fp32 (numbers are not GPU ones)"
    log(f"device: {where}; torch {torch.__version__}; {args.threads} decode threads; imports apache_beam: "
        f"{sys.modules.get('apache_beam') is not None}")
    spec = ClipSpec(args.model, "none", device=device, precision=precision)
    recipe = PixelRecipe(preprocess_config(spec), 89_478_485, fast_decode=True)
    embedder = ClipEmbedder(load_clip(spec), recipe)
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipbeam-gpu-") as root:
        start = time.monotonic()
        paths = write_shards(root, args.n, args.shard_size, args.threads)
        log(f"wrote {args.n} JPEGs of {SIDE} px in {len(paths)} shards in {time.monotonic() - start:.1f} s")
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            result = run_mode(mode, embedder, recipe, paths, args)
            log(f"{mode}: {result}")
            rows.append(result)
    table = [f"embed data plane on {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'}: {args.model} "
             f"{precision}, batch {args.batch_size}, {SIDE} px JPEGs, captions {'on' if args.text else 'off'}, "
             f"{args.threads} decode threads, {args.seconds:.0f} s per mode",
             "| mode | images | images/s | GPU utilisation | GPU->CPU fallbacks | caption cache hits |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['images']} | {r['images_per_s']:.0f} | {r['gpu']} | {r['fallbacks']} | "
              f"{r['cache_hits']} |" for r in rows]
    log("\n".join(table))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
