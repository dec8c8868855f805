"""The VQGAN+CLIP optimisation loop: render an image that CLIP matches to prompts.

A latent grid z (random codebook tokens from the seed, or an encoded init
image) is quantized to the VQGAN codebook with a straight-through gradient,
decoded, clamped to [0, 1] with a gradient-keeping clamp, cut into augmented
crops, embedded by CLIP and scored against the prompts with the spherical
distance; Adam updates z, which is then clamped to the codebook's box
(shared/reference/vqgan-clip.md, section 1).

Reproducibility: every random number (initial tokens, crop boxes, flips,
affine and perspective parameters, colour jitter, noise) comes from a private
torch.Generator seeded from the render's seed, so renders do not depend on
global RNG state or on other renders running in the same process; torch,
numpy and `random` are also seeded before anything is built. On CPU the same
prompt, seed and settings give the same pixels. Augmentations are plain torch
(one batched grid_sample for all cutouts), with no kornia dependency.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipbeam.models.clip import LoadedClip, encode_texts, image_normalisation
from clipbeam.models.prompts import Prompt
from clipbeam.models.vqgan import VQModel

LOG = logging.getLogger(__name__)

AUGMENTATIONS = ("flip", "affine", "perspective", "jitter", "noise", "shrink")
DEFAULT_AUGMENTATIONS = ("flip", "affine", "perspective", "jitter", "noise")
INITS = ("tokens", "plain")
LR_SCHEDULES = ("constant", "drop", "cosine")

# Augmentation strengths: (probability per cutout, magnitude). Chosen from the
# ranges the reference implementations use (section 1.4 of the reference).
FLIP_P = 0.5
AFFINE_P, AFFINE_DEGREES, AFFINE_TRANSLATE, AFFINE_SHEAR_DEGREES, AFFINE_SCALE = 0.7, 15.0, 0.1, 5.0, 0.1
PERSPECTIVE_P, PERSPECTIVE_DISTORTION = 0.4, 0.2
# shrink: the whole image drawn smaller (side 1/1..1/(1 + SHRINK_MAX)) at a random place over a flat gray fill,
# so that a texture filling the image reads as a square of texture, not as the prompt's object.
SHRINK_P, SHRINK_MAX, SHRINK_FILL = 0.8, 0.8, (0.15, 0.85)
JITTER_P, JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_SATURATION, JITTER_HUE = 0.7, 0.1, 0.1, 0.1, 0.05


@dataclass(frozen=True)
class ImagePrompt:
    """An image to match, with a weight and stop like a text prompt. `vector` is the image's CLIP
    vector as embed computes it (models.embedder.QueryImages): the render is pulled towards the very
    vector `clipbeam search` would find the image by."""

    vector: np.ndarray  # L2-normalised float32 [D]
    weight: float = 1.0
    stop: float = -math.inf
    name: str = ""


@dataclass(frozen=True)
class RenderSettings:
    """Loop settings shared by every render of a run (per-render steps and size come with the call)."""

    cutn: int = 32
    cut_pow: float = 1.0
    lr: float = 0.1
    augment: tuple[str, ...] = DEFAULT_AUGMENTATIONS
    noise_fac: float = 0.1
    init_weight: float = 0.0  # init_weight/2 * MSE(z, z_init): stays near the init image
    save_every: int = 0
    init: str = "tokens"  # tokens: random codebook tokens; plain: an encoded flat gray image
    tv_weight: float = 0.0  # tv_weight * total variation (mean |difference| of neighbouring pixels)
    lr_schedule: str = "constant"  # drop: lr/10 for the last quarter of the steps; cosine: down to lr/10
    augment_scale: float = 1.0  # multiplies the affine and perspective magnitudes
    contrast: tuple[str, ...] = ()  # texts the positive prompts must win against (softmax over CLIP's logits)
    contrast_weight: float = 1.0

    def __post_init__(self) -> None:
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENTATIONS)})")
        if self.cutn < 1:
            raise ValueError("cutn must be at least 1")
        if self.cut_pow <= 0:
            raise ValueError("cut_pow must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r} (choose from {', '.join(INITS)})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
        if min(self.tv_weight, self.augment_scale, self.contrast_weight) < 0:
            raise ValueError("tv_weight, augment_scale and contrast_weight must not be negative")


@dataclass
class RenderResult:
    image: np.ndarray  # uint8 [H, W, 3]
    width: int
    height: int
    steps: int
    loss_initial: float
    loss_final: float
    clip_similarity: float | None  # cosine of the whole image to the positive text prompts (mean)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def output_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """The size actually rendered: each side rounded down to a multiple of the VQGAN factor.

    Raises ValueError when a side is below one latent token.
    """
    if width < factor or height < factor:
        raise ValueError(f"size {width}x{height} is below one latent token ({factor}x{factor} pixels for this VQGAN)")
    return width // factor * factor, height // factor * factor


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA), numpy and `random`; return a private generator for the loop."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class _ReplaceGrad(torch.autograd.Function):
    """Forward value of `forward_value`, gradient routed to `backward_path` (straight-through)."""

    @staticmethod
    def forward(ctx, forward_value: torch.Tensor, backward_path: torch.Tensor) -> torch.Tensor:
        ctx.shape = backward_path.shape
        return forward_value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad.sum_to_size(ctx.shape)


def replace_grad(forward_value: torch.Tensor, backward_path: torch.Tensor) -> torch.Tensor:
    return _ReplaceGrad.apply(forward_value, backward_path)


class _ClampKeepGrad(torch.autograd.Function):
    """A clamp whose gradient is kept wherever following it moves the input back toward the range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.low, ctx.high = low, high
        ctx.save_for_backward(x)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        outside = x - x.clamp(ctx.low, ctx.high)
        return grad * (grad * outside >= 0), None, None


