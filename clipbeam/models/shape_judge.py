"""A model-free judge of "a {color} {shape}" images: which color, and which shape the colored region has.

The judge of the renders must not share the loop's blind spots, so this one
has no weights at all: it takes the largest connected region of pixels whose
hue is nearest to the prompt's color, and measures its convex hull's
circularity (4 pi area / perimeter^2: 1 for a disk, 0.785 for a square, 0.605
for a triangle), its solidity (region area / hull area: about 0.56 for the
corpus's stars, near 1 for the others) and its corner count (vertices of the
hull after Douglas-Peucker simplification). Pure numpy, so it runs wherever
clipbeam runs.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from clipbeam.models.shapes import COLORS

MIN_SATURATION = 0.25
MIN_VALUE = 0.2
MIN_REGION_PIXELS = 12
STAR_MAX_SOLIDITY = 0.78
CIRCLE_MIN_CIRCULARITY = 0.89
SQUARE_MIN_CIRCULARITY = 0.76
CORNER_TOLERANCE = 0.09  # Douglas-Peucker tolerance, as a fraction of sqrt(hull area)


@dataclass(frozen=True)
class ShapeMeasures:
    pixels: int  # area of the region
    circularity: float  # of the convex hull
    solidity: float  # region area / hull area
    corners: int  # hull vertices after simplification


@dataclass(frozen=True)
class Verdict:
    color: str | None  # nearest corpus color of the image's saturated pixels
    shape: str | None  # None when no region of the asked color is large enough
    measures: ShapeMeasures | None


def hue(rgb) -> float:
    """Hue in [0, 1) of an RGB triple in 0..255."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0]


def hue_distance(a, b):
    d = np.abs(np.asarray(a) - b) % 1.0
    return np.minimum(d, 1.0 - d)


def nearest_color(h: float) -> str:
    """The corpus color whose hue is nearest to h."""
    return min(COLORS, key=lambda name: hue_distance(h, hue(COLORS[name])))


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation and value arrays [H, W] of uint8 RGB [H, W, 3] (vectorised colorsys)."""
    rgb = pixels.astype(np.float64) / 255.0
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    spread = np.maximum(high - low, 1e-9)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(high == r, (g - b) / spread, np.where(high == g, 2.0 + (b - r) / spread, 4.0 + (r - g) / spread))
    h = (h / 6.0) % 1.0
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0)
    return h, saturation, high


def saturated_mean_hue(pixels: np.ndarray, min_saturation: float = MIN_SATURATION) -> float | None:
    """The circular mean hue of an image's saturated pixels (gray background left out); None if none are."""
    h, s, v = _hsv(pixels)
    chosen = (s >= min_saturation) & (v >= MIN_VALUE)
    if not chosen.any():
        return None
    angle, weights = h[chosen] * 2 * np.pi, s[chosen]
    mean = np.arctan2((np.sin(angle) * weights).sum(), (np.cos(angle) * weights).sum())
    return float((mean / (2 * np.pi)) % 1.0)


def image_color(pixels: np.ndarray) -> str | None:
    h = saturated_mean_hue(pixels)
    return None if h is None else nearest_color(h)


def color_mask(pixels: np.ndarray, color: str) -> np.ndarray:
    """Saturated pixels whose hue is nearer to `color` than to any other corpus color."""
    h, s, v = _hsv(pixels)
    names = list(COLORS)
    distances = np.stack([hue_distance(h, hue(COLORS[name])) for name in names])
    return (s >= MIN_SATURATION) & (v >= MIN_VALUE) & (distances.argmin(axis=0) == names.index(color))


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (an empty mask stays empty)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices [K, 2] of the convex hull of points [N, 2], counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    upper: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _perimeter(polygon: np.ndarray) -> float:
    return float(np.linalg.norm(polygon - np.roll(polygon, -1, axis=0), axis=1).sum())


def _simplify(chain: np.ndarray, tolerance: float) -> list[int]:
    """Douglas-Peucker on an open chain: indices of the kept points (both ends always kept)."""
    start, end = chain[0], chain[-1]
    direction = end - start
    length = float(np.hypot(*direction))
    offsets = chain - start
    if length == 0:
        distances = np.hypot(offsets[:, 0], offsets[:, 1])
    else:
        distances = np.abs(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0]) / length
    worst = int(distances.argmax())
    if distances[worst] <= tolerance or len(chain) < 3:
        return [0, len(chain) - 1]
    left = _simplify(chain[:worst + 1], tolerance)
    right = _simplify(chain[worst:], tolerance)
    return left[:-1] + [worst + i for i in right]


def corner_count(hull: np.ndarray, tolerance: float) -> int:
    """Vertices of a closed convex polygon that survive simplification, starting from its farthest pair."""
    if len(hull) < 4:
        return len(hull)
    centre = hull.mean(axis=0)
    first = int(np.hypot(*(hull - centre).T).argmax())
    ring = np.roll(hull, -first, axis=0)
    second = int(np.hypot(*(ring - ring[0]).T).argmax())
    a = _simplify(ring[:second + 1], tolerance)
    b = _simplify(np.vstack([ring[second:], ring[:1]]), tolerance)
    return len(a) - 1 + len(b) - 1


def measure(region: np.ndarray) -> ShapeMeasures | None:
    """Shape measures of a boolean region [H, W]; None when it is too small to tell."""
    ys, xs = np.nonzero(region)
    if len(ys) < MIN_REGION_PIXELS:
        return None
    hull = convex_hull(np.stack([xs, ys], 1) + 0.5)
    hull_area, perimeter = _area(hull), _perimeter(hull)
    circularity = 4 * math.pi * hull_area / perimeter ** 2
    covered = hull_area + perimeter / 2 + math.pi / 4  # the hull of the pixel centres grown by half a pixel
    return ShapeMeasures(pixels=len(ys), circularity=round(circularity, 4),
                         solidity=round(len(ys) / covered, 4),
                         corners=corner_count(hull, CORNER_TOLERANCE * math.sqrt(hull_area)))


def classify(measures: ShapeMeasures) -> str:
    """Star if the region fills little of its hull; otherwise by the hull's circularity."""
    if measures.solidity < STAR_MAX_SOLIDITY:
        return "star"
    if measures.circularity >= CIRCLE_MIN_CIRCULARITY:
        return "circle"
    return "square" if measures.circularity >= SQUARE_MIN_CIRCULARITY else "triangle"


def judge(pixels: np.ndarray, color: str) -> Verdict:
    """The color of an image (uint8 [H, W, 3]) and the shape of its largest region of `color`."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r} (choose from {', '.join(COLORS)})")
    measures = measure(largest_region(color_mask(pixels, color)))
    return Verdict(image_color(pixels), None if measures is None else classify(measures), measures)
