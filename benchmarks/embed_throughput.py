"""Throughput of `clipbeam embed` against a bare open_clip loop, lever by lever (issue 10).

Rows, each measured in a fresh child process (so peak RSS is its own, and
images/s is over the whole process: interpreter start, imports, model load and
Beam start-up included):

1. the bare loop as users write it: PIL decode + open_clip preprocess +
   encode_image + encode_text at the full context, one process
   (1b: the same without captions, the baseline of `--no-text`);
2. `clipbeam embed` with everything on (its vectors are compared with row 1's);
3. `clipbeam embed` with each lever switched off in turn;
4. the data plane: `--model clipbeam-tiny --no-text` (a model that costs
   nothing) at `--decode-threads` 1 and 2 (and 2 with `--exact-decode`: the
   256 px corpus is >= 2x the tiny model's 64 px input, so reduced-scale
   decoding applies there), against a bare one-thread decode + preprocess loop;
5. large photos (3000 px): exact decoding against reduced-scale decoding
   (decode + preprocess, on one thread and on two), with the embeddings'
   cosine between them;
6. the text levers alone: ms per batch of the text tower at the full context,
   trimmed, and trimmed after sorting captions across batches, beside the image tower.

The corpus: JPEGs (256 px by default) in webdataset shards with captions of
3-40 words, about 10% of them repeated. Row 5 uses scikit-image's sample photos
upscaled (`pip install scikit-image`), or synthetic photos without it.

    python benchmarks/embed_throughput.py                  # the issue's sizes: 2,000 images, ViT-S-32
    python benchmarks/embed_throughput.py --n 64 --photos 8 --model clipbeam-tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

WORDS = ("red green blue small large old new wooden metal glass dog cat bird car house tree street beach "
         "mountain river city photo picture view of a the on in with near under at night morning sunny "
         "bottle chair table lamp shoe shirt phone book cup stainless steel leather cotton vintage modern").split()
COMMON = ["image", "photo", "untitled", "Stainless steel water bottle 750 ml", "a picture of a cat"]


def captions(n: int, seed: int = 0) -> list[str]:
    """n captions of 3-40 words; about 10% repeat a common or an earlier caption."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[str] = []
    for i in range(n):
        if i and rng.random() < 0.10:
            out.append(COMMON[rng.integers(len(COMMON))] if rng.random() < 0.5 else out[rng.integers(len(out))])
        else:
            out.append(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 41)))))
    return out


def make_corpus(root: str, n: int, shard_size: int, size: int) -> str:
    """n JPEGs (size x size, smooth pictures with texture) with captions, in webdataset tars."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    texts = captions(n)
    shards = (n + shard_size - 1) // shard_size
    for shard in range(shards):
        with wds.TarWriter(os.path.join(root, f"{shard:05d}.tar")) as sink:
            for i in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                base, slope = rng.uniform(0, 255, 3), rng.uniform(-1, 1, (2, 3))
                arr = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 8, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": texts[i]})
    return os.path.join(root, f"{{00000..{shards - 1:05d}}}.tar")


def tar_samples(root: str):
    """(key, jpeg bytes, caption) from the corpus tars, in order."""
    import glob
    import tarfile

    for path in sorted(glob.glob(os.path.join(root, "*.tar"))):
        with tarfile.open(path) as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                if {"jpg", "txt"} <= pending[key].keys():
                    sample = pending.pop(key)
                    yield key, sample["jpg"], sample["txt"].decode()


def child_bare(job: dict) -> dict:
    """Row 1: the loop users write, with open_clip directly (no clipbeam code)."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from clipbeam.models.clip import register_configs

    register_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(job["model"], pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(job["model"])
    vectors, batch, texts, keys = {}, [], [], []
    start = time.monotonic()

    def flush():
        with torch.no_grad():
            images = torch.nn.functional.normalize(model.encode_image(torch.stack(batch)), dim=-1)
            if job["text"]:
                model.encode_text(tokenizer(texts))
        vectors.update(zip(keys, images.numpy(), strict=True))

    for key, data, caption in tar_samples(job["corpus"]):
        batch.append(preprocess(Image.open(io.BytesIO(data)).convert("RGB")))
        texts.append(caption)
        keys.append(key)
        if len(batch) == job["batch_size"]:
            flush()
            batch, texts, keys = [], [], []
    if batch:
        flush()
    inner = time.monotonic() - start
    np.save(job["vectors"], np.stack([vectors[k] for k in sorted(vectors)]))
    return {"images": len(vectors), "inner_seconds": inner}


def child_decode_loop(job: dict) -> dict:
    """Row 4's baseline: decode + open_clip preprocess, one thread, no model."""
    import open_clip
    from PIL import Image

    from clipbeam.models.clip import ClipSpec, preprocess_config
    from clipbeam.models.pixels import build_preprocess

    preprocess = build_preprocess(preprocess_config(ClipSpec(job["model"])))
    count, start = 0, time.monotonic()
    for _, data, _ in tar_samples(job["corpus"]):
        preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
        count += 1
    del open_clip
    return {"images": count, "inner_seconds": time.monotonic() - start}


def child_pipeline(job: dict) -> dict:
    """Rows 2-4: `clipbeam embed` in this process, its summary captured for the cache hit rate."""
    from clipbeam.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["embed", "--input", job["pattern"], "--output", job["out"], "--model", job["model"],
                     "--pretrained", "none", "--batch-size", str(job["batch_size"]), "--no-progress",
                     "--overwrite", "--dtype", "float32", *job["flags"]])
    sys.stderr.write(err.getvalue()[-2000:])
    with open(os.path.join(job["out"], "manifest.json")) as handle:
        rows = json.load(handle)["rows"]
    hits = re.search(r"caption cache hits\s+([\d.]+%)", err.getvalue())
    inner = re.search(r"\n\s+seconds\s+([\d.]+)", err.getvalue())  # the summary's: the pipeline run itself
    result = {"images": rows, "code": code, "cache_hits": hits.group(1) if hits else "-",
              "inner_seconds": float(inner.group(1)) if inner else float("nan")}
    if job.get("compare") and os.path.exists(job["compare"]):  # row 1 ran (see --rows)
        result["min_cos_vs_bare"] = min_cosine_vs_bare(job["out"], job["compare"])
    return result


