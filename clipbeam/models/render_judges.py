"""Two judges of renders of "a {color} {shape}", neither of them the CLIP that drew the render.

- the model-free judge (clipbeam.models.shape_judge): the shape of the largest
  region of the prompt's color, and the color of the saturated pixels;
- the judge CLIP (`shapes-judge-clip` / `shapes`, shipped in clipbeam/assets):
  a second shapes CLIP of another architecture and seed, trained by `clipbeam
  train clip`; its zero-shot answer over the 24 class prompts.

A render means its prompt when both judges name the prompt's shape and the
color is the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clipbeam.models.shape_judge import judge
from clipbeam.models.shapes import COLORS, SHAPES, class_names, class_prompts

JUDGE_CLIP = ("shapes-judge-clip", "shapes")


@dataclass(frozen=True)
class Judgement:
    prompt: str
    color: str  # asked for
    shape: str
    measured_color: str | None  # model-free
    measured_shape: str | None  # model-free
    clip_shape: str  # the judge CLIP's zero-shot class, shape part
    clip_color: str

    @property
    def shape_right(self) -> bool:
        return self.measured_shape == self.shape and self.clip_shape == self.shape

    @property
    def color_right(self) -> bool:
        return self.measured_color == self.color


def parse_class_prompt(prompt: str) -> tuple[str, str]:
    """("red", "circle") from "a red circle"; ValueError for anything outside the shapes world."""
    words = prompt.strip().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
        raise ValueError(f"not a shapes-world prompt 'a {{color}} {{shape}}': {prompt!r}")
    return words[1], words[2]


def load_judge_clip(pretrained: str = JUDGE_CLIP[1]):
    from clipbeam.models.clip import ClipSpec, load_clip

    return load_clip(ClipSpec(JUDGE_CLIP[0], pretrained, device="cpu", precision="fp32"))


def clip_classes(clip, images: Sequence[np.ndarray]) -> list[tuple[str, str]]:
    """The zero-shot (color, shape) class of each uint8 image by a loaded CLIP, over the 24 class prompts."""
    import torch
    from PIL import Image

    from clipbeam.models.clip import encode_images, encode_texts

    pixels = torch.stack([clip.preprocess(Image.fromarray(image)) for image in images])
    scores = encode_images(clip, pixels) @ encode_texts(clip, class_prompts()).T
    names = class_names()
    return [names[int(i)] for i in scores.argmax(axis=1)]


def judge_renders(prompts: Sequence[str], images: Sequence[np.ndarray], clip) -> list[Judgement]:
    """Both judges' verdicts on each (prompt, uint8 image) pair; `clip` is the judge CLIP."""
    classes = clip_classes(clip, images) if images else []
    out = []
    for prompt, image, (clip_color, clip_shape) in zip(prompts, images, classes, strict=True):
        color, shape = parse_class_prompt(prompt)
        verdict = judge(image, color)
        out.append(Judgement(prompt, color, shape, verdict.color, verdict.shape, clip_shape, clip_color))
    return out
