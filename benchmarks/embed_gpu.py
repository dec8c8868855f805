"""One GPU run of clipbeam's embed data plane and model code: CPU decode against GPU decode (issue 10).

Needs only torch, torchvision, pillow, numpy and open_clip (no Beam, webdataset
or faiss): it runs the functions the embed pipeline's DecodeDoFn calls per
sample (models.pixels.decode_or_defer, images.sha256_hex, clip.tokenize_texts)
in a pool of --procs worker processes, the way a Beam GPU worker runs one SDK
process per core feeding one shared model (`--model-copies`); the main process
only reads the shards, stacks, copies and runs models.embedder.ClipEmbedder
with a models.caption_cache.CaptionCache, as ClipModelHandler does. The
shards (256 px JPEGs with captions, webdataset tars) are written with tarfile.

Modes (--modes), each run for at most --seconds over the shards (repeating them):
- model: one batch decoded and tokenised up front, embedded over and over: the model's own ceiling;
- model-images: the same without captions, which separates the text tower's cost;
- cpu: decode + resize + crop + tokenise in the worker processes, uint8 to the GPU in one copy per batch;
- gpu: JPEG headers checked and captions tokenised in the worker processes, batched nvjpeg decode,
  resize and crop on the GPU (what `--decode-device cuda` does);
- own: every worker process reads its own shards, decodes and runs its own copy of the model, as
  Beam's SDK processes do with the default `--model-copies 1`: only vectors leave a process.
The shards repeat, so with the caption cache on (--caption-cache-mb, default
64 as in the pipeline) later passes hit it; 0 turns it off (every caption
through the text tower). Prints images/s (steady state, the first batch
excluded) and GPU utilisation (nvidia-smi, every 200 ms). Without CUDA it
says so and runs on CPU.

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
from collections import deque
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


_WORKER: dict = {}  # per worker process: the recipe, its transform and the tokenizer, made once


def init_worker(spec, recipe, text: bool) -> None:
    """What DecodeDoFn.setup does, once in each worker process (no model, no CUDA)."""
    import torch

    from clipbeam.models.clip import load_tokenizer
    from clipbeam.models.pixels import uint8_transform

    torch.set_num_threads(1)
    _WORKER.update(recipe=recipe, transform=uint8_transform(recipe), tokenizer=load_tokenizer(spec) if text else None)


def decode_chunk(task: tuple[bool, list]) -> list[tuple]:
    """What DecodeDoFn does for each sample, in a worker process: decode (or only check a JPEG left for the
    GPU), hash, tokenise the caption. -> [(Decoded, sha256, caption, token ids or None)]"""
    from clipbeam.models.clip import tokenize_texts
    from clipbeam.models.images import sha256_hex
    from clipbeam.models.pixels import decode_or_defer

    on_device, chunk = task
    recipe, transform, tokenizer = _WORKER["recipe"], _WORKER["transform"], _WORKER["tokenizer"]
    out = []
    for data, caption in chunk:
        tokens = tokenize_texts(tokenizer, [caption])[0] if tokenizer is not None else None
        out.append((decode_or_defer(data, recipe, transform, on_device), sha256_hex(data), caption, tokens))
    return out


def decoded_in_order(pool, stream, on_device: bool, chunk: int, in_flight: int):
    """The stream's samples decoded by the worker processes, in order, with at most `in_flight` chunks
    queued (Pool.imap would read the whole stream ahead)."""
    pending: deque = deque()
    for part in _batched(stream, chunk):
        pending.append(pool.apply_async(decode_chunk, ((on_device, part),)))
        if len(pending) >= in_flight:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def tokens_encoder(batch: list[tuple], embedder):
    """The cache's misses (captions) -> vectors, from the token ids the worker processes made."""
    import numpy as np

    tokens = {caption: row for _, _, caption, row in batch}
    return lambda missing: embedder.embed_tokens(np.stack([tokens[c] for c in missing]))


MODES = {  # --modes key -> (row label, decode where, captions embedded)
    "model": ("model only", None, True),
    "model-images": ("model only, images only", None, False),
    "cpu": ("cpu decode", "cpu", True),
    "gpu": ("gpu decode", "gpu", True),
    "own": ("cpu decode, a model per process", "own", True),
}