def clamp_keep_grad(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return _ClampKeepGrad.apply(x, low, high)


def quantize_straight_through(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each position of z [B, C, h, w] replaced by its nearest code; the gradient goes to z unchanged."""
    z_last = z.permute(0, 2, 3, 1)
    flat = z_last.reshape(-1, z_last.shape[-1])
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2.0 * flat @ codebook.t()
    codes = codebook[distances.argmin(1)].view(z_last.shape)
    return replace_grad(codes, z_last).permute(0, 3, 1, 2)


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """theta^2 / 2 between unit vectors x [N, D] and y [M, D], as [N, M] (stable near 0, unlike acos)."""
    chord = (x[:, None, :] - y[None, :, :]).norm(dim=-1)
    return (2.0 * torch.arcsin((chord / 2.0).clamp(max=1.0))).pow(2) / 2.0


def prompt_loss(features: torch.Tensor, target: torch.Tensor, weight: float, stop: float) -> torch.Tensor:
    """|w| * mean(sign(w) * d); gradient only where sign(w) * d is above `stop`."""
    d = spherical_distance(features, target) * math.copysign(1.0, weight)
    gated = replace_grad(d, torch.maximum(d, torch.full_like(d, stop)))
    return abs(weight) * gated.mean()


def _homographies(n: int, width: int, height: int, cut_size: int, cut_pow: float, augment: Sequence[str],
                  gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """[n, 3, 3] maps from cutout coordinates ([-1, 1]^2) to image coordinates (grid_sample's)."""
    s_max = min(width, height)
    s_min = min(width, height, cut_size)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    sizes = (u.pow(cut_pow) * (s_max - s_min) + s_min).floor().clamp(1, s_max)
    ox = torch.rand(n, generator=gen, dtype=torch.float64) * (width - sizes + 1).floor()
    oy = torch.rand(n, generator=gen, dtype=torch.float64) * (height - sizes + 1).floor()
    ox, oy = ox.floor(), oy.floor()
    m = torch.zeros(n, 3, 3, dtype=torch.float64)
    m[:, 0, 0] = sizes / width
    m[:, 1, 1] = sizes / height
    m[:, 0, 2] = (2 * ox + sizes) / width - 1
    m[:, 1, 2] = (2 * oy + sizes) / height - 1
    m[:, 2, 2] = 1
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) < p)[:, None, None]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    if "flip" in augment:
        flip = eye.clone()
        flip[:, 0, 0] = -1
        m = m @ torch.where(chosen(FLIP_P), flip, eye)
    if "affine" in augment:
        degrees, shear_degrees = AFFINE_DEGREES * strength, AFFINE_SHEAR_DEGREES * strength
        translate, scaling = 2 * AFFINE_TRANSLATE * strength, AFFINE_SCALE * strength
        angle = torch.deg2rad(uniform(-degrees, degrees))
        shear = torch.tan(torch.deg2rad(uniform(-shear_degrees, shear_degrees)))
        scale = uniform(1 - scaling, 1 + scaling)
        tx = uniform(-translate, translate)
        ty = uniform(-translate, translate)
        affine = eye.clone()
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        affine[:, 0, 0], affine[:, 0, 1], affine[:, 0, 2] = cos, -sin + cos * shear, tx
        affine[:, 1, 0], affine[:, 1, 1], affine[:, 1, 2] = sin, cos + sin * shear, ty
        m = m @ torch.where(chosen(AFFINE_P), affine, eye)
    if "perspective" in augment:
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        jitter = (torch.rand(n, 4, 2, generator=gen, dtype=torch.float64) * 2 - 1) * (PERSPECTIVE_DISTORTION * strength)
        m = m @ torch.where(chosen(PERSPECTIVE_P), _corner_homography(corners, corners + jitter), eye)
    if "shrink" in augment:
        factor = 1 + uniform(0.0, SHRINK_MAX * strength)
        shrink = eye.clone()
        shrink[:, 0, 0], shrink[:, 1, 1] = factor, factor
        shrink[:, 0, 2], shrink[:, 1, 2] = uniform(-1.0, 1.0) * (factor - 1), uniform(-1.0, 1.0) * (factor - 1)
        m = m @ torch.where(chosen(SHRINK_P), shrink, eye)
    return m


def _corner_homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The homographies [n, 3, 3] taking the 4 points src [4, 2] to dst [n, 4, 2]."""
    n = dst.shape[0]
    rows = []
    rhs = []
    for i in range(4):
        x, y = src[i, 0].item(), src[i, 1].item()
        u, v = dst[:, i, 0], dst[:, i, 1]
        one, zero = torch.ones(n, dtype=dst.dtype), torch.zeros(n, dtype=dst.dtype)
        rows.append(torch.stack([one * x, one * y, one, zero, zero, zero, -u * x, -u * y], 1))
        rows.append(torch.stack([zero, zero, zero, one * x, one * y, one, -v * x, -v * y], 1))
        rhs.extend([u, v])
    a = torch.stack(rows, 1)
    b = torch.stack(rhs, 1)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=dst.dtype)], 1).view(n, 3, 3)


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter per cutout (plain torch, differentiable)."""
    n = x.shape[0]

    def factor(mag: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 * mag + 1 - mag).to(x)[:, None, None, None]

    on = (torch.rand(n, generator=gen) < JITTER_P).to(x)[:, None, None, None]
    brightness, contrast, saturation = factor(JITTER_BRIGHTNESS), factor(JITTER_CONTRAST), factor(JITTER_SATURATION)
    hue = (torch.rand(n, generator=gen) * 2 - 1) * JITTER_HUE * 2 * math.pi
    luma_w = torch.tensor([0.299, 0.587, 0.114]).to(x)[None, :, None, None]
    y = x * brightness
    grey = (y * luma_w).sum(1, keepdim=True)
    y = (y - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)
    grey = (y * luma_w).sum(1, keepdim=True)
    y = grey + (y - grey) * saturation
    # Hue: rotate the chroma plane of YIQ.
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = torch.cos(hue), torch.sin(hue)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mix = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(x)
    y = torch.einsum("nij,njhw->nihw", mix, y)
    return on * y + (1 - on) * x


def make_cutouts(image: torch.Tensor, cut_size: int, cutn: int, cut_pow: float, augment: Sequence[str],
                 noise_fac: float, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """image [1, 3, H, W] in [0, 1] -> cutouts [cutn, 3, cut_size, cut_size] (not yet CLIP-normalised).

    Random square crops (sizes from u^cut_pow between min(W, H, cut_size) and
    min(W, H)) composed with flips, affine and perspective warps into one
    homography per cutout, sampled in one batched grid_sample; where crops can
    be much larger than the cutout (images of 1.5x cut_size and more) they are
    supersampled and box-filtered against aliasing.
    """
    _, _, height, width = image.shape
    h = _homographies(cutn, width, height, cut_size, cut_pow, augment, gen, strength)
    supersample = int(min(4, max(1, round(min(width, height) / cut_size))))
    side = cut_size * supersample
    coords = (torch.arange(side, dtype=torch.float64) * 2 + 1) / side - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)
    mapped = points @ h.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:]).view(cutn, side, side, 2)
    grid = grid.to(device=image.device, dtype=image.dtype)
    if "shrink" in augment:  # outside the image: a flat gray per cutout
        fill = (torch.rand(cutn, generator=gen) * (SHRINK_FILL[1] - SHRINK_FILL[0]) + SHRINK_FILL[0])
        fill = fill.to(image)[:, None, None, None]
        cutouts = F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    else:
        cutouts = F.grid_sample(image.expand(cutn, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                                align_corners=False)
    if supersample > 1:
        cutouts = F.avg_pool2d(cutouts, supersample)
    if "jitter" in augment:
        cutouts = _jitter(cutouts, gen)
    cutouts = clamp_keep_grad(cutouts, 0.0, 1.0)
    if "noise" in augment and noise_fac > 0:
        amount = (torch.rand(cutn, generator=gen) * noise_fac).to(cutouts)[:, None, None, None]
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        noise_gen = torch.Generator(device=cutouts.device).manual_seed(noise_seed)
        noise = torch.randn(cutouts.shape, generator=noise_gen, device=cutouts.device, dtype=cutouts.dtype)
        cutouts = cutouts + amount * noise
    return cutouts


def contrast_loss(features: torch.Tensor, texts: torch.Tensor, positives: int, scale: float) -> torch.Tensor:
    """Cross-entropy of the cutouts' CLIP logits over `texts` [T, D], whose first `positives` rows are the prompts
    (their probability mass is what is maximised): the render must look more like its prompt than like any
    contrast text, which a plain distance to one prompt does not ask."""
    log_p = torch.log_softmax(scale * features @ texts.t(), dim=-1)
    return -torch.logsumexp(log_p[:, :positives], dim=-1).mean()


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically neighbouring pixels: low for flat regions."""
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


def scheduled_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of `step` (0-based) of `steps`: constant, a drop to lr/10 for the last quarter, or a
    cosine from lr down to lr/10."""
    if schedule == "drop":
        return lr / 10 if step >= 0.75 * steps else lr
    if schedule == "cosine":
        return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps - 1)))
    return lr


