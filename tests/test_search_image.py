"""`clipbeam search --image`: a query photo is decoded and preprocessed exactly as embed decodes the corpus."""

from __future__ import annotations

import json

import pytest
from embedhelpers import embed
from imagefactory import exif_rotated_jpeg, jpeg, rgba_png

from clipbeam.cli import main
from clipbeam.models.images import load_image


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """A folder corpus (plain photos, an EXIF-rotated JPEG, a PNG with alpha), embedded and indexed."""
    root = tmp_path_factory.mktemp("search-image")
    photos = root / "photos"
    photos.mkdir()
    for seed in range(6):
        (photos / f"plain{seed}.jpg").write_bytes(jpeg(seed))
    (photos / "rotated.jpg").write_bytes(exif_rotated_jpeg(40))
    (photos / "alpha.png").write_bytes(rgba_png(41))
    assert embed("--input", str(photos), "--output", str(root / "emb"), "--dtype", "float32") == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(root / "index")]) == 0
    return photos, root / "index"


@pytest.mark.parametrize("name", ["rotated.jpg", "alpha.png"])
def test_query_image_finds_itself_in_the_corpus(photo_index, name, capsys):
    photos, index = photo_index
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--image", str(photos / name), "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["source"].endswith(name), hits
    assert hits[0]["score"] >= 0.9999, hits[0]
    assert hits[1]["score"] < hits[0]["score"]


def test_load_image_decodes_like_the_corpus(tmp_path):
    (tmp_path / "r.jpg").write_bytes(exif_rotated_jpeg(1))
    (tmp_path / "a.png").write_bytes(rgba_png(2))
    assert load_image(str(tmp_path / "r.jpg")).size == (30, 60)  # EXIF orientation 6 applied
    alpha = load_image(str(tmp_path / "a.png"))
    assert alpha.mode == "RGB" and alpha.getpixel((alpha.width - 1, 0)) == (255, 255, 255)  # alpha on white


def test_unreadable_query_image_is_one_line_exit_2(photo_index, tmp_path, capsys):
    _, index = photo_index
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--image", str(tmp_path / "junk.jpg")]) == 2
    assert main(["search", "--index", str(index), "--image", str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a readable image" in err[0] and "does not exist" in err[1]
