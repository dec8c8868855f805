"""A gallery of a run: an HTML page and a PNG contact sheet.

Shows search hits (query, rank, score, caption, thumbnail), zero-shot
classification accuracy with its confusion matrix, renders, and duplicate
groups (the kept image first, the similarity to it under each) with a
histogram of nearest-neighbour similarities. Images are
written beside the page and referenced by relative paths, so the folder can be
copied or served as it is.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

THUMB = 96


@dataclass
class Hit:
    rank: int
    score: float
    id: str
    caption: str | None
    image: Image.Image


@dataclass
class SearchPanel:
    query: str
    hits: list[Hit]
    precision: float | None = None  # share of hits whose caption equals the query


@dataclass
class RenderPanel:
    prompt: str
    seed: int
    image: Image.Image
    clip_similarity: float | None = None
    verdicts: list[str] = field(default_factory=list)  # judges' lines shown under the render
    hit: Hit | None = None  # the top search hit for the same prompt, shown beside the render


@dataclass
class Classification:
    labels: list[str]
    confusion: np.ndarray  # [true, predicted] counts
    accuracy: float
    samples: int


@dataclass
class DuplicateSection:
    """Duplicate groups under one heading: each panel's hits are the kept image, then its duplicates."""

    title: str
    note: str
    panels: list[SearchPanel]


@dataclass
class Histogram:
    counts: list[int]
    low: float
    high: float
    xlabel: str
    marks: list[float] = field(default_factory=list)  # vertical lines, e.g. the thresholds


@dataclass
class Gallery:
    title: str
    notes: list[str] = field(default_factory=list)
    searches: list[SearchPanel] = field(default_factory=list)
    classification: Classification | None = None
    renders: list[RenderPanel] = field(default_factory=list)
    duplicates: list[DuplicateSection] = field(default_factory=list)
    histogram: Histogram | None = None


