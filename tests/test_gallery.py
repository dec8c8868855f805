"""The gallery page opens in a real headless Chromium and every image loads."""

from __future__ import annotations

import os

import numpy as np
from browser import open_page
from PIL import Image

from clipbeam.gallery import Classification, Gallery, Hit, RenderPanel, SearchPanel, write_gallery


def _tile(color):
    return Image.new("RGB", (64, 64), color)


def test_gallery_page_loads_all_images_in_chromium(tmp_path):
    labels = ["red circle", "blue square", "green star"]
    gallery = Gallery(
        title="test gallery",
        notes=["made by a test"],
        searches=[SearchPanel("a red circle", [Hit(i + 1, 0.9 - i / 10, f"id{i}", "a red circle", _tile("red"))
                                               for i in range(5)], precision=1.0)],
        classification=Classification(labels, np.array([[3, 1, 0], [0, 4, 0], [0, 0, 4]]), 11 / 12, 12),
        renders=[RenderPanel("a blue circle", 0, _tile("blue"), 0.31)],
    )
    page, sheet = write_gallery(gallery, str(tmp_path / "gallery"))
    facts = open_page("file://" + page, str(tmp_path / "shot.png"))
    assert facts["title"] == "test gallery"
    assert facts["count"] == 5 + 1 + 1 and facts["broken"] == []
    shot = Image.open(tmp_path / "shot.png")
    assert shot.size[0] > 0 and len(set(shot.convert("L").getdata())) > 2  # something was drawn
    assert Image.open(sheet).size[0] > 300
    assert os.path.exists(tmp_path / "gallery" / "images" / "confusion.png")


def test_a_missing_image_is_reported_broken(tmp_path):
    gallery = Gallery(title="broken", searches=[SearchPanel("q", [Hit(1, 0.5, "x", None, _tile("red"))])])
    page, _ = write_gallery(gallery, str(tmp_path / "g"))
    os.remove(tmp_path / "g" / "images" / "search00-01.png")
    facts = open_page("file://" + page, str(tmp_path / "shot.png"))
    assert facts["broken"] == ["images/search00-01.png"]
