"""Do renders show their prompt? All 24 shapes-world prompts, judged by two judges that did not draw them.

Renders "a {color} {shape}" for the 6 colors x 4 shapes with the shipped shapes
VQGAN and shapes-clip (the loop's CLIP), then prints per prompt: the shape by
the model-free judge (largest region of the prompt's color, its circularity,
solidity and corners), the shape by the judge CLIP (`shapes-judge-clip`, never
used by the loop), the color of the saturated pixels, and CPU seconds of the
render (process time, so a loaded machine changes it less than wall time).

    HF_HUB_OFFLINE=1 python benchmarks/render_judges.py                 # the demo's settings
    HF_HUB_OFFLINE=1 python benchmarks/render_judges.py --steps 60 --settings '{"cutn": 16}' --save /tmp/r
    HF_HUB_OFFLINE=1 python benchmarks/render_judges.py --load /tmp/r   # judge saved renders again
    HF_HUB_OFFLINE=1 python benchmarks/render_judges.py --every 3 --loop-clip /tmp/run/shapes-clip.pt  # a candidate

--settings takes RenderSettings fields as JSON and replaces the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def render_all(prompts: list[str], args, settings) -> tuple[list, list[float]]:
    from clipbeam.models.clip import ClipSpec, load_clip
    from clipbeam.models.prompts import Prompt
    from clipbeam.models.shapes import SHAPES
    from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan
    from clipbeam.models.vqgan_clip import Renderer

    clip = load_clip(ClipSpec("shapes-clip", args.loop_clip, device="cpu"))
    renderer = Renderer(load_vqgan(resolve_vqgan(args.vqgan)), clip)
    images, seconds = [], []
    for prompt in prompts:
        started = time.process_time()
        color, shape = prompt.split()[1:]
        others = [Prompt(f"a {color} {s}", -args.negatives) for s in SHAPES if s != shape] if args.negatives else []
        result = renderer.render([Prompt(prompt)] + others, seed=args.seed, steps=args.steps, width=args.size,
                                 height=args.size, settings=settings)
        seconds.append(time.process_time() - started)
        images.append(result.image)
    return images, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per render (default: the demo's)")
    parser.add_argument("--settings", default=None, help="RenderSettings fields as JSON (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--save", metavar="DIR", help="also write the renders as PNG files")
    parser.add_argument("--load", metavar="DIR", help="judge PNGs written by --save instead of rendering")
    parser.add_argument("--negatives", type=float, default=0.0, help="weight of the other shapes as negatives")
    parser.add_argument("--every", type=int, default=1, help="only every Nth prompt (quick experiments)")
    parser.add_argument("--judge-clip", default="shapes", help="the judge CLIP's weights (default: shipped)")
    parser.add_argument("--loop-clip", default="shapes", help="the loop's shapes-clip weights (default: shipped)")
    parser.add_argument("--vqgan", default="shapes", help="the loop's VQGAN (default: shipped)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dataclasses

    import numpy as np
    import torch
    from PIL import Image

    from clipbeam.demo import DEMO_SETTINGS, DEMO_STEPS
    from clipbeam.models.render_judges import judge_renders, load_judge_clip
    from clipbeam.models.shapes import class_prompts

    torch.set_num_threads(args.threads)
    prompts = class_prompts()[::args.every]
    names = [p.replace(" ", "-") + ".png" for p in prompts]
    changes = json.loads(args.settings or "{}")
    changes.update({k: tuple(v) for k, v in changes.items() if isinstance(v, list)})
    settings = dataclasses.replace(DEMO_SETTINGS, **changes)
    args.steps = args.steps or DEMO_STEPS
    if args.load:
        images = [np.asarray(Image.open(os.path.join(args.load, n)).convert("RGB")) for n in names]
        seconds = [float("nan")] * len(images)
    else:
        images, seconds = render_all(prompts, args, settings)
        print(f"loop: {args.steps} steps, {args.size}x{args.size}, seed {args.seed}, {settings}")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for image, name in zip(images, names, strict=True):
            Image.fromarray(image).save(os.path.join(args.save, name))
    judgements = judge_renders(prompts, images, load_judge_clip(args.judge_clip))
    print("| prompt | shape (model-free) | shape (judge CLIP) | color | CPU s |")
    print("|---|---|---|---|---|")
    for j, s in zip(judgements, seconds, strict=True):
        print(f"| {j.prompt} | {j.measured_shape or '-'} | {j.clip_shape} | {j.measured_color or '-'} | {s:.1f} |")
    n = len(judgements)
    print(f"\nshape right by both judges: {sum(j.shape_right for j in judgements)}/{n} (model-free "
          f"{sum(j.measured_shape == j.shape for j in judgements)}, judge CLIP "
          f"{sum(j.clip_shape == j.shape for j in judgements)}); color right: "
          f"{sum(j.color_right for j in judgements)}/{n}; CPU s in all: {sum(seconds):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