def _save(image: Image.Image, folder: str, name: str, size: int = THUMB) -> str:
    """Save an upscaled (nearest) thumbnail; returns its path relative to the page."""
    image = image.convert("RGB")
    scale = max(1, size // max(image.size))
    if scale > 1:
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    image.save(os.path.join(folder, name))
    return f"images/{name}"


def confusion_plot(classification: Classification, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classification.labels)
    fig, ax = plt.subplots(figsize=(0.32 * n + 2.5, 0.32 * n + 2))
    ax.imshow(classification.confusion, cmap="Blues")
    # Labels are user text: plain text, never mathtext (`$\frac{$` would raise while drawing).
    ax.set_xticks(range(n), classification.labels, rotation=90, fontsize=7, parse_math=False)
    ax.set_yticks(range(n), classification.labels, fontsize=7, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot top-1 accuracy {classification.accuracy:.3f} ({classification.samples} images)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram_plot(histogram: Histogram, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(histogram.low, histogram.high, len(histogram.counts) + 1)
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.bar(edges[:-1], histogram.counts, width=np.diff(edges), align="edge", color="#4878a8")
    for mark in histogram.marks:
        ax.axvline(mark, color="#c03030", linewidth=1)
    ax.set_yscale("symlog")
    ax.set_xlabel(histogram.xlabel, parse_math=False)
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hits_html(hits: list[Hit], images_dir: str, prefix: str) -> list[str]:
    parts = []
    for hit in hits:
        src = _save(hit.image, images_dir, f"{prefix}-{hit.rank:02d}.png")
        parts.append(f"<figure><img src='{src}' width='{THUMB}' height='{THUMB}' alt='{html.escape(hit.id)}'>"
                     f"<figcaption>#{hit.rank} {hit.score:.3f}<br>{html.escape(hit.caption or '')}"
                     f"</figcaption></figure>")
    return parts


def _duplicates_html(gallery: Gallery, images_dir: str) -> list[str]:
    parts = []
    if gallery.histogram is not None:
        histogram_plot(gallery.histogram, os.path.join(images_dir, "histogram.png"))
        parts.append("<h2>Nearest-neighbour similarity</h2>"
                     "<img src='images/histogram.png' alt='nearest-neighbour similarity histogram'>")
    for s, section in enumerate(gallery.duplicates):
        parts.append(f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.note)}</p>")
        for p, panel in enumerate(section.panels):
            parts.append(f"<h3>{html.escape(panel.query)}</h3><div class='hits'>")
            parts += _hits_html(panel.hits, images_dir, f"dup{s}-{p:02d}")
            parts.append("</div>")
    return parts


def write_gallery(gallery: Gallery, out_dir: str) -> tuple[str, str]:
    """Write OUT/index.html, OUT/contact_sheet.png and OUT/images/*; returns both paths."""
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(gallery.title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:4px;"
             "text-align:center;font-size:11px;width:110px}img{image-rendering:pixelated}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style>",
             f"</head><body><h1>{html.escape(gallery.title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in gallery.notes]
    if gallery.searches:
        parts.append("<h2>Search</h2>")
    for q, panel in enumerate(gallery.searches):
        extra = f" — precision@{len(panel.hits)} {panel.precision:.2f}" if panel.precision is not None else ""
        parts.append(f"<h3>“{html.escape(panel.query)}”{extra}</h3><div class='hits'>")
        parts += _hits_html(panel.hits, images_dir, f"search{q:02d}")
        parts.append("</div>")
    if gallery.classification is not None:
        cls = gallery.classification
        confusion_plot(cls, os.path.join(images_dir, "confusion.png"))
        parts.append(f"<h2>Zero-shot classification</h2><p>top-1 accuracy <b>{cls.accuracy:.3f}</b> over "
                     f"{cls.samples} images and {len(cls.labels)} labels.</p>"
                     "<img src='images/confusion.png' alt='confusion matrix'>")
    if gallery.renders:
        parts.append("<h2>Renders</h2><div>")
        for r, render in enumerate(gallery.renders):
            parts.append(_render_figure(render, r, images_dir))
        parts.append("</div>")
    parts += _duplicates_html(gallery, images_dir)
    parts.append("</body></html>")
    page = os.path.join(out_dir, "index.html")
    with open(page, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    sheet = os.path.join(out_dir, "contact_sheet.png")
    contact_sheet(gallery, out_dir).save(sheet)
    return page, sheet


def _render_figure(render: RenderPanel, r: int, images_dir: str) -> str:
    """A render with its prompt, similarity and judges' verdicts, and the search hit for its prompt beside it."""
    src = _save(render.image, images_dir, f"render{r:02d}.png", size=128)
    sim = f"<br>CLIP {render.clip_similarity:.3f}" if render.clip_similarity is not None else ""
    lines = "".join(f"<br>{html.escape(line)}" for line in render.verdicts)
    hit = ""
    if render.hit is not None:
        hit_src = _save(render.hit.image, images_dir, f"render{r:02d}-hit.png", size=128)
        caption = html.escape(render.hit.caption or "")
        hit = (f"<img src='{hit_src}' width='64' height='64' alt='search hit {html.escape(render.hit.id)}' "
               f"title='search hit: {caption}'>")
        lines += f"<br>search hit: {caption}"
    return (f"<figure style='width:{210 if hit else 140}px'><img src='{src}' width='128' height='128' "
            f"alt='{html.escape(render.prompt)}'>{hit}<figcaption>{html.escape(render.prompt)} "
            f"(seed {render.seed}){sim}{lines}</figcaption></figure>")


def contact_sheet(gallery: Gallery, out_dir: str) -> Image.Image:
    """One PNG: a row per search query, a row of renders, then the confusion matrix."""
    rows: list[tuple[str, list[Image.Image]]] = []
    for panel in gallery.searches:
        rows.append((panel.query, [h.image for h in panel.hits]))
    per_row = 4  # renders per row, each followed by its search hit when there is one
    for start in range(0, len(gallery.renders), per_row):
        chunk = gallery.renders[start:start + per_row]
        label = "renders" if any(r.hit is None for r in chunk) else "render | search hit"
        rows.append((label, [image for r in chunk for image in [r.image] + ([r.hit.image] if r.hit else [])]))
    for section in gallery.duplicates:
        rows += [(panel.query, [h.image for h in panel.hits]) for panel in section.panels]
    label_w, cell, pad = 150, 72, 4
    columns = max((len(images) for _, images in rows), default=1)
    width = label_w + columns * (cell + pad) + pad
    confusion = None
    confusion_path = os.path.join(out_dir, "images", "confusion.png")
    if gallery.classification is not None and os.path.exists(confusion_path):
        confusion = Image.open(confusion_path).convert("RGB")
        width = max(width, confusion.size[0] + 2 * pad)
    height = pad + len(rows) * (cell + pad) + (confusion.size[1] + pad if confusion else 0)
    sheet = Image.new("RGB", (width, max(height, cell)), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for label, images in rows:
        draw.text((pad, y + cell // 2 - 6), label[:24], fill="black")
        for i, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + i * (cell + pad), y))
        y += cell + pad
    if confusion is not None:
        sheet.paste(confusion, (pad, y))
    return sheet
