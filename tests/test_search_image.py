"""`clipbeam search --image`: a query photo is decoded and preprocessed exactly as embed decodes the corpus."""

from __future__ import annotations

import argparse
import base64
import io
import json

import numpy as np
import pytest
from embedhelpers import embed, read_rows
from imagefactory import exif_rotated_jpeg, jpeg, rgba_png
from PIL import Image

from clipbeam.cli import main
from clipbeam.models.images import load_image


def _large_detailed_jpeg() -> bytes:
    """A 1600x1000 JPEG of fine detail, EXIF-rotated: embed decodes it at a reduced scale by default, which
    changes its vector (cosine about 0.9996 to the exact decode), so the query must be decoded the same way."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (250, 400, 3), dtype=np.uint8)).resize((1600, 1000), Image.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """A folder corpus (plain photos, an EXIF-rotated JPEG, a PNG with alpha), embedded and indexed."""
    root = tmp_path_factory.mktemp("search-image")
    photos = root / "photos"
    photos.mkdir()
    for seed in range(6):
        (photos / f"plain{seed}.jpg").write_bytes(jpeg(seed))
    (photos / "rotated.jpg").write_bytes(exif_rotated_jpeg(40))
    (photos / "large.jpg").write_bytes(_large_detailed_jpeg())
    (photos / "alpha.png").write_bytes(rgba_png(41))
    assert embed("--input", str(photos), "--output", str(root / "emb"), "--dtype", "float32") == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(root / "index")]) == 0
    return photos, root / "index"


@pytest.mark.parametrize("name", ["rotated.jpg", "large.jpg", "alpha.png"])
def test_query_image_finds_itself_in_the_corpus(photo_index, name, capsys):
    photos, index = photo_index
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--image", str(photos / name), "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["source"].endswith(name), hits
    assert hits[0]["score"] >= 0.9999, hits[0]
    assert hits[1]["score"] < hits[0]["score"]


@pytest.mark.parametrize("name", ["rotated.jpg", "large.jpg", "alpha.png"])
def test_an_upload_to_serve_finds_itself_as_search_does(photo_index, name):
    """serve decodes uploads as embed decoded the corpus too (reduced-scale JPEGs included)."""
    from starlette.testclient import TestClient

    from clipbeam.commands import serve
    from clipbeam.serve.app import create_app

    photos, index = photo_index
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    engine = serve.build_engine(parser.parse_args(["--index", str(index)]))
    upload = base64.b64encode((photos / name).read_bytes()).decode()
    with TestClient(create_app(engine)) as client:
        results = client.post("/search", json={"image": upload, "k": 3}).json()["results"]
    assert results[0]["source"].endswith(name), results
    assert results[0]["score"] >= 0.9999, results[0]


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


def _embeds_vector(photo_index, name: str) -> np.ndarray:
    photos, index = photo_index
    rows = [r for r in read_rows(str(index.parent / "emb")) if r["source"].endswith("/" + name)]
    assert len(rows) == 1
    return np.asarray(rows[0]["image_embedding"], dtype=np.float32)


@pytest.mark.parametrize("name", ["plain0.jpg", "rotated.jpg", "large.jpg", "alpha.png"])
def test_search_serve_and_generate_get_embeds_own_vector(photo_index, name, tmp_path):
    """One pixel path: identical bytes give embed's vector, to 1e-6, in search --image, serve and
    generate --image-prompt (the large JPEG is decoded at a reduced scale by all four)."""
    from vqganhelpers import save_tiny_vqgan

    from clipbeam.commands import search, serve
    from clipbeam.index import ShardedIndex
    from clipbeam.models.clip import ClipSpec
    from clipbeam.models.vqgan_checkpoint import resolve_vqgan
    from clipbeam.models.vqgan_clip import RenderSettings
    from clipbeam.serve.queries import Query
    from clipbeam.transforms.render import ImagePromptSpec, RenderConfig, RenderDoFn

    photos, index = photo_index
    expected = _embeds_vector(photo_index, name)
    parser = argparse.ArgumentParser()
    search.add_arguments(parser)
    args = parser.parse_args(["--index", str(index), "--image", str(photos / name)])
    _, by_search = search.queries_from_args(args, ShardedIndex.open(str(index)), {})

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    engine = serve.build_engine(parser.parse_args(["--index", str(index)]))
    by_serve = engine._vectors([Query(1, image=(photos / name).read_bytes())])[0]

    config = RenderConfig(vqgan=resolve_vqgan(str(save_tiny_vqgan(tmp_path))), clip=ClipSpec("clipbeam-tiny"),
                          settings=RenderSettings(cutn=2), image_prompts=(ImagePromptSpec(str(photos / name)),),
                          output=str(tmp_path / "out"), storage_options={}, animation="gif", metadata={})
    render = RenderDoFn(config)
    render.setup()
    by_generate = render.image_prompts[0].vector

    for got in (by_search[0], by_serve[0], by_generate):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_search_and_serve_share_one_pixel_cap_rule():
    from clipbeam.index.manifest import query_decoding

    manifest = {"embeddings": [{"manifest": {"model": "m", "max_pixels": 1000, "fast_decode": True}}]}
    assert query_decoding(manifest, 5000) == (1000, True)  # never more pixels than embed allowed the corpus
    assert query_decoding(manifest, 500) == (500, True)  # nor more than the server allows an upload
    assert query_decoding({"embeddings": [{"manifest": {"model": "m"}}]}, 700) == (700, False)
