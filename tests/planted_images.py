"""A small real-image corpus with planted copies: each base picture, its transformed copies, and
distinct pictures that share one caption (for tests/test_dedup_images.py and benchmarks/dedup.py)."""

from __future__ import annotations

from embedhelpers import write_tar
from imagefactory import encode, picture
from PIL import Image, ImageEnhance

SIZE = (128, 96)


def _crop(image: Image.Image, share: float) -> Image.Image:
    w, h = image.size
    cw, ch = int(w * share), int(h * share)
    return image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


TRANSFORMS = {
    "exact copy": None, "re-captioned copy": None,
    "jpeg q30": lambda im: encode(im, "JPEG", quality=30), "jpeg q60": lambda im: encode(im, "JPEG", quality=60),
    "jpeg q95": lambda im: encode(im, "JPEG", quality=95),
    "resize 50%": lambda im: encode(im.resize((im.width // 2, im.height // 2)), "JPEG", quality=90),
    "resize 200%": lambda im: encode(im.resize((im.width * 2, im.height * 2)), "JPEG", quality=90),
    "crop 80%": lambda im: encode(_crop(im, 0.8), "JPEG", quality=90),
    "crop 95%": lambda im: encode(_crop(im, 0.95), "JPEG", quality=90),
    "colour shift": lambda im: encode(ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.06)).enhance(0.9),
                                      "JPEG", quality=90),
}


def write_corpus(path: str, bases: int, shared: int = 4) -> dict[str, tuple[str, int]]:
    """One tar: each base picture, its planted copies, and distinct pictures sharing one caption.
    Returns key -> (what it is, base)."""
    members, what = [], {}
    for base in range(bases):
        image = picture(base, SIZE)
        original = encode(image, "JPEG", quality=90)
        members += [(f"b{base}-orig.jpg", original), (f"b{base}-orig.txt", f"picture {base}".encode())]
        what[f"b{base}-orig"] = ("original", base)
        for n, (name, make) in enumerate(TRANSFORMS.items()):
            data = original if make is None else make(image)
            caption = f"another caption {base}" if name == "re-captioned copy" else f"picture {base}"
            members += [(f"b{base}-t{n:02d}.jpg", data), (f"b{base}-t{n:02d}.txt", caption.encode())]
            what[f"b{base}-t{n:02d}"] = (name, base)
    for s in range(shared):
        members += [(f"s{s}.jpg", encode(picture(10_000 + s, SIZE), "JPEG", quality=90)),
                    (f"s{s}.txt", b"a shared caption")]
        what[f"s{s}"] = ("distinct, shared caption", 10_000 + s)
    write_tar(path, members)
    return what