def min_cosine_vs_bare(out: str, bare_vectors: str) -> float:
    """The lowest cosine between the pipeline's image vectors and the bare loop's (same keys, sorted)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, "embeddings"), columns=["id", "image_embedding"]).to_pydict()
    rows = sorted(zip((i.rsplit("/", 1)[-1] for i in table["id"]), table["image_embedding"], strict=True))
    ours = np.asarray([vector for _, vector in rows], dtype=np.float32)
    return float((ours * np.load(bare_vectors)).sum(axis=1).min())


def run_child(job: dict) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"child {job['kind']} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.monotonic() - start
    return result


SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                  "retina", "cat", "colorwheel", "brick", "grass", "gravel", "moon", "text", "clock", "coins", "horse")


def photos(n: int, sides: tuple[int, ...]) -> list[bytes]:
    """n JPEG photos (quality 90) upscaled to the given long sides in turn: scikit-image's sample photos
    where the package is installed, synthetic ones (gradients, shapes and noise) where not."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data as sample

        sources = [Image.fromarray(np.asarray(getattr(sample, name)())).convert("RGB") for name in SKIMAGE_PHOTOS]
    except ImportError:
        rng = np.random.default_rng(1)
        sources = [Image.fromarray(np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8))
                   .resize((640, 480), Image.BICUBIC) for _ in range(12)]
    out = []
    for i in range(n):
        image, side = sources[i % len(sources)], sides[(i // len(sources)) % len(sides)]
        scale = side / max(image.size)
        big = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def child_photos(job: dict) -> dict:
    """Row 5 (and --decode-quality): exact vs reduced-scale decode + preprocess, one thread, and the
    cosine between the two embeddings of each photo under each model."""
    import numpy as np
    import torch

    from clipbeam.models.clip import ClipSpec, encode_pixels, load_clip, preprocess_config
    from clipbeam.models.ordered_pool import ordered_map
    from clipbeam.models.pixels import PixelRecipe, decode_on_cpu, uint8_transform

    data = photos(job["n"], tuple(job["sides"]))
    result: dict = {"images": len(data), "photos": "scikit-image" if _has_skimage() else "synthetic"}
    for name, pretrained in job["models"]:
        spec = ClipSpec(name, pretrained)
        exact = PixelRecipe(preprocess_config(spec), 10**9)
        fast = PixelRecipe(exact.cfg, 10**9, fast_decode=True)
        transform = uint8_transform(exact)
        pixels = {}
        for mode, recipe in (("exact", exact), ("fast", fast)):
            start = time.monotonic()
            pixels[mode] = np.stack([decode_on_cpu(item, recipe, transform).pixels for item in data])
            result.setdefault(f"{mode}_images_per_s", len(data) / (time.monotonic() - start))
        for mode, recipe in (("exact", exact), ("fast", fast)):  # the same on 2 threads, as DecodeDoFn runs it
            start = time.monotonic()
            list(ordered_map(lambda item, r=recipe, t=transform: decode_on_cpu(item, r, t), data, 2, 8))
            result.setdefault(f"{mode}_2_threads_images_per_s", len(data) / (time.monotonic() - start))
        clip = load_clip(spec)
        cos = [float(encode_pixels(clip, torch.from_numpy(np.stack([a, b])), exact.mean, exact.std).prod(0).sum())
               for a, b in zip(pixels["exact"], pixels["fast"], strict=True)]
        result[f"{name}/{pretrained}"] = {"min_cos": min(cos), "mean_cos": sum(cos) / len(cos)}
    return result


def child_towers(job: dict) -> dict:
    """Row 6: the text levers alone, ms per batch of the benchmark's captions: the text tower at the full
    context, trimmed batch by batch, and trimmed after sorting across 4 batches (OrderByCaptionLength);
    the image tower beside them for scale."""
    import numpy as np
    import torch

    from clipbeam.models.clip import ClipSpec, encode_images, encode_tokens, load_clip, tokenize_texts

    clip = load_clip(ClipSpec(job["model"]))
    size, window = job["batch_size"], 4 * job["batch_size"]
    tokens = tokenize_texts(clip.tokenizer, captions(window * 4))
    by_length = np.concatenate([chunk[np.argsort(np.count_nonzero(chunk, axis=1), kind="stable")]
                                for chunk in np.split(tokens, 4)])
    pixels = torch.rand(size, 3, clip.image_size, clip.image_size)

    def per_batch(encode, rows) -> float:
        encode(rows[:size])  # warm-up
        start = time.monotonic()
        for i in range(0, len(rows), size):
            encode(rows[i:i + size])
        return (time.monotonic() - start) * 1000 * size / len(rows)

    result = {"images": 0, "inner_seconds": 1.0,
              "text_full_ms": per_batch(lambda rows: encode_tokens(clip, rows, trim=False), tokens),
              "text_trimmed_ms": per_batch(lambda rows: encode_tokens(clip, rows), tokens),
              "text_sorted_ms": per_batch(lambda rows: encode_tokens(clip, rows), by_length)}
    result["image_ms"] = per_batch(lambda rows: encode_images(clip, rows), pixels.repeat(4, 1, 1, 1))
    return result


def _has_skimage() -> bool:
    try:
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


CHILDREN = {"bare": child_bare, "decode": child_decode_loop, "pipeline": child_pipeline, "photos": child_photos,
            "towers": child_towers}


def table_rows(args, tmp: str) -> list[tuple[str, dict]]:
    """Rows 1-4 of the issue's table, each printed as soon as it is measured."""
    root = os.path.join(tmp, "corpus")
    pattern = os.path.join(root, os.path.basename(make_corpus(root, args.n, args.shard_size, args.size)))
    common = {"corpus": root, "pattern": pattern, "model": args.model, "batch_size": args.batch_size}
    plane = {}
    if args.data_plane_n and args.data_plane_n != args.n:  # a larger corpus amortises start-up in rows 4
        root4 = os.path.join(tmp, "corpus4")
        plane = {"corpus": root4, "pattern": os.path.join(root4, os.path.basename(
            make_corpus(root4, args.data_plane_n, args.shard_size, args.size)))}
    bare_vectors = os.path.join(tmp, "bare.npy")
    plan = [
        ("1  bare open_clip loop (full context)", {"kind": "bare", "text": True, "vectors": bare_vectors}),
        ("2  clipbeam embed, everything on", {"kind": "pipeline", "flags": [], "compare": bare_vectors}),
        ("3a   text at the full context", {"kind": "pipeline", "flags": ["--full-text-context"]}),
        ("3b   no caption cache", {"kind": "pipeline", "flags": ["--caption-cache-mb", "0"]}),
        ("3c   one decode thread", {"kind": "pipeline", "flags": ["--decode-threads", "1"]}),
        ("1b bare open_clip loop, images only", {"kind": "bare", "text": False, "vectors": bare_vectors}),
        ("3d   --no-text (vs 1b)", {"kind": "pipeline", "flags": ["--no-text"]}),
        ("4  bare decode+preprocess, 1 thread", {"kind": "decode", "model": "clipbeam-tiny", **plane}),
        ("4a clipbeam-tiny, --decode-threads 1",
         {"kind": "pipeline", "model": "clipbeam-tiny", "flags": ["--no-text", "--decode-threads", "1"], **plane}),
        ("4b clipbeam-tiny, --decode-threads 2",
         {"kind": "pipeline", "model": "clipbeam-tiny", "flags": ["--no-text", "--decode-threads", "2"], **plane}),
        ("4c   the same, --exact-decode",
         {"kind": "pipeline", "model": "clipbeam-tiny",
          "flags": ["--no-text", "--decode-threads", "2", "--exact-decode"], **plane}),
    ]
    plan = [(name, job) for name, job in plan if not args.rows or name.split()[0] in args.rows]
    best: dict[str, dict] = {}
    for _ in range(args.repeat):  # whole rounds, so a slow spell of the machine hits every row alike
        for i, (name, job) in enumerate(plan):
            result = run_child({**common, **job, "out": os.path.join(tmp, f"out{i}")})
            print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
    return [(name, best[name]) for name, _ in plan]


def print_table(args, rows: list[tuple[str, dict]], photo: dict | None) -> None:
    base = {name[:2].strip(): r["images"] / r["seconds"] for name, r in rows if name.startswith(("1 ", "1b", "4 "))}
    inner_base = {name[:2].strip(): r["images"] / r["inner_seconds"] for name, r in rows
                  if name.startswith(("1 ", "1b", "4 "))}
    print(f"\nembed throughput: {args.n} JPEGs {args.size}x{args.size}, captions of 3-40 words (~10% repeated), "
          f"{args.model} (random weights), batch {args.batch_size}; whole process per row, "
          f"fastest of {args.repeat} round(s)")
    print("images/s and ratio: whole process (start-up, imports, model load included); inner: the loop or the "
          "pipeline run alone")
    print(f"| {'run':<40} | {'images/s':>9} | {'ratio':>6} | {'inner/s':>8} | {'inner ratio':>11} | "
          f"{'peak RSS MB':>11} | {'cache hits':>10} | note |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 8}|{'-' * 10}|{'-' * 13}|{'-' * 13}|{'-' * 12}|------|")
    for name, r in rows:
        key = "4" if name.startswith("4") else "1b" if name.startswith(("1b", "3d")) else "1"
        rate = r["images"] / r["seconds"]
        baseline = name.startswith(("1 ", "1b", "4 "))
        note = f"min cos vs row 1: {r['min_cos_vs_bare']:.6f}" if "min_cos_vs_bare" in r else \
            "" if baseline or key == "1" else f"vs row {key}"
        inner = r["images"] / r["inner_seconds"]
        ratio, inner_ratio = ("-", "-") if key not in base else \
            (f"{rate / base[key]:.2f}", f"{inner / inner_base[key]:.2f}")
        print(f"| {name:<40} | {rate:>9.1f} | {ratio:>6} | {inner:>8.1f} | {inner_ratio:>11} | "
              f"{r['peak_rss_mb']:>11.0f} | "
              f"{r.get('cache_hits', '-'):>10} | {note} |")
    if photo:
        models = {k: v for k, v in photo.items() if isinstance(v, dict)}
        cos = "; ".join(f"{k}: min cos {v['min_cos']:.5f}, mean {v['mean_cos']:.5f}" for k, v in models.items())
        print(f"| 5  {photo['images']} photos of 3000 px ({photo['photos']}), decode+preprocess 1 thread: exact "
              f"{photo['exact_images_per_s']:.1f}/s, reduced-scale {photo['fast_images_per_s']:.1f}/s "
              f"({photo['fast_images_per_s'] / photo['exact_images_per_s']:.2f}x); 2 threads: exact "
              f"{photo['exact_2_threads_images_per_s']:.1f}/s, reduced-scale "
              f"{photo['fast_2_threads_images_per_s']:.1f}/s; {cos} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="corpus images (default 2,000)")
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--data-plane-n", type=int, default=0,
                        help="corpus size for rows 4 (default: --n); larger amortises process start-up")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows, e.g. 4 4a 4b (default: all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over rows 1-4; each row keeps its fastest (shared machines drift)")
    parser.add_argument("--photos", type=int, default=200, help="row 5: photos of 3000 px (0: skip)")
    parser.add_argument("--decode-quality", action="store_true",
                        help="only measure reduced-scale decoding's cosine to exact preprocessing on scikit-image's "
                             "photos at 2048, 3000 and 4000 px (ViT-B-32 random, shipped shapes-clip)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        result = CHILDREN[job["kind"]](job)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.decode_quality:
        print(json.dumps(run_child({"kind": "photos", "n": 3 * len(SKIMAGE_PHOTOS), "sides": [2048, 3000, 4000],
                                    "models": [["ViT-B-32", "none"], ["shapes-clip", "shapes"]]}), indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="clipbeam-bench-") as tmp:
        rows = table_rows(args, tmp)
    photo = run_child({"kind": "photos", "n": args.photos, "sides": [3000], "models": [[args.model, "none"]]}) \
        if args.photos and (not args.rows or "5" in args.rows) else None
    print_table(args, rows, photo)
    if args.rows and "6" not in args.rows:
        return
    towers = run_child({"kind": "towers", "model": args.model, "batch_size": args.batch_size})
    print(f"| 6  {args.model} towers alone, ms per batch of {args.batch_size}: text at the full context "
          f"{towers['text_full_ms']:.0f}, trimmed per batch {towers['text_trimmed_ms']:.0f}, trimmed after sorting "
          f"across 4 batches {towers['text_sorted_ms']:.0f}; image tower {towers['image_ms']:.0f} |")


if __name__ == "__main__":
    main()
