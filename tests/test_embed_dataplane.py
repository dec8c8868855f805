"""The embed data plane: uint8 pixels, reduced-scale JPEG decode, GPU-path decode (through torchvision's
CPU decoder here), the ordered thread pool, the caption cache and bf16 autocast, each against open_clip."""

from __future__ import annotations

import io
import threading
import time

import imagefactory as imgs
import numpy as np
import pytest
import torch
from PIL import Image

from clipbeam.models.caption_cache import CaptionCache
from clipbeam.models.clip import ClipSpec, encode_images, encode_pixels, encode_texts, load_clip, preprocess_config
from clipbeam.models.images import decode_image, decode_sized
from clipbeam.models.ordered_pool import OrderedPool, ordered_map
from clipbeam.models.pixels import PixelRecipe, decode_on_cpu, decode_or_defer, device_pixels, uint8_transform

SPEC = ClipSpec("clipbeam-tiny")


@pytest.fixture(scope="module")
def clip():
    return load_clip(SPEC)


def photo(side: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients plus texture, `side` px on its shorter side."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side * 3 // 2] / side
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y) * 80 + 128 + rng.normal(0, 12, x.shape) for _ in range(3)]
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


SAMPLES = [imgs.jpeg(1), imgs.png(2), imgs.rgba_png(3), imgs.exif_rotated_jpeg(4), imgs.cmyk_jpeg(5),
           imgs.palette_png(6), imgs.png16(7), photo(300)]


def test_uint8_pixels_equal_open_clip_preprocessing(clip):
    recipe = PixelRecipe(preprocess_config(SPEC), 10**8)
    transform = uint8_transform(recipe)
    ours = [decode_on_cpu(data, recipe, transform) for data in SAMPLES]
    assert all(d.pixels.dtype == np.uint8 and d.pixels.shape == (3, 64, 64) for d in ours)
    vectors = encode_pixels(clip, torch.from_numpy(np.stack([d.pixels for d in ours])), recipe.mean, recipe.std)
    reference = encode_images(clip, torch.stack([clip.preprocess(decode_image(d)) for d in SAMPLES]))
    assert cosines(vectors, reference).min() >= 0.9999
    assert (ours[3].width, ours[3].height) == (30, 60)  # EXIF rotation applied to the reported size


def test_reduced_scale_decode_only_for_large_jpegs(clip):
    exact = PixelRecipe(preprocess_config(SPEC), 10**8)
    fast = PixelRecipe(preprocess_config(SPEC), 10**8, fast_decode=True)
    transform = uint8_transform(exact)
    big = photo(1024)  # 16x the 64 px input: decoded at 1/8 scale
    image, header = decode_sized(big, 10**8, min_side=64)
    assert min(image.size) >= 64 and max(image.size) < 1536 / 4 and (header.width, header.height) == (1536, 1024)
    slow, quick = decode_on_cpu(big, exact, transform), decode_on_cpu(big, fast, transform)
    assert (quick.width, quick.height) == (slow.width, slow.height) == (1536, 1024)
    vectors = encode_pixels(clip, torch.from_numpy(np.stack([slow.pixels, quick.pixels])), exact.mean, exact.std)
    assert 0.995 <= float(vectors[0] @ vectors[1]) < 1.0
    small = photo(100)  # < 2x the input: decoded exactly as before
    assert np.array_equal(decode_on_cpu(small, fast, transform).pixels, decode_on_cpu(small, exact, transform).pixels)
    png = imgs.encode(Image.open(io.BytesIO(big)), "PNG")  # not a JPEG: never reduced
    assert np.array_equal(decode_on_cpu(png, fast, transform).pixels, decode_on_cpu(png, exact, transform).pixels)


