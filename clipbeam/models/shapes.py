"""Drawing the synthetic shapes corpus: one colored shape on a gray background, captioned "a {color} {shape}".

Model weights cannot be downloaded where clipbeam is developed and tested, so
the project trains its own tiny CLIP and VQGAN on images it can make. 24
classes (6 colors x 4 shapes) are few enough for a model trained in minutes on
a CPU to tell apart, and the labels are known exactly, so zero-shot accuracy,
search precision and render hue can be measured instead of eyeballed.

Every sample is a pure function of one integer seed: the corpus seed and the
sample's index give the sample seed, and the sample seed gives the class (for
corpus samples), geometry, background and noise. The same seed always gives
the same pixels, whatever the sharding or the order of drawing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
IMAGE_SIZE = 64
# The shape's circumscribed diameter, as a fraction of the image side.
MIN_SIZE, MAX_SIZE = 0.25, 0.75
LIGHT_GRAYS = (170, 225)
DARK_GRAYS = (30, 85)
NOISE_SIGMA = 5.0
COLOR_JITTER = 12  # per channel, so that a color is a small region, not one RGB triple
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges without a dependency


@dataclass(frozen=True)
class ShapeSample:
    """Everything that decides one image's pixels; `seed` alone reproduces a corpus sample."""

    seed: int
    color: str
    shape: str
    size: float  # circumscribed diameter / image side
    rotation: float  # degrees
    cx: float  # centre, as fractions of the image side
    cy: float
    background: int  # gray level 0..255
    rgb: tuple[int, int, int]  # the drawn color (the class color with jitter)

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape)

    @property
    def label(self) -> int:
        return label_index(self.color, self.shape)

    def metadata(self) -> dict:
        """The sample's JSON sidecar in the corpus."""
        meta = asdict(self)
        meta["rgb"] = list(self.rgb)
        return meta


def caption_for(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def class_names() -> list[tuple[str, str]]:
    """The 24 (color, shape) classes in a fixed order: colors outer, shapes inner."""
    return [(color, shape) for color in COLORS for shape in SHAPES]


def class_prompts() -> list[str]:
    """The zero-shot prompt of every class, in `class_names()` order."""
    return [caption_for(color, shape) for color, shape in class_names()]


def label_index(color: str, shape: str) -> int:
    return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def sample_seed(corpus_seed: int, index: int) -> int:
    """The seed of sample `index` of the corpus made with `corpus_seed` (independent streams per sample)."""
    return int(np.random.SeedSequence([int(corpus_seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def draw_params(seed: int, color: str | None = None, shape: str | None = None) -> ShapeSample:
    """The sample for a seed; the class is drawn from the seed too unless given."""
    if color is not None and color not in COLORS:
        raise ValueError(f"unknown color {color!r} (choose from {', '.join(COLORS)})")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    rng = np.random.default_rng([int(seed), 0])
    drawn_color = list(COLORS)[int(rng.integers(len(COLORS)))]
    drawn_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = color or drawn_color
    shape = shape or drawn_shape
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    rotation = float(rng.uniform(0.0, 360.0))
    half = size / 2
    cx = float(rng.uniform(half, 1.0 - half))
    cy = float(rng.uniform(half, 1.0 - half))
    low, high = LIGHT_GRAYS if rng.random() < 0.5 else DARK_GRAYS
    background = int(rng.integers(low, high + 1))
    base = np.array(COLORS[color])
    rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return ShapeSample(int(seed), color, shape, size, rotation, cx, cy, background,
                       (int(rgb[0]), int(rgb[1]), int(rgb[2])))


def corpus_sample(corpus_seed: int, index: int) -> ShapeSample:
    return draw_params(sample_seed(corpus_seed, index))


def outline(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape inscribed in the circle (cx, cy, radius)."""
    if shape == "square":
        angles, radii = [45, 135, 225, 315], [radius] * 4
    elif shape == "triangle":
        angles, radii = [-90, 30, 150], [radius] * 3
    elif shape == "star":
        angles = [-90 + 36 * i for i in range(10)]
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
    else:
        raise ValueError(f"no polygon for {shape!r}")
    points = []
    for angle, r in zip(angles, radii, strict=True):
        theta = math.radians(angle + rotation)
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def render(sample: ShapeSample, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The RGB image of a sample: anti-aliased shape over a gray background, mild Gaussian noise."""
    big = image_size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, radius = sample.cx * big, sample.cy * big, sample.size * big / 2
    if sample.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(outline(sample.shape, cx, cy, radius, sample.rotation), fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)[..., None]
    alpha /= 255.0
    pixels = (1.0 - alpha) * float(sample.background) + alpha * np.array(sample.rgb, dtype=np.float32)
    noise = np.random.default_rng([sample.seed, 1]).normal(0.0, NOISE_SIGMA, size=pixels.shape)
    pixels = np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def heldout_set(per_class: int, seed: int) -> list[tuple[Image.Image, ShapeSample]]:
    """A balanced in-memory set (`per_class` images of each of the 24 classes) for evaluation.

    Sample seeds come from a stream tagged apart from corpus seeds, so a
    held-out set never repeats a training image made with the same seed.
    """
    out = []
    for label, (color, shape) in enumerate(class_names()):
        for k in range(per_class):
            seed_k = int(np.random.SeedSequence([int(seed), 0x4E1D, label, k]).generate_state(1, dtype=np.uint32)[0])
            params = draw_params(seed_k, color, shape)
            out.append((render(params), params))
    return out
