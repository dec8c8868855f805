"""The two judges of renders: the model-free shape judge and the judge CLIP, each checked on the corpus itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipbeam.models.shape_judge import judge
from clipbeam.models.shapes import SHAPES, corpus_sample, render


def test_model_free_judge_classifies_the_synthetic_corpus():
    samples = [corpus_sample(2026, i) for i in range(240)]
    verdicts = [judge(np.asarray(render(s)), s.color) for s in samples]
    shape_accuracy = np.mean([v.shape == s.shape for v, s in zip(verdicts, samples, strict=True)])
    color_accuracy = np.mean([v.color == s.color for v, s in zip(verdicts, samples, strict=True)])
    per_shape = {shape: np.mean([v.shape == shape for v, s in zip(verdicts, samples, strict=True) if s.shape == shape])
                 for shape in SHAPES}
    assert shape_accuracy >= 0.95 and min(per_shape.values()) >= 0.9, per_shape
    assert color_accuracy >= 0.95, color_accuracy


def _image(fill, shape_box=None, background=(128, 128, 128)):
    image = Image.new("RGB", (64, 64), background)
    if shape_box is not None:
        ImageDraw.Draw(image).rectangle(shape_box, fill=fill)
    return np.asarray(image)


def test_model_free_judge_says_nothing_without_a_region_of_the_color():
    gray = judge(_image(None), "red")
    assert gray.shape is None and gray.color is None and gray.measures is None
    red_square = judge(_image((220, 40, 40), (10, 10, 40, 40)), "blue")
    assert red_square.shape is None and red_square.color == "red"
    assert judge(_image((220, 40, 40), (10, 10, 40, 40)), "red").shape == "square"


def test_model_free_judge_takes_the_largest_region_and_ignores_speckle():
    image = _image((40, 80, 225), (20, 20, 50, 50)).copy()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 64, 40), rng.integers(0, 15, 40)
    image[ys, xs] = (40, 80, 225)  # scattered blue pixels left of the square
    verdict = judge(image, "blue")
    assert verdict.shape == "square" and verdict.measures.corners == 4
    assert verdict.measures.pixels >= 31 * 31


def test_model_free_judge_rejects_unknown_colors():
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        judge(_image(None), "teal")


def test_judge_clip_is_another_model_and_knows_the_corpus():
    """The judge CLIP is shipped, differs from the loop's CLIP in architecture and weights, and classifies a fresh
    held-out set zero-shot (its accuracy is in the message)."""
    from shapes_eval import evaluate_clip

    from clipbeam.models.clip import ClipSpec, load_clip
    from clipbeam.models.render_judges import load_judge_clip

    judge_clip = load_judge_clip()
    loop_clip = load_clip(ClipSpec("shapes-clip", "shapes", device="cpu"))
    assert judge_clip.weights != loop_clip.weights
    assert judge_clip.model.state_dict().keys() != loop_clip.model.state_dict().keys()
    report = evaluate_clip(judge_clip, per_class=10, seed=31337)
    message = (f"judge CLIP zero-shot top-1 {report.accuracy:.3f}, shape {report.shape_accuracy:.3f}, "
               f"color {report.color_accuracy:.3f} (240 held-out images)")
    print(message)
    assert report.accuracy >= 0.9 and report.shape_accuracy >= 0.93, message


# Prompts whose demo render both judges recognise (measured with benchmarks/render_judges.py); with the loop's
# earlier demo settings (60 steps, cutn 16, lr 0.1, noise and color jitter) neither is recognised by both.
RENDER_TEST_PROMPTS = ("a red circle", "a red star")


def test_demo_loop_renders_shapes_both_judges_recognise():
    from clipbeam.demo import DEMO_SETTINGS, DEMO_STEPS
    from clipbeam.models.clip import ClipSpec, load_clip
    from clipbeam.models.prompts import Prompt
    from clipbeam.models.render_judges import judge_renders, load_judge_clip
    from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan
    from clipbeam.models.vqgan_clip import Renderer

    renderer = Renderer(load_vqgan(resolve_vqgan("shapes")), load_clip(ClipSpec("shapes-clip", "shapes", device="cpu")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as benchmarks/render_judges.py measured it: the sums' order decides the last bits
    try:
        images = [renderer.render([Prompt(p)], seed=0, steps=DEMO_STEPS, width=64, height=64,
                                  settings=DEMO_SETTINGS).image for p in RENDER_TEST_PROMPTS]
    finally:
        torch.set_num_threads(threads)
    judgements = judge_renders(list(RENDER_TEST_PROMPTS), images, load_judge_clip())
    assert all(j.shape_right and j.color_right for j in judgements), judgements