def plain_image(width: int, height: int, gen: torch.Generator) -> Any:
    """A flat gray image (the level drawn from the seed, mid-gray +- 40) with faint noise: a plain background to
    start from, so the loop paints one region instead of recolouring random texture."""
    from PIL import Image

    level = 128 + int(torch.randint(-40, 41, (1,), generator=gen))
    noise = torch.randn(height, width, 1, generator=gen) * 4
    pixels = (level + noise).expand(height, width, 3).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels.copy(), mode="RGB")


def pil_to_tensor(image: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> float [1, 3, H, W] in [0, 1], optionally resized (LANCZOS) to size (W, H) first."""
    from PIL import Image

    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)
FrameFn = Callable[[int, np.ndarray], None]  # (step, uint8 [H, W, 3])


class Renderer:
    """Holds a loaded VQGAN and CLIP for many renders (text embeddings are cached across renders)."""

    def __init__(self, vqgan: VQModel, clip: LoadedClip) -> None:
        self.vqgan = vqgan
        self.clip = clip
        self.device = torch.device(clip.device)
        self.vqgan.to(self.device).eval().requires_grad_(False)
        self.clip.model.requires_grad_(False)
        self.codebook = vqgan.codebook.detach().to(self.device)
        self.z_min = self.codebook.min(0).values[None, :, None, None]
        self.z_max = self.codebook.max(0).values[None, :, None, None]
        mean, std = image_normalisation(clip)
        self.mean = torch.tensor(mean, device=self.device)[None, :, None, None]
        self.std = torch.tensor(std, device=self.device)[None, :, None, None]
        self.dtype = next(clip.model.parameters()).dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        self.logit_scale = float(clip.model.logit_scale.exp()) if hasattr(clip.model, "logit_scale") else 100.0

    @property
    def factor(self) -> int:
        return self.vqgan.factor

    def embed_text(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            self._text_cache[text] = torch.from_numpy(encode_texts(self.clip, [text])).to(self.device)
        return self._text_cache[text]

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, cut, cut] in [0, 1] (with gradient) -> L2-normalised float32 [N, D]."""
        normalised = ((pixels - self.mean) / self.std).to(self.dtype)
        return F.normalize(self.clip.model.encode_image(normalised).float(), dim=-1)

    def synth(self, z: torch.Tensor) -> torch.Tensor:
        """z -> image [1, 3, H, W] in [0, 1] through straight-through quantization and the decoder."""
        decoded = self.vqgan.decode(quantize_straight_through(z, self.codebook))
        return clamp_keep_grad((decoded + 1) / 2, 0.0, 1.0)

    def initial_z(self, width: int, height: int, gen: torch.Generator, init_image: Any | None,
                  init: str = "tokens") -> torch.Tensor:
        f = self.factor
        if init_image is None and init == "plain":
            init_image = plain_image(width, height, gen)
        if init_image is not None:
            pixels = pil_to_tensor(init_image, (width, height)).to(self.device)
            with torch.no_grad():
                z, _, _ = self.vqgan.encode(pixels * 2 - 1)
            return z.detach()
        tokens = torch.randint(0, self.codebook.shape[0], (height // f * (width // f),), generator=gen)
        codes = self.codebook[tokens.to(self.device)]
        return codes.view(1, height // f, width // f, -1).permute(0, 3, 1, 2).contiguous()

    def render(self, prompts: Sequence[Prompt], *, seed: int, steps: int, width: int, height: int,
               settings: RenderSettings, image_prompts: Sequence[ImagePrompt] = (), init_image: Any | None = None,
               progress: ProgressFn | None = None, on_frame: FrameFn | None = None) -> RenderResult:
        """Optimise z for `steps` Adam steps; width/height must already be multiples of the factor."""
        if width % self.factor or height % self.factor or width < self.factor or height < self.factor:
            raise ValueError(f"size {width}x{height} is not a positive multiple of {self.factor}")
        if not prompts and not image_prompts:
            raise ValueError("nothing to render: no text or image prompt")
        started = time.monotonic()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        gen = seed_everything(seed)
        cut = self.clip.image_size
        targets = self._targets(prompts, image_prompts, width, height, settings, gen)
        contrast = self._contrast(prompts, settings.contrast)
        z = self.initial_z(width, height, gen, init_image, settings.init).requires_grad_(True)
        z_init = z.detach().clone()
        optimiser = torch.optim.Adam([z], lr=settings.lr)

        def total_loss(image: torch.Tensor) -> torch.Tensor:
            cuts = make_cutouts(image, cut, settings.cutn, settings.cut_pow, settings.augment,
                                settings.noise_fac, gen, settings.augment_scale)
            features = self.embed_images(cuts)
            loss = sum(prompt_loss(features, t, w, s) for t, w, s in targets)
            if settings.init_weight:
                loss = loss + settings.init_weight / 2 * F.mse_loss(z, z_init)
            if settings.tv_weight:
                loss = loss + settings.tv_weight * total_variation(image)
            if contrast is not None:
                loss = loss + settings.contrast_weight * contrast_loss(features, *contrast, self.logit_scale)
            return loss

        losses: list[float] = []
        for step in range(steps):
            image = self.synth(z)
            loss = total_loss(image)
            losses.append(float(loss.detach()))
            if on_frame is not None and settings.save_every and step % settings.save_every == 0:
                on_frame(step, to_uint8(image))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if settings.lr_schedule != "constant":
                optimiser.param_groups[0]["lr"] = scheduled_lr(settings.lr, settings.lr_schedule, step, steps)
            optimiser.step()
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, self.z_max), self.z_min))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
        with torch.no_grad():
            image = self.synth(z)
            final_loss = float(total_loss(image))
            similarity = self._similarity(image, prompts)
        pixels = to_uint8(image)
        if on_frame is not None and settings.save_every:
            on_frame(steps, pixels)
        return RenderResult(
            image=pixels, width=width, height=height, steps=steps,
            loss_initial=losses[0] if losses else final_loss, loss_final=final_loss,
            clip_similarity=similarity, losses=losses, seconds=time.monotonic() - started,
        )

    def _targets(self, prompts: Sequence[Prompt], image_prompts: Sequence[ImagePrompt], width: int, height: int,
                 settings: RenderSettings, gen: torch.Generator) -> list[tuple[torch.Tensor, float, float]]:
        """(embedding, weight, stop) per text and image prompt."""
        targets = [(self.embed_text(p.text), p.weight, p.stop) for p in prompts]
        for ip in image_prompts:
            targets.append((torch.as_tensor(ip.vector, dtype=torch.float32, device=self.device)[None],
                            ip.weight, ip.stop))
        return targets

    def _contrast(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> tuple[torch.Tensor, int] | None:
        """(text embeddings [P + C, D], P) of the positive prompts followed by the contrast texts not among them."""
        positive = [p.text for p in prompts if p.weight > 0]
        others = [t for t in texts if t not in positive]
        if not positive or not others:
            return None
        return torch.cat([self.embed_text(t) for t in positive + others]), len(positive)

    def _similarity(self, image: torch.Tensor, prompts: Sequence[Prompt]) -> float | None:
        positive = [p for p in prompts if p.weight > 0]
        if not positive:
            return None
        cut = self.clip.image_size
        whole = F.interpolate(image, size=(cut, cut), mode="bicubic", align_corners=False, antialias=True)
        features = self.embed_images(whole.clamp(0, 1))
        texts = torch.cat([self.embed_text(p.text) for p in positive])
        return float((features @ texts.t()).mean())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (image.detach()[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
