"""`clipbeam generate`'s output folder (clipbeam.layout) and its core transform RenderPrompts."""

from __future__ import annotations

import json
import shutil

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from vqganhelpers import save_tiny_vqgan

from clipbeam.cli import main
from clipbeam.corpus.render_plan import PromptRow, plan_renders
from clipbeam.layout import UnitLedger
from clipbeam.models.clip import ClipSpec
from clipbeam.models.vqgan_checkpoint import resolve_vqgan
from clipbeam.models.vqgan_clip import RenderSettings
from clipbeam.transforms.render import RenderConfig, RenderPrompts

TINY = ["--model", "clipbeam-tiny", "--pretrained", "none", "--cutn", "2", "--size", "16", "16", "--steps", "1"]


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory):
    return str(save_tiny_vqgan(tmp_path_factory.mktemp("vqgan")))


def generate(out, vqgan_file, *extra: str) -> int:
    return main(["generate", "--prompt", "a green tree", "--seeds", "0,1", "--vqgan", vqgan_file,
                 "--output", str(out), *TINY, *extra])


def test_render_prompts_transform(tmp_path, vqgan_file):
    """RenderPrompts alone: jobs in, one row per good job and a failure row per bad init image out."""
    (tmp_path / "broken.png").write_bytes(b"no image")
    rows = [PromptRow("a red cube"), PromptRow("a broken one", init_image=str(tmp_path / "broken.png"))]
    jobs = plan_renders(rows, [3], 1, (16, 16), 2, "fingerprint")
    config = RenderConfig(vqgan=resolve_vqgan(vqgan_file), clip=ClipSpec("clipbeam-tiny"),
                          settings=RenderSettings(cutn=2), image_prompts=(), output=str(tmp_path / "out"),
                          storage_options={}, animation="gif", metadata={"software": "test"},
                          ledger=UnitLedger(str(tmp_path / "out"), "renders"))
    with test_pipeline.TestPipeline() as pipeline:
        rendered, failed = pipeline | beam.Create(jobs) | RenderPrompts(config)
        assert_that(rendered | "RowIds" >> beam.Map(lambda r: (r["id"], r["path"], r["width"])),
                    equal_to([("00000-a-red-cube-s3", "images/00000-a-red-cube-s3.png", 16)]), label="rows")
        assert_that(failed | "FailureIds" >> beam.Map(lambda r: (r["id"], r["stage"])),
                    equal_to([("00001-a-broken-one-s3", "init_image")]), label="failures")
    assert Image.open(tmp_path / "out" / "images" / "00000-a-red-cube-s3.png").size == (16, 16)
    marker = json.loads((tmp_path / "out" / "renders" / "00000-a-red-cube-s3.json").read_text())
    assert marker["key"] == jobs[0].settings_hash and marker["files"] == ["images/00000-a-red-cube-s3.png"]


def test_overwrite_deletes_only_what_generate_wrote(tmp_path, vqgan_file):
    out = tmp_path / "out"
    assert generate(out, vqgan_file, "--save-every", "1") == 0
    mine = [out / "images" / "my-own.png", out / "frames" / "notes.txt", out / "notes.md"]
    for path in mine:
        path.write_bytes(b"the user's own file")
    assert generate(out, vqgan_file, "--overwrite") == 0
    assert all(path.read_bytes() == b"the user's own file" for path in mine)
    assert pq.read_table(out / "renders.parquet").num_rows == 2
    assert not (out / "frames" / "00000-a-green-tree-s0").exists()  # the frames of the first run went


def test_refuses_a_folder_that_holds_something_else(tmp_path, vqgan_file, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "an embeddings output"}')
    capsys.readouterr()
    assert generate(out, vqgan_file) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no clipbeam.generate output" in err[0], err
    assert (out / "manifest.json").read_text() == '{"kind": "an embeddings output"}'
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_an_output_that_cannot_be_written_exits_1_and_a_rerun_finishes(tmp_path, vqgan_file, capsys):
    out = tmp_path / "out"
    assert generate(out, vqgan_file, "--seeds", "0") == 0
    shutil.rmtree(out / "images")
    (out / "images").write_text("a file where the images folder should be")  # every image write fails
    capsys.readouterr()
    assert generate(out, vqgan_file) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    (out / "images").unlink()
    assert generate(out, vqgan_file) == 0
    assert "(0 resumed, 2 rendered now)" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["renders"] == 2


def test_query_images_decode_like_corpus_images(tmp_path, vqgan_file):
    """--init-image and --image-prompt go through models.images.load_image (EXIF orientation, alpha on white)."""
    from imagefactory import exif_rotated_jpeg, rgba_png

    (tmp_path / "rotated.jpg").write_bytes(exif_rotated_jpeg(1))
    (tmp_path / "alpha.png").write_bytes(rgba_png(2))
    out = tmp_path / "out"
    assert generate(out, vqgan_file, "--init-image", str(tmp_path / "rotated.jpg"),
                    "--image-prompt", f"{tmp_path / 'alpha.png'}:0.5") == 0
    assert pq.read_table(out / "renders.parquet").num_rows == 2


def test_more_prompts_and_seeds_resume_with_the_same_settings(tmp_path, vqgan_file, capsys):
    out = tmp_path / "out"
    assert generate(out, vqgan_file, "--seeds", "0") == 0
    first = (out / "images" / "00000-a-green-tree-s0.png").stat().st_mtime_ns
    capsys.readouterr()
    assert generate(out, vqgan_file, "--prompt", "a red house") == 0  # seeds 0,1 and a second prompt
    assert "(1 resumed, 3 rendered now)" in capsys.readouterr().err
    assert (out / "images" / "00000-a-green-tree-s0.png").stat().st_mtime_ns == first
    assert pq.read_table(out / "renders.parquet").column("id").to_pylist() == [
        "00000-a-green-tree-s0", "00000-a-green-tree-s1", "00001-a-red-house-s0", "00001-a-red-house-s1"]
