"""Image bytes -> the model's input as uint8 CHW pixels, on CPU threads or on the GPU (no Beam).

The pixels stay uint8, resized and cropped, until they reach the model's
device, where `clip.encode_pixels` scales and normalises them: 4x fewer bytes
than float32 through Beam and the `--model-copies` proxy. The CPU path runs
open_clip's own inference transform up to (not including) ToTensor and
Normalize; those steps are PIL operations on uint8 images, so the pixels are
exactly the ones open_clip's preprocessing would have normalised.

The GPU path decodes JPEGs in batches with nvjpeg (torchvision's decode_jpeg)
and resizes and crops them there; anything it cannot do (other formats,
EXIF-rotated JPEGs, resize modes other than `shortest`/`squash`, a failing
image) goes through the CPU path instead, and is counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clipbeam.models.images import ImageHeader, decode_sized, failure_reason, probe_image

DEFAULT_FAST_DECODE = True  # embed decodes large JPEGs at a reduced scale unless told --exact-decode

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work (set once, not per call:
# warnings.catch_warnings changes process-wide state and races with the decode threads)
warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")


@dataclass(frozen=True)
class PixelRecipe:
    """How a model wants its pixels: open_clip's preprocessing settings, plus the decoding choices."""

    cfg: dict  # open_clip's PreprocessCfg as a dict (clip.preprocess_config)
    max_pixels: int
    fast_decode: bool = False  # reduced-scale JPEG decoding for images >= 2x the input size

    @property
    def size(self) -> tuple[int, int]:
        size = self.cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.cfg["std"])

    @property
    def on_device_ok(self) -> bool:
        """Whether the GPU path can reproduce this resize mode."""
        mode = self.cfg.get("resize_mode", "shortest")
        square = self.size[0] == self.size[1]
        return (mode == "squash" or (mode == "shortest" and square)) and \
            self.cfg.get("interpolation", "bicubic") in ("bicubic", "bilinear")


@dataclass(frozen=True)
class Decoded:
    """One image ready for the model: uint8 CHW pixels, or JPEG bytes left for the GPU to decode."""

    pixels: np.ndarray | None
    jpeg: bytes | None
    width: int
    height: int


def build_preprocess(cfg: dict):
    """The torchvision transform open_clip uses at inference for these settings (clip.preprocess_config)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def uint8_transform(recipe: PixelRecipe):
    """open_clip's inference transform for these settings, without ToTensor and Normalize."""
    from torchvision.transforms import Normalize

    steps = [t for t in build_preprocess(recipe.cfg).transforms
             if not isinstance(t, Normalize) and type(t).__name__ not in ("ToTensor", "MaybeToTensor")]

    def transform(image) -> np.ndarray:
        for step in steps:
            image = step(image)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    return transform


def decode_on_cpu(data: bytes, recipe: PixelRecipe, transform) -> Decoded:
    """Bytes -> uint8 CHW pixels; DecodeError (or a transform error) for unusable bytes."""
    min_side = min(recipe.size) if recipe.fast_decode else None
    image, header = decode_sized(data, recipe.max_pixels, min_side)
    return Decoded(transform(image), None, header.width, header.height)


def decode_or_defer(data: bytes, recipe: PixelRecipe, transform, device_decode: bool) -> Decoded:
    """With `device_decode`, plain JPEGs are only checked here (header, pixel cap) and left for the GPU."""
    if device_decode and recipe.on_device_ok:
        header: ImageHeader = probe_image(data, recipe.max_pixels)
        if header.format == "JPEG" and not header.reoriented:
            return Decoded(None, data, header.width, header.height)
    return decode_on_cpu(data, recipe, transform)