def load_own_model(spec, recipe) -> int:
    """In a worker process: its own copy of the model on the device, once (what RunInference does in each
    SDK process when the model is not shared, `--model-copies 1`)."""
    from clipbeam.models.clip import load_clip
    from clipbeam.models.embedder import ClipEmbedder

    if "embedder" not in _WORKER:
        _WORKER["embedder"] = ClipEmbedder(load_clip(spec), recipe)
    return os.getpid()


def embed_own_shards(task: tuple) -> tuple[int, float, int, int]:
    """In a worker process: read its own shards, decode, tokenise and embed them with its own model until
    the deadline (wall clock); -> (images after its first batch, seconds since that batch, cache hits,
    cache misses)."""
    from clipbeam.models.caption_cache import CaptionCache

    spec, recipe, paths, batch_size, deadline, with_text, cache_mb = task
    load_own_model(spec, recipe)  # loaded already unless this process got no loading task
    embedder, cache = _WORKER["embedder"], CaptionCache(cache_mb << 20)
    count, start = 0, None
    for raw in _batched(samples(paths, time.monotonic() + deadline - time.time()), batch_size):
        batch = decode_chunk((False, raw))
        embedder.embed_images([d.pixels for d, _, _, _ in batch])
        if with_text:
            cache.embed([caption for _, _, caption, _ in batch], tokens_encoder(batch, embedder))
        synchronize(embedder.clip.device)
        if start is None:
            start = time.monotonic()
        else:
            count += len(batch)
    return count, (time.monotonic() - start) if start else 0.0, cache.hits, cache.misses


def run_own_models(spec, recipe, paths: list[str], pool, args) -> dict:
    """Every worker process decodes its share of the shards and feeds its own model: nothing but vectors
    crosses a process boundary. images/s is the sum of the processes' steady rates."""
    label, _, with_text = MODES["own"]
    with_text = with_text and args.text
    shares = [paths[rank::args.procs] or paths for rank in range(args.procs)]
    deadline = time.time() + args.seconds
    with GpuUtilisation() as util:
        results = pool.map(embed_own_shards,
                           [(spec, recipe, share, args.batch_size, deadline, with_text, args.caption_cache_mb)
                            for share in shares], chunksize=1)
    rate = sum(count / seconds for count, seconds, _, _ in results if seconds > 0)
    hits, lookups = sum(r[2] for r in results), sum(r[2] + r[3] for r in results)
    return {"mode": label, "captions": "on" if with_text else "off", "images": sum(r[0] for r in results),
            "images_per_s": rate, "gpu": util.summary(), "fallbacks": 0,
            "cache_hits": f"{hits / lookups:.0%}" if lookups else "-"}


def run_mode(key: str, embedder, recipe, paths: list[str], pool, args) -> dict:
    """Embed batches until the deadline; images/s after the first (warm-up) batch. The main process only
    reads the shards, stacks, copies and runs the model; the worker processes do the per-sample work."""
    import numpy as np

    from clipbeam.models.caption_cache import CaptionCache

    label, decode_on, with_text = MODES[key]
    if decode_on == "own":
        return run_own_models(embedder.clip.spec, recipe, paths, pool, args)
    with_text = with_text and args.text
    cache = CaptionCache(args.caption_cache_mb << 20)
    deadline = time.monotonic() + args.seconds
    stream = samples(paths, deadline)
    if decode_on is None:  # one batch decoded and tokenised up front, embedded over and over
        init_worker(embedder.clip.spec, recipe, with_text)
        batches = _repeat_until(decode_chunk((False, [next(stream) for _ in range(args.batch_size)])), deadline)
    else:
        work = decoded_in_order(pool, stream, decode_on == "gpu", args.chunk, 4 * args.procs)
        batches = _batched(work, args.batch_size)
    fallbacks, count, start, first = 0, 0, None, 0
    with GpuUtilisation() as util:
        for batch in batches:
            images = embedder.embed_images([d.pixels if d.pixels is not None else d.jpeg for d, _, _, _ in batch])
            fallbacks += images.fallbacks
            if with_text and decode_on is None:  # the same batch over and over: no cache
                embedder.embed_tokens(np.stack([tokens for _, _, _, tokens in batch]))
            elif with_text:  # as ClipModelHandler: cache keyed by caption, misses encoded from their tokens
                cache.embed([caption for _, _, caption, _ in batch], tokens_encoder(batch, embedder))
            synchronize(embedder.clip.device)
            if start is None:  # the first batch pays for cuDNN autotuning and allocator growth
                start, first = time.monotonic(), len(batch)
            count += len(batch)
    seconds = time.monotonic() - start if start else 0.0
    rate = (count - first) / seconds if seconds > 0 else 0.0
    hits = f"{cache.hits / (cache.hits + cache.misses):.0%}" if cache.hits + cache.misses else "-"
    return {"mode": label, "captions": "on" if with_text else "off", "images": count, "images_per_s": rate,
            "gpu": util.summary(), "fallbacks": fallbacks, "cache_hits": hits}


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


