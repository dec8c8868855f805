"""Quality of the shipped shapes models on a freshly drawn held-out set, beside untrained baselines.

CLIP (`--model shapes-clip --pretrained shapes`): zero-shot top-1 over the 24
prompts "a {color} {shape}", color and shape accuracy, and text->image
precision@10, against the same architecture with seeded random weights.
VQGAN (`--vqgan shapes`): whole-image reconstruction MSE (pixels in [0, 1]) and
PSNR, against the same architecture untrained. With --renders, also renders
"a {color} circle" for the 6 colors with VQGAN+CLIP and reports whether each
render's mean hue (of its saturated pixels) is nearest to its own color.

    HF_HUB_OFFLINE=1 python benchmarks/shipped_models_quality.py [--per-class 50] [--seed 1234] [--renders]

Other checkpoints (e.g. a training output before it is shipped):
    --clip-pretrained OUT/shapes-clip.pt --vqgan OUT/vqgan.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # shapes_eval lives with the tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50, help="held-out images per class (default 50)")
    parser.add_argument("--seed", type=int, default=1234, help="held-out set seed (default 1234)")
    parser.add_argument("--clip-model", default="shapes-clip")
    parser.add_argument("--clip-pretrained", default="shapes")
    parser.add_argument("--vqgan", default="shapes")
    parser.add_argument("--renders", action="store_true", help="also render 'a {color} circle' and check hue")
    parser.add_argument("--render-steps", type=int, default=100)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()

    import torch
    from shapes_eval import evaluate_clip

    from clipbeam.models.clip import ClipSpec, load_clip
    from clipbeam.models.shapes import heldout_set
    from clipbeam.models.train_vqgan import reconstruction_error
    from clipbeam.models.vqgan import build_vqgan
    from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    results: dict = {"per_class": args.per_class, "seed": args.seed}
    rows: list[tuple[str, str, str, str]] = []

    clock = time.monotonic()
    trained = load_clip(ClipSpec(args.clip_model, args.clip_pretrained, device="cpu"))
    baseline = load_clip(ClipSpec(args.clip_model, "none", seed=0, device="cpu"))
    ours, base = evaluate_clip(trained, args.per_class, args.seed), evaluate_clip(baseline, args.per_class, args.seed)
    for name, attr in (("zero-shot top-1 (24 classes)", "accuracy"), ("color accuracy (6)", "color_accuracy"),
                       ("shape accuracy (4)", "shape_accuracy"), ("search precision@10", "precision_at_k")):
        a, b = getattr(base, attr), getattr(ours, attr)
        rows.append((name, f"{b:.4f}", f"{a:.4f}", f"{b / a:.1f}x" if a else "-"))
        results[f"clip_{attr}"] = b
        results[f"clip_random_{attr}"] = a
    results["clip_seconds"] = round(time.monotonic() - clock, 1)

    clock = time.monotonic()
    source = resolve_vqgan(args.vqgan)
    vqgan = load_vqgan(source)
    torch.manual_seed(0)
    untrained = build_vqgan(source.config)
    images = [image for image, _ in heldout_set(max(1, args.per_class // 5), args.seed)]
    rec, rec_base = reconstruction_error(vqgan, images), reconstruction_error(untrained, images)
    rows.append(("VQGAN reconstruction MSE", f"{rec['mse']:.5f}", f"{rec_base['mse']:.5f}",
                 f"{rec_base['mse'] / rec['mse']:.0f}x lower"))
    rows.append(("VQGAN reconstruction PSNR (dB)", f"{rec['psnr']:.2f}", f"{rec_base['psnr']:.2f}",
                 f"+{rec['psnr'] - rec_base['psnr']:.1f} dB"))
    results.update(vqgan_mse=rec["mse"], vqgan_psnr=rec["psnr"], vqgan_mean_psnr=rec["mean_psnr"],
                   vqgan_mae_255=rec["mae_255"], vqgan_images=len(images), vqgan_untrained_mse=rec_base["mse"],
                   vqgan_seconds=round(time.monotonic() - clock, 1))

    if args.renders:
        results["renders"] = render_hues(trained, vqgan, args.render_steps)
        hits = sum(r["nearest"] == r["color"] for r in results["renders"])
        rows.append(("renders nearest own hue", f"{hits}/6", "-", "-"))

    width = max(len(r[0]) for r in rows)
    print(f"held-out set: {args.per_class} images per class, seed {args.seed}")
    print(f"{'metric'.ljust(width)}  {'shipped':>10}  {'untrained':>10}  ratio")
    for name, shipped, random_, ratio in rows:
        print(f"{name.ljust(width)}  {shipped:>10}  {random_:>10}  {ratio}")
    if args.renders:
        for r in results["renders"]:
            print(f"  a {r['color']} circle: mean hue {r['hue']}, nearest {r['nearest']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def render_hues(clip, vqgan, steps: int) -> list[dict]:
    """Render 'a {color} circle' for every color (64x64, seed 0) and measure the mean hue."""
    from clipbeam.models.prompts import Prompt
    from clipbeam.models.shape_judge import nearest_color, saturated_mean_hue
    from clipbeam.models.shapes import COLORS
    from clipbeam.models.vqgan_clip import Renderer, RenderSettings

    renderer = Renderer(vqgan, clip)
    out = []
    for color in COLORS:
        result = renderer.render([Prompt(f"a {color} circle")], seed=0, steps=steps, width=64, height=64,
                                 settings=RenderSettings(cutn=16))
        h = saturated_mean_hue(result.image)
        out.append({"color": color, "hue": None if h is None else round(h, 3),
                    "nearest": None if h is None else nearest_color(h)})
    return out


if __name__ == "__main__":
    sys.exit(main())
