"""Seconds per iteration of clipbeam's VQGAN+CLIP loop against a bare loop.

Both loops use the same models (open_clip through clipbeam.models.clip, the
f16_16384 VQGAN architecture, seeded random weights), the same size, cutn and
Adam. The bare loop is the minimum any implementation must do per step:
decode z, resize the image to CLIP's input once and repeat it cutn times,
encode, cosine loss, backward, Adam step. Ours adds straight-through
quantization, the gradient-keeping clamp, random crops with flip/affine/
perspective/jitter/noise, the spherical-distance loss and the z clamp. The
ratio is ours / bare (1.0 = no overhead). On CUDA it also prints peak GPU
memory. The first iteration of each loop (warm-up) is not timed; the table
gives the mean and the fastest timed iteration (the fastest is the better
estimate on a machine shared with other work).

    python benchmarks/generate_speed.py                       # 256x256, cutn 32, ViT-B-32
    python benchmarks/generate_speed.py --size 512 --device cuda --precision fp16
    python benchmarks/generate_speed.py --settings '{"augment": ["flip", "affine", "perspective", "shrink"], \
        "contrast": ["a red cube", "a blue cube"]}' --lr 1.0      # the demo's loop options
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

F16_16384 = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
    "embed_dim": 256, "n_embed": 16384,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}}}}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(vqgan, clip, size: int, cutn: int, steps: int, lr: float) -> list[float]:
    """Per-iteration seconds of decode -> resize -> repeat -> CLIP -> cosine loss -> Adam."""
    import torch
    import torch.nn.functional as F

    from clipbeam.models.clip import encode_texts, image_normalisation

    device = clip.device
    dtype = next(clip.model.parameters()).dtype
    mean, std = (torch.tensor(v, device=device)[None, :, None, None] for v in image_normalisation(clip))
    target = torch.from_numpy(encode_texts(clip, ["a red cube"])).to(device)
    f = vqgan.factor
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vqgan.codebook.shape[0], ((size // f) ** 2,), generator=generator)
    z = vqgan.codebook[tokens.to(device)].view(1, size // f, size // f, -1).permute(0, 3, 1, 2).contiguous()
    z.requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=lr)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        image = (vqgan.decode(z) + 1) / 2
        cut = F.interpolate(image, size=(clip.image_size, clip.image_size), mode="bilinear", align_corners=False)
        batch = ((cut.expand(cutn, -1, -1, -1) - mean) / std).to(dtype)
        features = F.normalize(clip.model.encode_image(batch).float(), dim=-1)
        loss = (1 - features @ target.t()).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def our_loop(renderer, size: int, cutn: int, steps: int, lr: float, changes: dict) -> list[float]:
    """Per-iteration seconds of Renderer.render, from its progress callback."""
    from clipbeam.models.prompts import parse_prompts
    from clipbeam.models.vqgan_clip import RenderSettings

    stamps: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        _sync(renderer.clip.device)
        stamps.append(time.perf_counter())

    _sync(renderer.clip.device)
    start = time.perf_counter()
    renderer.render(parse_prompts("a red cube"), seed=0, steps=steps, width=size, height=size,
                    settings=RenderSettings(**{"cutn": cutn, "lr": lr, **changes}), progress=progress)
    return [b - a for a, b in zip([start] + stamps[:-1], stamps, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="square output size (default %(default)s)")
    parser.add_argument("--cutn", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="iterations per loop, the first untimed (default 4)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--settings", default="{}",
                        help='more RenderSettings fields for our loop as JSON, e.g. the demo\'s: '
                             '\'{"augment": ["flip", "affine", "perspective", "shrink"], "contrast": ["a red cube", '
                             '"a blue cube"]}\'')
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first iteration is a warm-up)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from clipbeam.models.clip import ClipSpec, load_clip
    from clipbeam.models.vqgan import build_vqgan, config_from_dict
    from clipbeam.models.vqgan_clip import Renderer

    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.settings).items()}
    clip = load_clip(ClipSpec(args.model, "none", device=args.device, precision=args.precision))
    torch.manual_seed(0)
    vqgan = build_vqgan(config_from_dict(F16_16384))
    with torch.no_grad():
        vqgan.codebook.normal_()
    renderer = Renderer(vqgan, clip)  # moves the VQGAN to CLIP's device, eval, no weight gradients
    cuda = clip.device.startswith("cuda")
    rows = []
    loops = (("bare loop", lambda: bare_loop(vqgan, clip, args.size, args.cutn, args.steps, args.lr)),
             ("clipbeam loop", lambda: our_loop(renderer, args.size, args.cutn, args.steps, args.lr, changes)))
    for name, run in loops:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = run()[1:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows.append((name, sum(times) / len(times), min(times), peak))
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"VQGAN+CLIP iteration time: {args.size}x{args.size}, cutn {args.cutn}, {args.model} ({args.precision}), "
          f"f16_16384 VQGAN, random weights, {device}, {args.steps - 1} timed iterations each")
    print(f"{'loop':<15}{'mean s/iter':>12}{'min s/iter':>12}{'it/s (min)':>12}{'peak GPU GiB':>14}")
    for name, mean, fastest, peak in rows:
        print(f"{name:<15}{mean:>12.3f}{fastest:>12.3f}{1 / fastest:>12.3f}"
              f"{(f'{peak:.2f}' if peak is not None else '-'):>14}")
    print(f"{'ratio':<15}{rows[1][1] / rows[0][1]:>12.2f}{rows[1][2] / rows[0][2]:>12.2f}   (clipbeam / bare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