def parse_args() -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n", type=int, default=12_800, help="images in the shards (read repeatedly)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=45, help="time per mode")
    parser.add_argument("--procs", type=int, default=cores, help="decode worker processes (default: the cores)")
    parser.add_argument("--chunk", type=int, default=16, help="samples per task sent to a worker process")
    parser.add_argument("--start-method", default="spawn", choices=("spawn", "forkserver", "fork"))
    parser.add_argument("--caption-cache-mb", type=int, default=64, help="0: every caption through the tower")
    parser.add_argument("--no-text", dest="text", action="store_false", help="images only in every mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or args.procs < 1 or args.chunk < 1 or args.batch_size < 1:
        parser.error(f"unknown modes {unknown}" if unknown else "--procs, --chunk and --batch-size must be >= 1")
    return args


def main() -> int:
    args = parse_args()

    import multiprocessing

    import torch

    from clipbeam.models.clip import ClipSpec, load_clip, preprocess_config
    from clipbeam.models.embedder import ClipEmbedder
    from clipbeam.models.images import DEFAULT_MAX_PIXELS
    from clipbeam.models.pixels import PixelRecipe

    cuda = torch.cuda.is_available()
    device, precision = ("cuda", "fp16") if cuda else ("cpu", "fp32")
    where = torch.cuda.get_device_name(0) if cuda else "no CUDA: running on CPU, fp32 (numbers are not GPU ones)"
    spec = ClipSpec(args.model, "none", device=device, precision=precision)
    recipe = PixelRecipe(preprocess_config(spec), DEFAULT_MAX_PIXELS, fast_decode=True)
    embedder = ClipEmbedder(load_clip(spec), recipe)
    rows = []
    context = multiprocessing.get_context(args.start_method)
    with tempfile.TemporaryDirectory(prefix="clipbeam-gpu-") as root, \
            context.Pool(args.procs, init_worker, (spec, recipe, args.text)) as pool:
        start = time.monotonic()
        paths = write_shards(root, args.n, args.shard_size, len(os.sched_getaffinity(0)))
        pool.map(abs, range(args.procs))  # the workers have started (and loaded the tokenizer)
        if "own" in args.modes:  # every worker loads its model before any mode is timed
            loaded = set(pool.starmap(load_own_model, [(spec, recipe)] * args.procs * 4, chunksize=1))
            log(f"{len(loaded)} of {args.procs} worker processes hold their own model")
        log(f"wrote {args.n} JPEGs of {SIDE} px in {len(paths)} shards, {args.procs} decode processes "
            f"({args.start_method}) ready in {time.monotonic() - start:.1f} s")
        for key in args.modes:
            result = run_mode(key, embedder, recipe, paths, pool, args)
            log(f"{key}: {result}")
            rows.append(result)
    log(f"device: {where}; torch {torch.__version__}; imports apache_beam: {'apache_beam' in sys.modules}")
    table = [f"embed data plane on {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'}: {args.model} "
             f"{precision}, batch {args.batch_size}, {SIDE} px JPEGs, {args.procs} decode processes "
             f"(decode + tokenise per sample; the main process stacks, copies and runs the model, except in "
             f"`own`, where each process runs its own), "
             f"caption cache {args.caption_cache_mb} MB, "
             f"{args.seconds:.0f} s per mode",
             "| mode | captions | images | images/s | GPU utilisation | GPU->CPU fallbacks | caption cache hits |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['captions']} | {r['images']} | {r['images_per_s']:.0f} | {r['gpu']} | "
              f"{r['fallbacks']} | {r['cache_hits']} |" for r in rows]
    log("\n".join(table))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