def _resize_crop(image, recipe: PixelRecipe):
    """Decoded uint8 [..., C, H, W] tensors -> the model's input size, as open_clip's Resize + CenterCrop do."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.BICUBIC if recipe.cfg.get("interpolation", "bicubic") == "bicubic" \
        else InterpolationMode.BILINEAR
    height, width = recipe.size
    if recipe.cfg.get("resize_mode", "shortest") == "squash":
        return F.resize(image, [height, width], interpolation=mode, antialias=True)
    image = F.resize(image, height, interpolation=mode, antialias=True)
    return F.center_crop(image, [height, width])


@dataclass
class DevicePixels:
    """A batch on the model's device: uint8 [N,3,H,W] (zeros where an image failed), and what happened."""

    pixels: object  # torch.Tensor
    failed: dict[int, str]  # item index -> why neither the device nor the CPU could decode it
    fallbacks: int  # JPEGs the device could not decode, sent to the CPU path


def device_pixels(items: Sequence[np.ndarray | bytes], recipe: PixelRecipe, device: str,
                  transform=None) -> DevicePixels:
    """uint8 arrays and JPEG bytes -> one batch on `device`.

    JPEG bytes are decoded in one batched call on the device (nvjpeg on CUDA;
    torchvision's CPU decoder where `device` is cpu, which is how this path is
    tested without a GPU). If the batch call fails, each JPEG is tried alone;
    a JPEG that still fails goes through the CPU path (counted), and one that
    fails there too is reported in `failed`, so the rest of the batch goes on.
    """
    import torch

    jpegs = [i for i, item in enumerate(items) if isinstance(item, (bytes, bytearray))]
    on_host = {i: item for i, item in enumerate(items) if not isinstance(item, (bytes, bytearray))}
    decoded = dict(zip(jpegs, _decode_on_device([items[i] for i in jpegs], device), strict=True))
    resized = _resize_by_size({i: image for i, image in decoded.items() if image is not None}, recipe)
    failed: dict[int, str] = {}
    fallbacks = [i for i in jpegs if decoded[i] is None]
    if fallbacks and transform is None:
        transform = uint8_transform(recipe)
    for i in fallbacks:
        try:
            on_host[i] = decode_on_cpu(bytes(items[i]), recipe, transform).pixels
        except Exception as exc:
            failed[i] = failure_reason(exc)
            on_host[i] = np.zeros((3, *recipe.size), dtype=np.uint8)
    out = torch.empty((len(items), 3, *recipe.size), dtype=torch.uint8, device=device)
    if on_host:
        rows = list(on_host)
        out[torch.tensor(rows, device=device)] = to_device([on_host[i] for i in rows], device)
    for i, image in resized.items():
        out[i] = image
    return DevicePixels(out, failed, len(fallbacks))


def to_device(arrays: Sequence[np.ndarray], device: str):
    """uint8 arrays of one shape -> one [N, ...] tensor on `device`, in a single host-to-device copy.

    On CUDA the arrays are stacked straight into pinned memory, so the copy is
    one DMA that does not block the host; one small copy per image would pay
    the launch and synchronisation cost N times.
    """
    import torch

    shape = np.shape(arrays[0])
    host = torch.empty((len(arrays), *shape), dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    np.stack(arrays, out=host.numpy())
    return host.to(device, non_blocking=True)


def _decode_on_device(jpegs: list[bytes], device: str) -> list:
    """One batched decode call; if it fails, one call per JPEG (None for those that fail alone)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    if not encoded:
        return []
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception:
        return [_decode_one(tensor, device) for tensor in encoded]


def _resize_by_size(images: dict[int, object], recipe: PixelRecipe) -> dict[int, object]:
    """Decoded images -> the model's input size; images of one size are resized in one call."""
    import torch

    same_size: dict[tuple, list[int]] = {}
    for i, image in images.items():
        same_size.setdefault(tuple(image.shape), []).append(i)
    out = {}
    for group in same_size.values():
        resized = _resize_crop(torch.stack([images[i] for i in group]), recipe)
        out.update(zip(group, resized, strict=True))
    return out


def _decode_one(tensor, device: str):
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device)
    except Exception:
        return None
