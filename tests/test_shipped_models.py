"""The shipped shapes models mean something: checked on freshly drawn images, never seen in training.

Thresholds: zero-shot top-1 >= 0.9 over the 24 prompts and text->image
precision@10 >= 0.8 (issue 5); VQGAN reconstruction within a margin of the
error measured in clipbeam/assets/MODELS.md; renders of "a {color} circle"
nearest in mean hue to their own color for most colors.
"""

from __future__ import annotations

import pytest
from shapes_eval import evaluate_clip

from clipbeam.models.clip import ASSETS_DIR, SHIPPED_CHECKPOINTS, ClipSpec, load_clip
from clipbeam.models.shape_judge import nearest_color, saturated_mean_hue
from clipbeam.models.shapes import COLORS, heldout_set

# Measured with benchmarks/shipped_models_quality.py (see clipbeam/assets/MODELS.md); the test allows 25% more.
DOCUMENTED_VQGAN_MSE = 0.00124  # heldout_set(4, seed=20240); 0.00117 in the benchmark (240 images, seed 1234)
HELD_OUT_SEED = 20240


@pytest.fixture(scope="module")
def clip():
    return load_clip(ClipSpec("shapes-clip", "shapes", device="cpu"))


@pytest.fixture(scope="module")
def vqgan():
    from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan

    return load_vqgan(resolve_vqgan("shapes"))


def test_shipped_files_are_registered_and_small():
    from clipbeam.models.vqgan_checkpoint import SHIPPED_VQGANS, config_path_for

    clip_files = [ASSETS_DIR / name for name in SHIPPED_CHECKPOINTS.values()]
    vqgan_file = ASSETS_DIR / SHIPPED_VQGANS["shapes"]
    vqgan_yaml = config_path_for(str(vqgan_file))
    sizes = [p.stat().st_size for p in (*clip_files, vqgan_file)]
    assert sum(sizes) <= 20 * 1024 * 1024, sizes
    assert (ASSETS_DIR / vqgan_yaml).exists()
    assert (ASSETS_DIR / "MODELS.md").exists()


def test_shipped_files_have_the_hashes_models_md_lists():
    import re

    from clipbeam.models.vqgan_checkpoint import SHIPPED_VQGANS
    from clipbeam.storage import file_sha256

    listed = dict(re.findall(r"([\w.-]+\.(?:pt|safetensors)) `([0-9a-f]{64})`", (ASSETS_DIR / "MODELS.md").read_text()))
    shipped = [*SHIPPED_CHECKPOINTS.values(), *SHIPPED_VQGANS.values()]
    assert sorted(listed) == sorted(shipped)
    for name in shipped:
        assert file_sha256(str(ASSETS_DIR / name)) == listed[name], name


def test_zero_shot_accuracy_and_search_precision(clip):
    report = evaluate_clip(clip, per_class=20, seed=HELD_OUT_SEED, k=10)
    assert report.accuracy >= 0.9, report.accuracy
    assert report.precision_at_k >= 0.8, report.precision_at_k
    assert report.confusion.sum() == 480


def test_untrained_weights_do_not_pass(clip):
    """The thresholds mean something: the same architecture with random weights is near chance."""
    random_clip = load_clip(ClipSpec("shapes-clip", "none", seed=0, device="cpu"))
    report = evaluate_clip(random_clip, per_class=5, seed=HELD_OUT_SEED)
    assert report.accuracy < 0.3


def test_vqgan_reconstructs_held_out_images(vqgan):
    from clipbeam.models.train_vqgan import reconstruction_error

    images = [image for image, _ in heldout_set(4, seed=HELD_OUT_SEED)]
    error = reconstruction_error(vqgan, images)
    assert error["mse"] <= DOCUMENTED_VQGAN_MSE * 1.25, error


def test_renders_of_colored_circles_have_their_color(clip, vqgan):
    from clipbeam.models.prompts import Prompt
    from clipbeam.models.vqgan_clip import Renderer, RenderSettings

    renderer = Renderer(vqgan, clip)
    nearest = {}
    for color in RENDER_COLORS:
        result = renderer.render([Prompt(f"a {color} circle")], seed=0, steps=RENDER_STEPS, width=64, height=64,
                                 settings=RenderSettings(cutn=4, lr=RENDER_LR))
        h = saturated_mean_hue(result.image)
        nearest[color] = None if h is None else nearest_color(h)
    hits = sum(nearest[c] == c for c in RENDER_COLORS)
    assert hits >= 4, nearest


# A short loop keeps the test fast (about 10 s on a CPU core); it takes larger steps than generate's default
# lr 0.1 to get there. 5 of 6 colors measured (seeds 0-3; red drifts to yellow); the benchmark runs 100 steps.
RENDER_STEPS = 16
RENDER_LR = 0.3
RENDER_COLORS = tuple(COLORS)


def test_embed_by_shipped_name_gives_embeddings_that_match_their_captions(tmp_path, clip):
    import numpy as np
    from embedhelpers import manifest, read_rows

    from clipbeam.cli import main
    from clipbeam.models.clip import encode_texts
    from clipbeam.models.shapes import class_prompts

    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "emb")
    assert main(["synth-corpus", "--output", corpus, "--n", "48", "--seed", "99"]) == 0
    assert main(["embed", "--input", corpus + "/*.tar", "--output", out, "--model", "shapes-clip",
                 "--pretrained", "shapes", "--no-progress"]) == 0
    assert manifest(out)["weights"] == clip.weights
    rows = read_rows(out)
    images = np.array([row["image_embedding"] for row in rows], dtype=np.float32)
    prompts = class_prompts()
    predicted = (images @ encode_texts(clip, prompts).T).argmax(axis=1)
    accuracy = np.mean([prompts[p] == row["caption"] for p, row in zip(predicted, rows, strict=True)])
    assert accuracy >= 0.85, accuracy
