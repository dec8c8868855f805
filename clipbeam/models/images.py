"""Image and caption bytes -> what CLIP expects, or a clear reason why not.

No Beam: corpora, search queries and render inputs share it.

Handles what real corpora hold: EXIF orientation, CMYK, 16-bit and float
images, palettes, alpha (composited on white, not dropped to black), animated
images (first frame), and decompression bombs (the pixel count is checked from
the header, before any pixel is decoded).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default cap (about 9,459 x 9,459)
EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def failure_reason(exc: Exception) -> str:
    """A decode failure row's error text: a DecodeError's own message, else the exception's class and message."""
    return str(exc) if isinstance(exc, DecodeError) else f"{exc.__class__.__name__}: {exc}"


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded."""

    format: str | None  # PIL's format name: JPEG, PNG, WEBP, ...
    width: int  # after EXIF orientation
    height: int
    reoriented: bool  # EXIF asks for a rotation or a flip


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an RGB PIL image with EXIF orientation applied."""
    return decode_sized(data, max_pixels)[0]


def decode_sized(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> tuple[Image.Image, ImageHeader]:
    """Bytes -> (RGB image, header), optionally decoded at a reduced scale.

    With `min_side`, a JPEG whose shorter side is at least twice `min_side` is
    decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT-domain scaling, PIL's
    `draft`), never below `min_side` on either side: several times faster on
    large photos, and the image is resized to the model's input anyway. The
    header keeps the full size, so the stored width and height do not change.

    Safe to call from several threads at once (embed decodes on a pool): the
    pixel cap is checked explicitly from the header, not by turning PIL's
    DecompressionBombWarning into an error with warnings.catch_warnings, whose
    filter changes are process-wide and race between threads.
    """
    image = _open_checked(data, max_pixels)
    header = _header(image)
    try:
        if min_side and image.format == "JPEG" and min(image.size) >= 2 * min_side:
            image.draft(image.mode, (min_side, min_side))
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except Exception as exc:
        raise DecodeError(f"corrupt or truncated image: {exc.__class__.__name__}: {exc}") from None
    return to_rgb(image), header


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of an image, checked like `decode_image` checks it, without decoding pixels
    (for images that are decoded elsewhere, e.g. JPEGs decoded on the GPU)."""
    return _header(_open_checked(data, max_pixels))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily and check what the header allows: some pixels, and no more than the cap."""
    if not data:
        raise DecodeError("empty image bytes")
    _allow_in_pil(max_pixels)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise DecodeError(f"not a readable image: {exc.__class__.__name__}: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} pixels exceeds the cap of {max_pixels} pixels")
    return image


def _allow_in_pil(max_pixels: int) -> None:
    """Raise PIL's own bomb cap (Image.MAX_IMAGE_PIXELS) to at least `max_pixels`.

    PIL refuses images over its cap before our check runs, so a --max-pixels
    above PIL's default of 89.5M would be ignored. The cap is only ever raised
    (it is process-wide, and workers may decode for several callers); each
    call's own `max_pixels` is still enforced by _open_checked.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _header(image: Image.Image) -> ImageHeader:
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # unreadable EXIF: exif_transpose will not rotate either
        orientation = 1
    width, height = image.size
    if orientation in (5, 6, 7, 8):  # a quarter turn, possibly with a flip
        width, height = height, width
    return ImageHeader(image.format, width, height, orientation not in (1, 0))


def load_image(url: str, storage_options: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """A single image file (a search query, an init image, an image prompt) -> RGB.

    Decoded by `decode_sized`, exactly as corpus images are, so a query photo
    and the same photo inside a corpus give the same pixels (EXIF orientation,
    alpha on white, the pixel cap; `min_side` as embed's reduced-scale JPEG
    decoding when the corpus was embedded with it). Raises FileNotFoundError
    for a missing file and DecodeError for bytes that are not a usable image.
    """
    from clipbeam.storage import open_input

    with open_input(url, storage_options) as handle:
        data = handle.read()
    return decode_sized(data, max_pixels, min_side)[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, without losing images to odd modes."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode != "F":
            array = array * (255.0 / 65535.0) if array.max(initial=0) > 255 else array
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DEFAULT_MAX_CAPTION_CHARS = 10_000
TRUNCATED = "caption truncated"  # how a truncation note starts (counted by the embed pipeline)


def decode_caption(value, max_chars: int | None = None) -> tuple[str | None, str | None]:
    """Caption bytes or text -> (caption or None, a note when bytes were not UTF-8 or it was cut).

    Empty and whitespace-only captions count as missing. Bytes that are not
    UTF-8 are decoded with replacement characters and the note says so. A
    caption longer than `max_chars` keeps its first `max_chars` characters: a
    10 MB caption would otherwise travel whole into every table and answer.
    """
    if value is None:
        return None, None
    notes = []
    if isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            text = bytes(value).decode("utf-8", errors="replace")
            notes.append("caption is not valid UTF-8; undecodable bytes replaced with U+FFFD")
    else:
        text = str(value)
    text = text.strip()
    if max_chars is not None and len(text) > max_chars:
        notes.insert(0, f"{TRUNCATED} from {len(text)} to {max_chars} characters")
        text = text[:max_chars].rstrip()
    return (text or None), "; ".join(notes) or None
