"""A loaded CLIP behind the two calls the embed pipeline makes, with no Beam in it; and query images
(search --image, serve uploads, generate --image-prompt) through the very same calls.

The Beam ModelHandler (transforms/clip_handler.py) loads one of these per
worker, or shares one among a worker's processes through Beam's
multi_process_shared proxy (`--model-copies`), which is why images and
captions each come in one call with picklable arguments: uint8 pixel arrays
and JPEG bytes, and token ids (or strings). benchmarks/embed_gpu.py drives the same object
without Beam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clipbeam.models.clip import LoadedClip, encode_pixels, encode_texts, encode_tokens, preprocess_config
from clipbeam.models.pixels import (
    DevicePixels,
    PixelRecipe,
    decode_on_cpu,
    device_pixels,
    to_device,
    uint8_transform,
)


@dataclass
class ImageVectors:
    vectors: np.ndarray  # [N, D]; rows listed in `failed` are meaningless
    failed: dict[int, str]  # item index -> why its JPEG could not be decoded (GPU path only)
    fallbacks: int  # JPEGs decoded on the CPU because the device could not


class ClipEmbedder:
    """Embeds batches of images (uint8 CHW arrays, or JPEG bytes to decode on the model's device)
    and of captions."""

    def __init__(self, clip: LoadedClip, recipe: PixelRecipe, trim_text: bool = True) -> None:
        self.clip = clip
        self.recipe = recipe
        self.trim_text = trim_text
        self.transform = uint8_transform(recipe)

    def embed_images(self, items: Sequence[np.ndarray | bytes]) -> ImageVectors:
        """L2-normalised float32 [N, D]; JPEG bytes are decoded on the model's device first."""
        if all(isinstance(item, np.ndarray) for item in items):
            batch = DevicePixels(to_device(items, self.clip.device), {}, 0)
        else:
            batch = device_pixels(items, self.recipe, self.clip.device, self.transform)
        vectors = encode_pixels(self.clip, batch.pixels, self.recipe.mean, self.recipe.std)
        return ImageVectors(vectors, batch.failed, batch.fallbacks)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 [N, D], encoded without padding where that is exact."""
        return encode_texts(self.clip, texts, trim=self.trim_text)

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """As `embed_texts`, from token ids [N, context] made where the images were decoded
        (clip.tokenize_texts), so the model's thread does not tokenise."""
        return encode_tokens(self.clip, tokens, trim=self.trim_text)


class QueryImages:
    """Image bytes -> vectors by embed's own recipe, decoder and encoder (PixelRecipe, decode_on_cpu,
    ClipEmbedder), so identical bytes give embed's vector: one pixel path, not a copy of it.

    `max_pixels` and `fast_decode` are the decoding choices the corpus was embedded with
    (index.manifest.query_decoding), or embed's defaults where there is no corpus.
    """

    def __init__(self, clip: LoadedClip, max_pixels: int, fast_decode: bool) -> None:
        self.embedder = ClipEmbedder(clip, PixelRecipe(preprocess_config(clip.spec), max_pixels, fast_decode))

    @property
    def recipe(self) -> PixelRecipe:
        return self.embedder.recipe

    def pixels(self, data: bytes) -> np.ndarray:
        """Bytes -> uint8 CHW pixels; DecodeError for bytes that are not a usable image."""
        return decode_on_cpu(data, self.recipe, self.embedder.transform).pixels

    def encode(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 CHW pixels (from `pixels`) -> L2-normalised float32 [N, D]."""
        return self.embedder.embed_images(list(pixels)).vectors

    def embed(self, data: Sequence[bytes]) -> np.ndarray:
        """Image bytes -> L2-normalised float32 [N, D]."""
        return self.encode([self.pixels(d) for d in data])
