"""Image bytes for tests: ordinary pictures and every awkward case a corpus holds."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def picture(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random RGB picture (gradients + a block), different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-3, 3, (2, 3))
    arr = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def jpeg(seed: int, size=(48, 40)) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=90)


def png(seed: int, size=(48, 40)) -> bytes:
    return encode(picture(seed, size), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    return encode(picture(seed).convert("CMYK"), "JPEG")


def png16(seed: int) -> bytes:
    arr = (np.asarray(picture(seed).convert("L"), dtype=np.uint16) * 257)
    return encode(Image.fromarray(arr, "I;16"), "PNG")


def palette_png(seed: int) -> bytes:
    return encode(picture(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def rgba_png(seed: int) -> bytes:
    image = picture(seed).convert("RGBA")
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
    image.putalpha(alpha)
    return encode(image, "PNG")


def animated_gif(seed: int) -> bytes:
    frames = [picture(seed + i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg(seed: int, size=(60, 30)) -> bytes:
    """A 60x30 JPEG whose EXIF says 'rotate 90': it should come out 30x60."""
    image = picture(seed, size)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


def truncated_jpeg(seed: int) -> bytes:
    data = jpeg(seed, (64, 64))
    return data[: len(data) // 2]


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body
