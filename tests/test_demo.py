"""The demo chain end to end (small), and its gallery in a real headless Chromium."""

from __future__ import annotations

from browser import open_page
from PIL import Image

from clipbeam.demo import QUERIES, RENDER_PROMPTS, run_demo


def test_demo_gallery_opens_with_every_image(tmp_path, capsys):
    page, sheet = run_demo(str(tmp_path / "demo"), n=240, steps=3)
    printed = capsys.readouterr().out
    assert "$ clipbeam embed" in printed and "zero-shot accuracy" in printed
    assert f"clipbeam serve --index {tmp_path / 'demo' / 'index'}" in printed
    facts = open_page("file://" + page, str(tmp_path / "gallery.png"))
    assert facts["broken"] == []
    assert facts["count"] == 10 * len(QUERIES) + 1 + 2 * len(RENDER_PROMPTS)  # renders and their search hits
    assert Image.open(tmp_path / "gallery.png").size[0] > 0
    assert Image.open(sheet).size[1] > 300
