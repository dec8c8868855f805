"""Throughput and memory of `clipbeam embed` against a bare open_clip loop.

Prints one table: the bare loop (decode + open_clip preprocess + forward, the
same batch size and torch threads, no Beam) and `clipbeam embed` end to end on
the same corpus, images/s of each and their ratio, and the peak RSS of each;
then peak RSS of the pipeline at 1x and 4x the corpus size. Every measurement
runs in a fresh child process, so peak RSS is that measurement's own.

    python benchmarks/embed_throughput.py --n 2000 --model ViT-S-32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def make_corpus(root: str, n: int, shard_size: int, size: int) -> str:
    """n JPEGs (size x size, smooth random pictures) with captions, webdataset tars."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    shards = (n + shard_size - 1) // shard_size
    for shard in range(shards):
        with wds.TarWriter(os.path.join(root, f"{shard:05d}.tar")) as sink:
            for i in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                base, slope = rng.uniform(0, 255, 3), rng.uniform(-1, 1, (2, 3))
                arr = np.clip(base + x[..., None] * slope[0] + y[..., None] * slope[1], 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"a picture number {i}"})
    return os.path.join(root, f"{{00000..{shards - 1:05d}}}.tar")


def child_bare(corpus_root: str, model: str, batch_size: int) -> dict:
    """Decode + preprocess + forward in a plain loop over the same tars."""
    import glob
    import tarfile

    import torch

    from clipbeam.models.clip import ClipSpec, encode_images, encode_texts, load_clip
    from clipbeam.models.images import decode_image

    clip = load_clip(ClipSpec(model, "none"))
    start = time.monotonic()
    count = 0
    batch, texts = [], []

    def flush():
        encode_images(clip, torch.stack(batch))
        encode_texts(clip, texts)

    for path in sorted(glob.glob(os.path.join(corpus_root, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    batch.append(clip.preprocess(decode_image(data)))
                    count += 1
                elif member.name.endswith(".txt"):
                    texts.append(data.decode())
                if len(batch) == batch_size and len(texts) == batch_size:
                    flush()
                    batch, texts = [], []
    if batch:
        flush()
    seconds = time.monotonic() - start
    return {"images": count, "seconds": seconds, "threads": torch.get_num_threads()}


def child_pipeline(pattern: str, model: str, batch_size: int, out: str) -> dict:
    from clipbeam.cli import main

    start = time.monotonic()
    code = main(["embed", "--input", pattern, "--output", out, "--model", model, "--pretrained", "none",
                 "--batch-size", str(batch_size), "--no-progress", "--overwrite"])
    seconds = time.monotonic() - start
    with open(os.path.join(out, "manifest.json")) as handle:
        rows = json.load(handle)["rows"]
    import torch

    return {"images": rows, "seconds": seconds, "code": code, "threads": torch.get_num_threads()}


def run_child(*args: str) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"child {args[0]} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - start  # interpreter start, imports, model load included
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--no-4x", action="store_true", help="skip the 4x-corpus memory run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_bare(rest[0], rest[1], int(rest[2])) if kind == "bare" else \
            child_pipeline(rest[0], rest[1], int(rest[2]), rest[3])
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="clipbeam-bench-") as tmp:
        small = os.path.join(tmp, "x1")
        pattern = make_corpus(small, args.n, args.shard_size, args.size)
        bare = run_child("bare", small, args.model, str(args.batch_size))
        print(f"bare loop: {bare}", file=sys.stderr, flush=True)
        pipe = run_child("pipeline", os.path.join(small, pattern.rsplit("/", 1)[1]), args.model,
                         str(args.batch_size), os.path.join(tmp, "out1"))
        print(f"pipeline: {pipe}", file=sys.stderr, flush=True)
        rows = [("bare loop (decode+preprocess+forward)", bare), ("clipbeam embed (end to end)", pipe)]
        big = None
        if not args.no_4x:
            large = os.path.join(tmp, "x4")
            pattern4 = make_corpus(large, 4 * args.n, args.shard_size, args.size)
            big = run_child("pipeline", os.path.join(large, pattern4.rsplit("/", 1)[1]), args.model,
                            str(args.batch_size), os.path.join(tmp, "out4"))
            rows.append((f"clipbeam embed, 4x corpus ({4 * args.n})", big))

    print(f"\nembed throughput: {args.n} images {args.size}x{args.size} JPEG, {args.model} (random weights), "
          f"batch {args.batch_size}, torch threads {bare['threads']}, captions embedded too")
    print("images/s (loop): images over the seconds spent in the loop or the pipeline run itself;")
    print("images/s (process): images over the whole child process (imports, model load, Beam start-up).")
    print(f"| {'run':<40} | {'images':>6} | {'loop s':>7} | {'process s':>9} | {'images/s (loop)':>15} | "
          f"{'images/s (process)':>18} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 17}|{'-' * 20}|{'-' * 13}|")
    for name, r in rows:
        print(f"| {name:<40} | {r['images']:>6} | {r['seconds']:>7.1f} | {r['process_seconds']:>9.1f} | "
              f"{r['images'] / r['seconds']:>15.1f} | {r['images'] / r['process_seconds']:>18.1f} | "
              f"{r['peak_rss_mb']:>11.0f} |")
    loop_ratio = (pipe["images"] / pipe["seconds"]) / (bare["images"] / bare["seconds"])
    process_ratio = (pipe["images"] / pipe["process_seconds"]) / (bare["images"] / bare["process_seconds"])
    print(f"\npipeline / bare loop images/s, whole process: {process_ratio:.3f}; "
          f"pipeline end to end / bare inner loop: {loop_ratio:.3f}")
    if big is not None:
        print(f"peak RSS 4x / 1x corpus: {big['peak_rss_mb'] / pipe['peak_rss_mb']:.3f}")

if __name__ == "__main__":
    main()
