"""Prompt syntax for VQGAN+CLIP: `text[:weight[:stop]]`, several joined by `|`.

Only *trailing* fields that look like decimal numbers are taken as weight and
stop, so parsing never fails: "photo: a cat" stays one text, a Windows path
"C:\\img.png:0.5" keeps its drive letter, and "a: nan" or "year: 1_000" stay
text because the number pattern is decimal only (no nan/inf, no underscores,
no surrounding spaces), unlike Python's float().
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class Prompt:
    """One prompt: what to match, how strongly (negative pushes away), and where to stop pulling."""

    text: str
    weight: float = 1.0
    stop: float = -math.inf


def is_decimal(field: str) -> bool:
    return DECIMAL.fullmatch(field) is not None


def split_trailing_numbers(spec: str) -> tuple[str, list[float]]:
    """Split up to two trailing `:number` fields off `spec`; returns (rest, numbers)."""
    parts = spec.split(":")
    numbers: list[str] = []
    while len(numbers) < 2 and len(parts) > 1 and is_decimal(parts[-1]):
        numbers.insert(0, parts.pop())
    return ":".join(parts), [float(n) for n in numbers]


def parse_prompt(spec: str) -> Prompt:
    """`text[:weight[:stop]]` -> Prompt. Raises ValueError for an empty text or a zero weight."""
    text, numbers = split_trailing_numbers(spec)
    text = text.strip()
    if not text:
        raise ValueError(f"prompt {spec!r} has no text")
    weight = numbers[0] if numbers else 1.0
    stop = numbers[1] if len(numbers) == 2 else -math.inf
    if weight == 0:
        raise ValueError(f"prompt {spec!r} has weight 0")
    return Prompt(text=text, weight=weight, stop=stop)


def parse_prompts(spec: str) -> list[Prompt]:
    """`a | b:-1 | c:2:0.5` -> three Prompts (empty pieces are skipped; at least one is required)."""
    prompts = [parse_prompt(piece.strip()) for piece in spec.split("|") if piece.strip()]
    if not prompts:
        raise ValueError(f"no prompt in {spec!r}")
    return prompts

