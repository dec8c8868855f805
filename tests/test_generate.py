"""VQGAN+CLIP: the loop's pieces, the loop, and `clipbeam generate` end to end (tiny models, CPU)."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from vqganhelpers import save_tiny_vqgan, tiny_config, tiny_vqgan

from clipbeam.cli import main
from clipbeam.corpus.render_plan import PromptRow, plan_renders, slugify
from clipbeam.models.clip import ClipSpec, load_clip
from clipbeam.models.embedder import QueryImages
from clipbeam.models.images import DEFAULT_MAX_PIXELS
from clipbeam.models.prompts import parse_prompts
from clipbeam.models.vqgan_clip import (
    ImagePrompt,
    Renderer,
    RenderSettings,
    clamp_keep_grad,
    make_cutouts,
    output_size,
    prompt_loss,
    quantize_straight_through,
    spherical_distance,
)

CLIP = ["--model", "clipbeam-tiny", "--pretrained", "none"]
FAST = ["--cutn", "4", "--size", "32", "32"]


@pytest.fixture(scope="module")
def renderer():
    return Renderer(tiny_vqgan(seed=1), load_clip(ClipSpec("clipbeam-tiny")))


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory):
    return str(save_tiny_vqgan(tmp_path_factory.mktemp("vqgan")))


def generate(*args: str) -> int:
    return main(["generate", *args, *CLIP])


def test_output_size_rounds_down_and_rejects_sub_token_sizes():
    assert output_size(256, 256, 16) == (256, 256)
    assert output_size(300, 207, 16) == (288, 192)
    with pytest.raises(ValueError, match="below one latent token"):
        output_size(15, 64, 16)


def test_clamp_keeps_gradients_that_lead_back_into_range():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    clamp_keep_grad(x, 0.0, 1.0).backward(torch.tensor([-1.0, -1.0, -1.0]))
    # Descent on -1 gradients raises x: allowed below the range and inside it, blocked above it.
    assert x.grad.tolist() == [-1.0, -1.0, 0.0]
    x.grad = None
    clamp_keep_grad(x, 0.0, 1.0).backward(torch.tensor([1.0, 1.0, 1.0]))
    assert x.grad.tolist() == [0.0, 1.0, 1.0]
    assert clamp_keep_grad(x, 0.0, 1.0).tolist() == [0.0, 0.5, 1.0]


def test_straight_through_quantization():
    codebook = torch.randn(10, 4)
    z = torch.randn(1, 4, 3, 5, requires_grad=True)
    q = quantize_straight_through(z, codebook)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = codebook[torch.cdist(flat, codebook).argmin(1)].view(1, 3, 5, 4).permute(0, 3, 1, 2)
    assert torch.equal(q, expected)
    (q * 2).sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 2.0))


def test_spherical_distance_and_stop_gate():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(spherical_distance(a, b), torch.tensor([[(math.pi / 2) ** 2 / 2, 0.0, math.pi ** 2 / 2]]))
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0]]), dim=-1).requires_grad_(True)
    d = spherical_distance(x, a).item()
    prompt_loss(x, a, 2.0, d + 0.1).backward()  # already closer than the stop: no pull
    assert torch.count_nonzero(x.grad) == 0
    x.grad = None
    loss = prompt_loss(x, a, 2.0, -math.inf)
    loss.backward()
    assert math.isclose(loss.item(), 2 * d, rel_tol=1e-6) and torch.count_nonzero(x.grad) > 0
    x.grad = None
    negative = prompt_loss(x, a, -1.0, -math.inf)
    negative.backward()
    assert math.isclose(negative.item(), -d, rel_tol=1e-6)
    assert x.grad[0, 0] > 0  # descent moves x away from a


def test_cutouts_are_seeded_differentiable_and_sized():
    image = torch.rand(1, 3, 40, 56, requires_grad=True)
    a = make_cutouts(image, 24, 6, 1.0, ("flip", "affine", "perspective", "jitter", "noise"), 0.1,
                     torch.Generator().manual_seed(3))
    b = make_cutouts(image, 24, 6, 1.0, ("flip", "affine", "perspective", "jitter", "noise"), 0.1,
                     torch.Generator().manual_seed(3))
    c = make_cutouts(image, 24, 6, 1.0, ("flip", "affine", "perspective", "jitter", "noise"), 0.1,
                     torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert image.grad.abs().sum() > 0
    # Without augmentations, a cutout of a constant image is that constant.
    flat = make_cutouts(torch.full((1, 3, 40, 56), 0.25), 24, 3, 1.0, (), 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(flat, torch.full_like(flat, 0.25), atol=1e-6)


def test_loss_falls_over_20_steps(renderer):
    result = renderer.render(parse_prompts("a red cube"), seed=0, steps=20, width=16, height=16,
                             settings=RenderSettings(cutn=4, lr=0.2))
    assert len(result.losses) == 20
    assert result.loss_final < result.loss_initial
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert result.image.shape == (16, 16, 3) and result.image.dtype == np.uint8


def test_renders_are_deterministic_per_seed(renderer):
    settings = RenderSettings(cutn=4, lr=0.3)
    run = lambda seed: renderer.render(parse_prompts("a red cube"), seed=seed, steps=3, width=16, height=16,
                                       settings=settings)
    first, again, other = run(5), run(5), run(6)
    assert np.array_equal(first.image, again.image) and first.losses == again.losses
    assert not np.array_equal(first.image, other.image)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_init_image_and_image_prompt(renderer):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))
    z = renderer.initial_z(16, 16, torch.Generator().manual_seed(0), picture)
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(picture.resize((16, 16), Image.Resampling.LANCZOS)) / 255.0)
        expected, _, _ = renderer.vqgan.encode(pixels.permute(2, 0, 1)[None].float() * 2 - 1)
    assert torch.allclose(z, expected, atol=1e-5)
    target = QueryImages(renderer.clip, DEFAULT_MAX_PIXELS, True).embed([_png(picture)])[0]
    result = renderer.render(parse_prompts("a cat"), seed=0, steps=2, width=16, height=16,
                             settings=RenderSettings(cutn=4, init_weight=1.0),
                             image_prompts=[ImagePrompt(target, 0.5)], init_image=picture)
    assert all(math.isfinite(v) for v in result.losses)


def test_plan_renders_names_and_seeds():
    rows = [PromptRow("A Red Cube!"), PromptRow("café: night | fog:-1", seed=7, steps=3, size=(40, 20))]
    jobs = plan_renders(rows, [0, 1], 10, (33, 32), 16, "fp")
    assert [j.row_id for j in jobs] == ["00000-a-red-cube-s0", "00000-a-red-cube-s1", "00001-cafe-night-fog-1-s7"]
    assert [(j.width, j.height, j.steps) for j in jobs] == [(32, 32, 10), (32, 32, 10), (32, 16, 3)]
    assert jobs[2].requested == (40, 20) and jobs[0].ordinal == 1 and jobs[0].total == 3
    assert len({j.settings_hash for j in jobs}) == 3
    assert plan_renders(rows, [0, 1], 10, (33, 32), 16, "other")[0].settings_hash != jobs[0].settings_hash
    assert slugify("∑∑∑") == "prompt" and len(slugify("word " * 40)) <= 48


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, vqgan_file):
    """One generate run: two prompt rows (one with its own seed and steps), --seeds 0,1, frames saved."""
    folder = tmp_path_factory.mktemp("gen")
    (folder / "prompts.csv").write_text('prompt,seed,steps\n"photo: a red cube | fog:-0.5",,\na blue ball,9,3\n')
    out = folder / "out"
    code = generate("--prompts", str(folder / "prompts.csv"), "--seeds", "0,1", "--vqgan", vqgan_file,
                    "--steps", "2", "--save-every", "1", "--output", str(out), *FAST)
    assert code == 0
    return out


def test_generate_output_layout_and_metadata(rendered, vqgan_file):
    names = sorted(os.listdir(rendered / "images"))
    assert names == ["00000-photo-a-red-cube-fog-0-5-s0.png", "00000-photo-a-red-cube-fog-0-5-s1.png",
                     "00001-a-blue-ball-s9.png"]
    image = Image.open(rendered / "images" / names[2])
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a blue ball" and image.text["seed"] == "9" and image.text["steps"] == "3"
    assert image.text["clip_model"] == "clipbeam-tiny"
    settings = json.loads(image.text["settings"])
    assert settings["cutn"] == 4 and settings["vqgan"] == vqgan_file
    table = pq.read_table(rendered / "renders.parquet")
    for column in ("prompt", "seed", "steps", "width", "height", "loss_initial", "loss_final", "clip_similarity",
                   "path"):
        assert column in table.column_names
    rows = table.to_pylist()
    assert [(r["seed"], r["steps"]) for r in rows] == [(0, 2), (1, 2), (9, 3)]
    assert all((rendered / r["path"]).exists() for r in rows)
    assert sorted(os.listdir(rendered / "frames" / "00001-a-blue-ball-s9")) == [
        "step-00000.png", "step-00001.png", "step-00002.png", "step-00003.png"]
    animation = Image.open(rendered / rows[2]["animation"])
    assert animation.format == "GIF"
    manifest = json.loads((rendered / "manifest.json").read_text())
    assert manifest["renders"] == 3 and manifest["failures"] == 0 and manifest["model"] == "clipbeam-tiny"
    assert manifest["vqgan"]["config"] == tiny_config().to_yaml_dict()
    assert not (rendered / "failures.parquet").exists()
    newest = max(p.stat().st_mtime_ns for p in rendered.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (rendered / "manifest.json").stat().st_mtime_ns >= newest


def test_same_inputs_give_the_same_png_bytes(rendered, vqgan_file, tmp_path):
    out = tmp_path / "again"
    assert generate("--prompts", str(rendered.parent / "prompts.csv"), "--seeds", "0,1", "--vqgan", vqgan_file,
                    "--steps", "2", "--output", str(out), *FAST) == 0
    for name in os.listdir(rendered / "images"):
        original = Image.open(rendered / "images" / name)
        again = Image.open(out / "images" / name)
        assert np.array_equal(np.asarray(original), np.asarray(again)), name
        assert json.loads(again.text["settings"])["save_every"] == 0
    # Same settings, same bytes (the save-every run above differs only in its settings chunk).
    out2 = tmp_path / "third"
    assert generate("--prompts", str(rendered.parent / "prompts.csv"), "--seeds", "0,1", "--vqgan", vqgan_file,
                    "--steps", "2", "--output", str(out2), *FAST) == 0
    for name in os.listdir(out / "images"):
        assert (out / "images" / name).read_bytes() == (out2 / "images" / name).read_bytes()


def test_resume_skips_finished_renders_and_overwrite_redoes_them(tmp_path, vqgan_file, capsys):
    out = tmp_path / "out"
    args = ["--prompt", "a green tree", "--seeds", "0,1", "--vqgan", vqgan_file, "--output", str(out),
            "--cutn", "2", "--size", "16", "16", "--steps", "1"]
    assert generate(*args) == 0
    keep, redo = out / "images" / "00000-a-green-tree-s0.png", out / "images" / "00000-a-green-tree-s1.png"
    kept_mtime, redo_bytes = keep.stat().st_mtime_ns, redo.read_bytes()
    redo.unlink()
    capsys.readouterr()
    assert generate(*args) == 0
    assert "(1 resumed, 1 rendered now)" in capsys.readouterr().err
    assert keep.stat().st_mtime_ns == kept_mtime and redo.read_bytes() == redo_bytes
    assert pq.read_table(out / "renders.parquet").num_rows == 2
    assert generate(*args) == 0
    assert "(2 resumed, 0 rendered now)" in capsys.readouterr().err
    assert generate(*args[:-1], "2") == 2  # other --steps: refused, one line, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (steps: 1 -> 2)" in err[0], err
    assert keep.stat().st_mtime_ns == kept_mtime and (out / "manifest.json").exists()
    assert generate(*args, "--overwrite") == 0
    assert "(0 resumed, 2 rendered now)" in capsys.readouterr().err
    assert keep.stat().st_mtime_ns != kept_mtime


def test_failing_render_is_a_failure_row_and_others_complete(tmp_path, vqgan_file):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "prompts.csv").write_text("prompt,init_image\na red square,good.png\na broken one,broken.png\n"
                                          "a plain one,\n")
    out = tmp_path / "out"
    assert generate("--prompts", str(tmp_path / "prompts.csv"), "--vqgan", vqgan_file, "--steps", "1",
                    "--output", str(out), "--cutn", "2", "--size", "16", "16") == 0
    rows = pq.read_table(out / "renders.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == ["a red square", "a plain one"]
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert len(failures) == 1
    assert failures[0]["id"] == "00001-a-broken-one-s0" and failures[0]["stage"] == "init_image"
    assert "UnidentifiedImageError" in failures[0]["error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["renders"] == 2 and manifest["failures"] == 1


@pytest.mark.parametrize("case, expected", [
    ("missing_checkpoint", "does not exist"),
    ("config_mismatch", "does not match checkpoint"),
    ("tiny_size", "below one latent token"),
    ("missing_prompts", "prompts file"),
    ("bad_seeds", "--seeds"),
    ("bad_augment", "unknown augmentation"),
    ("no_prompt_column", "no 'prompt' column"),
    ("unknown_flag", "unrecognized arguments"),
    ("missing_init_image", "init image"),
    ("empty_prompt_text", "has no text"),
    ("missing_contrast_file", "--contrast"),
    ("negative_contrast_weight", "--contrast-weight: must be 0 or more"),
])
def test_bad_arguments_exit_2_with_one_line(case, expected, tmp_path, vqgan_file, capsys):
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    (tmp_path / "table.csv").write_text("text\na red cube\n")
    other = tmp_path / "other.yaml"
    import yaml

    other.write_text(yaml.safe_dump(tiny_config(n_embed=32).to_yaml_dict()))
    args = {"--prompts": str(tmp_path / "prompts.txt"), "--vqgan": vqgan_file}
    extra: list[str] = []
    if case == "missing_checkpoint":
        args["--vqgan"] = str(tmp_path / "nope.ckpt")
    elif case == "config_mismatch":
        extra = ["--vqgan-config", str(other)]
    elif case == "tiny_size":
        extra = ["--size", "1", "16"]
    elif case == "missing_prompts":
        args["--prompts"] = str(tmp_path / "nope.txt")
    elif case == "bad_seeds":
        extra = ["--seeds", "1,x"]
    elif case == "bad_augment":
        extra = ["--augment", "flip,swirl"]
    elif case == "no_prompt_column":
        args["--prompts"] = str(tmp_path / "table.csv")
    elif case == "unknown_flag":
        extra = ["--stepz", "3"]
    elif case == "missing_init_image":
        extra = ["--init-image", str(tmp_path / "nope.png")]
    elif case == "empty_prompt_text":
        (tmp_path / "prompts.txt").write_text(":0.5\n")
    elif case == "missing_contrast_file":
        extra = ["--contrast", str(tmp_path / "nope.txt")]
    elif case == "negative_contrast_weight":
        extra = ["--contrast", str(tmp_path / "prompts.txt"), "--contrast-weight", "-1"]
    out = tmp_path / "out"
    flat = [item for pair in args.items() for item in pair]
    capsys.readouterr()
    assert generate(*flat, *extra, "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_generate_reads_and_writes_s3(tmp_path, s3_server, vqgan_file):
    import s3fs

    so = s3_server["storage_options"]
    bucket = s3_server["bucket"]
    fs = s3fs.S3FileSystem(**so)
    fs.put(vqgan_file, f"{bucket}/models/tiny.safetensors")
    fs.put(vqgan_file.replace(".safetensors", ".yaml"), f"{bucket}/models/tiny.yaml")
    fs.pipe(f"{bucket}/prompts.txt", b"a red cube\n")
    out = f"s3://{bucket}/renders"
    assert generate("--prompts", f"s3://{bucket}/prompts.txt", "--vqgan", f"s3://{bucket}/models/tiny.safetensors",
                    "--steps", "1", "--cutn", "2", "--size", "16", "16", "--output", out,
                    "--storage-options", json.dumps(so)) == 0
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/renders/images/00000-a-red-cube-s0.png")
    manifest = json.loads(fs.cat(f"{bucket}/renders/manifest.json"))
    assert manifest["renders"] == 1 and manifest["vqgan"]["config_origin"] == f"s3://{bucket}/models/tiny.yaml"