def test_device_decode_path_matches_cpu_and_counts_fallbacks(clip):
    recipe = PixelRecipe(preprocess_config(SPEC), 10**8)
    transform = uint8_transform(recipe)
    jpeg, png, rotated, twin = photo(200, 1), imgs.png(8), imgs.exif_rotated_jpeg(9), photo(200, 2)
    sources = (jpeg, png, rotated, twin)  # jpeg and twin share a size: resized in one call
    deferred = [decode_or_defer(data, recipe, transform, device_decode=True) for data in sources]
    assert deferred[0].jpeg == jpeg and deferred[0].pixels is None
    assert (deferred[0].width, deferred[0].height) == (300, 200)
    assert deferred[1].jpeg is None and deferred[2].jpeg is None  # not JPEG / EXIF-rotated: CPU path
    items = [d.jpeg if d.jpeg is not None else d.pixels for d in deferred]
    batch = device_pixels(items, recipe, "cpu", transform)
    assert batch.pixels.dtype == torch.uint8 and tuple(batch.pixels.shape) == (4, 3, 64, 64)
    assert batch.fallbacks == 0 and batch.failed == {}
    ours = encode_pixels(clip, batch.pixels, recipe.mean, recipe.std)
    cpu = np.stack([decode_on_cpu(d, recipe, transform).pixels for d in sources])
    assert cosines(ours, encode_pixels(clip, torch.from_numpy(cpu), recipe.mean, recipe.std)).min() >= 0.999
    # a JPEG the device decoder rejects goes to the CPU path (counted); one that fails there too is
    # reported (PIL's own message: the CPU path really ran), and the rest of the batch goes on
    batch = device_pixels([jpeg, imgs.truncated_jpeg(3), cpu[1]], recipe, "cpu", transform)
    assert batch.fallbacks == 1 and list(batch.failed) == [1]
    assert batch.failed[1].startswith(("not a readable image", "corrupt or truncated image"))
    assert torch.equal(batch.pixels[2], torch.from_numpy(cpu[1])) and batch.pixels[0].float().std() > 0


def test_ordered_pool_keeps_order_and_bounds_work_in_flight():
    running, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (i % 3))
        with lock:
            running[0] -= 1
        return i * i

    pool = OrderedPool(work, threads=3, window=5)
    out, pending_max = [], 0
    for i in range(40):
        out.extend(result for _, result in pool.submit(i, i))
        pending_max = max(pending_max, len(pool._pending))
    out.extend(result for _, result in pool.drain())
    pool.close()
    assert out == [i * i for i in range(40)]
    assert pending_max <= 5 and peak[0] <= 3
    assert list(ordered_map(lambda x: -x, range(10), threads=1, window=1)) == [-x for x in range(10)]
    assert list(ordered_map(lambda x: -x, range(10), threads=4, window=2)) == [-x for x in range(10)]


def test_caption_cache_is_exact_lru_and_bounded(clip):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return encode_texts(clip, texts)

    cache = CaptionCache(max_bytes=3 * (64 * 4 + 120 + 8))  # room for three short captions
    captions = ["image", "a dog", "image", "a cat", "image"]
    vectors = cache.embed(captions, encode)
    assert calls == [["image", "a dog", "a cat"]]  # each new caption encoded once
    assert cosines(vectors, encode_texts(clip, captions)).min() >= 0.9999
    assert (cache.hits, cache.misses) == (2, 3) and len(cache) == 3
    cache.embed(["image"], encode)  # a hit: "image" is now the most recently used
    assert calls == [["image", "a dog", "a cat"]] and cache.hits == 3
    cache.embed(["a bird"], encode)  # evicts the least recently used: "a dog"
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    cache.embed(["image", "a dog"], encode)
    assert calls[-1] == ["a dog"]
    off = CaptionCache(0)
    off.embed(["x", "x"], encode)
    assert calls[-1] == ["x", "x"] and (off.hits, off.misses) == (0, 0) and len(off) == 0


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    fp32 = load_clip(ClipSpec("shapes-clip", "shapes"))
    bf16 = load_clip(ClipSpec("shapes-clip", "shapes", precision="bf16"), cpu_autocast=True)
    assert bf16.autocast == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.float32
    recipe = PixelRecipe(preprocess_config(fp32.spec), 10**8)
    transform = uint8_transform(recipe)
    pixels = torch.from_numpy(np.stack([decode_on_cpu(imgs.jpeg(i, (64, 64)), recipe, transform).pixels
                                        for i in range(8)]))
    mean, std = recipe.mean, recipe.std
    image_cos = cosines(encode_pixels(fp32, pixels, mean, std), encode_pixels(bf16, pixels, mean, std))
    texts = ["a red circle", "a blue square", "a green triangle on gray"]
    text_cos = cosines(encode_texts(fp32, texts), encode_texts(bf16, texts))
    assert image_cos.min() >= 0.99 and text_cos.min() >= 0.99
    assert image_cos.min() < 1.0 or text_cos.min() < 1.0  # autocast really ran in bf16
