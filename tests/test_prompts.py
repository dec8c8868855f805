"""Prompt syntax: trailing numbers only, decimal pattern, `|` separated."""

from __future__ import annotations

import math

import pytest

from clipbeam.models.prompts import Prompt, parse_prompt, parse_prompts, split_trailing_numbers

INF = math.inf


@pytest.mark.parametrize("spec, expected", [
    ("a red cube", Prompt("a red cube", 1.0, -INF)),
    ("a red cube:2", Prompt("a red cube", 2.0, -INF)),
    ("a red cube:0.5:-0.2", Prompt("a red cube", 0.5, -0.2)),
    ("photo:-1:-0.9", Prompt("photo", -1.0, -0.9)),
    ("photo: a cat", Prompt("photo: a cat", 1.0, -INF)),
    ("time: 12:30", Prompt("time: 12", 30.0, -INF)),
    ("ratio 16:9:1", Prompt("ratio 16", 9.0, 1.0)),
    ("a:b:c:2:3", Prompt("a:b:c", 2.0, 3.0)),
    ("a:1:2:3", Prompt("a:1", 2.0, 3.0)),
    ("C:\\images\\cat.png:0.5", Prompt("C:\\images\\cat.png", 0.5, -INF)),
    ("1984", Prompt("1984", 1.0, -INF)),
    ("a cat:.5", Prompt("a cat", 0.5, -INF)),
    ("a cat:1e-1", Prompt("a cat", 0.1, -INF)),
    ("a cat:+3.", Prompt("a cat", 3.0, -INF)),
    ("  spaced out  :2", Prompt("spaced out", 2.0, -INF)),
])
def test_parse_prompt(spec, expected):
    assert parse_prompt(spec) == expected


@pytest.mark.parametrize("field", ["nan", "inf", "-inf", "1_0", " 2", "2 ", "0x10", "1/2", "", "e5", "."])
def test_only_decimals_are_numbers(field):
    text, numbers = split_trailing_numbers(f"a:{field}")
    assert numbers == [] and text == f"a:{field}"


def test_several_prompts():
    assert parse_prompts("a forest | fog:-0.5 |  | a lake:2:0.1") == [
        Prompt("a forest"), Prompt("fog", -0.5), Prompt("a lake", 2.0, 0.1)]


@pytest.mark.parametrize("spec", [":2", "  :1:2", "|", "", "a cat:0"])
def test_bad_prompts_raise(spec):
    with pytest.raises(ValueError):
        parse_prompts(spec)
