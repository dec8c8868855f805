"""Training a small VQGAN of clipbeam's taming-compatible architecture (clipbeam.models.vqgan).

The objective is taming's first stage without its optional parts: an L1
reconstruction loss plus the quantizer's codebook and commitment terms
(VectorQuantizer2, straight-through gradients), optionally with a squared-error
term beside the L1 (`l2_weight`). L1 pushes every pixel equally hard, so on
images that are mostly flat background a small decoder long settles for the
right outline in one average color; the squared error weighs the large errors
of a wrongly colored shape more and makes it learn the colors much sooner.
The perceptual (LPIPS) and adversarial losses are left out: LPIPS needs
downloaded VGG weights, and for flat synthetic images the pixel losses alone
reconstruct well. Codes that no input chose for a while are restarted on
random encoder outputs of the current batch, so a small corpus still uses the
whole codebook.

Because the model is fully convolutional (no attention at the trained
resolutions of the shipped config), it may train on random crops smaller than
its nominal resolution, which cuts the cost per sample by the area ratio and
still reconstructs whole images. The result is written with
clipbeam.models.vqgan_checkpoint.save_vqgan: .safetensors plus its taming YAML
beside it, exactly what `clipbeam generate --vqgan PATH` loads.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipbeam.models.vqgan import VectorQuantizer2, VQGANConfig, build_vqgan, config_from_dict
from clipbeam.storage import join

LOG = logging.getLogger(__name__)

# Named configs for `clipbeam train vqgan --config NAME` (a YAML path works too).
PRESETS: dict[str, dict] = {
    # 64x64 images -> 16x16 tokens from 256 codes of 8 dimensions; about 1.2 M parameters (4.9 MB in float32).
    # Width 64, not 32: taming's GroupNorm has 32 groups, so at width 32 every group is one channel and each
    # norm rescales every channel of an image on its own; a flat shape on a flat background then leaves a
    # channel only its sign, and the decoder (whose last norm sits right before the RGB conv) learns colors
    # very slowly. Two channels per group keep their ratio. ch_mult [1, 1, 1] keeps the cost per pixel low.
    "shapes-vqgan": {
        "model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": 8,
                "n_embed": 256,
                "ddconfig": {
                    "double_z": False, "z_channels": 64, "resolution": 64, "in_channels": 3, "out_ch": 3,
                    "ch": 64, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                },
            },
        }
    },
}
WEIGHTS_NAME = "vqgan.safetensors"


def preset_config(name: str) -> VQGANConfig:
    return config_from_dict(PRESETS[name])


def to_model_input(image: Image.Image, resolution: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Resize so the shorter side is `resolution`, take a random crop x crop window, scale to [-1, 1] CHW."""
    width, height = image.size
    if min(width, height) != resolution:
        factor = resolution / min(width, height)
        size = (max(resolution, round(width * factor)), max(resolution, round(height * factor)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


class VQGANTask:
    """A `TrainTask` (see train_common) for taming-compatible VQModels."""

    name = "vqgan"

    def __init__(self, config: VQGANConfig, device: str, crop: int | None = None, restart_every: int = 20,
                 codebook_weight: float = 0.75, autoencoder_steps: int = 0, start_step: int = 0,
                 settings: dict | None = None, l2_weight: float = 0.0) -> None:
        if config.gumbel:
            raise ValueError("training a GumbelVQ is not supported; use a VQModel config")
        self.config = config
        self.resolution = int(config.ddconfig["resolution"])
        self.crop = int(crop or self.resolution)
        if self.crop % config.factor or self.crop > self.resolution:
            raise ValueError(f"crop {self.crop} must be a multiple of {config.factor} and at most {self.resolution}")
        self.device = device
        self.model = build_vqgan(config).train()
        self.model.requires_grad_(True)
        self.restart_every = restart_every
        self.settings = dict(settings or {})
        self._usage = torch.zeros(config.n_embed)
        self._steps_since_restart = 0
        self._crops = torch.Generator().manual_seed(int(self.settings.get("seed", 0)))
        self.codebook_weight = codebook_weight
        self.l2_weight = l2_weight
        self.autoencoder_steps = autoencoder_steps
        self._step = start_step
        self._initialised = start_step > autoencoder_steps  # resumed after the codebook was seeded

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 4]
        rest = [p for n, p in self.model.named_parameters() if p.ndim < 4]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def step(self, images: list, captions: list[str | None]) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.stack([to_model_input(image, self.resolution, self.crop, self._crops) for image in images])
        x = x.to(self.device)
        h = self.model.quant_conv(self.model.encoder(x))
        self._step += 1
        if self._step <= self.autoencoder_steps:
            # warm-up as a plain autoencoder, so that the codebook is later seeded from informative features
            x_rec = self.model.decode(h)
            l1 = (x - x_rec).abs().mean()
            with torch.no_grad():
                mse = F.mse_loss(x_rec.clamp(-1, 1), x)
            return self._reconstruction_loss(x, x_rec, l1), {"l1": float(l1.detach()), "mse": float(mse),
                                                              "q_loss": 0.0, "perplexity": 0.0}
        if not self._initialised:
            self._seed_codebook(h, everything=True)
            self._initialised = True
        z_q, q_loss, (_, _, indices) = self.model.quantize(h)
        x_rec = self.model.decode(z_q)
        l1 = (x - x_rec).abs().mean()
        loss = self._reconstruction_loss(x, x_rec, l1) + q_loss
        if isinstance(self.model.quantize, VectorQuantizer2) and self.codebook_weight:
            # taming's legacy quantizer weighs the codebook term by beta (0.25) and commitment by 1; the
            # codes then trail the encoder and a small codebook collapses. Pull the codes with full weight.
            codes = self.model.quantize.embedding(indices).view(h.shape[0], h.shape[2], h.shape[3], -1)
            loss = loss + self.codebook_weight * F.mse_loss(codes, h.detach().permute(0, 2, 3, 1))
        with torch.no_grad():
            counts = torch.bincount(indices.flatten().cpu(), minlength=self.config.n_embed).float()
            self._usage += counts
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            mse = F.mse_loss(x_rec.clamp(-1, 1), x)
            self._maybe_restart(h)
        return loss, {"l1": float(l1.detach()), "mse": float(mse), "q_loss": float(q_loss.detach()),
                      "perplexity": float(perplexity)}

    def _reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
        """L1, plus l2_weight times the squared error (pixels in [-1, 1])."""
        if not self.l2_weight:
            return l1
        return l1 + self.l2_weight * F.mse_loss(x_rec, x)

    def _seed_codebook(self, h: torch.Tensor, everything: bool = False) -> int:
        """Put codes (all, or those unused since the last restart) on random encoder outputs of this batch."""
        quantizer = self.model.quantize
        if not isinstance(quantizer, VectorQuantizer2):
            return 0
        chosen = torch.arange(self.config.n_embed) if everything else torch.nonzero(self._usage == 0).flatten()
        if len(chosen):
            with torch.no_grad():
                flat = h.detach().permute(0, 2, 3, 1).reshape(-1, quantizer.e_dim)
                picks = torch.randint(0, flat.shape[0], (len(chosen),), generator=self._crops)
                noise = 0.01 * flat.std() * torch.randn(len(chosen), quantizer.e_dim, generator=self._crops)
                quantizer.embedding.weight.data[chosen.to(flat.device)] = flat[picks.to(flat.device)] + noise.to(
                    flat.device)
        return len(chosen)

    def _maybe_restart(self, h: torch.Tensor) -> None:
        """Every `restart_every` steps, move the codes no input chose meanwhile onto encoder outputs."""
        self._steps_since_restart += 1
        if not self.restart_every or self._steps_since_restart < self.restart_every:
            return
        restarted = self._seed_codebook(h)
        if restarted:
            LOG.debug("restarted %d unused codes", restarted)
        self._usage.zero_()
        self._steps_since_restart = 0

    def export(self, output: str, storage_options: dict | None) -> list[str]:
        from clipbeam.models.vqgan_checkpoint import save_vqgan

        return list(save_vqgan(self.model.cpu().eval(), join(output, WEIGHTS_NAME), storage_options))


def reconstruction_error(model, images: list[Image.Image], batch_size: int = 64) -> dict[str, float]:
    """MSE (pixels in [0, 1]), PSNR (dB) and mean absolute error (0..255) of whole-image reconstructions."""
    device = next(model.parameters()).device
    resolution = int(model.config.ddconfig["resolution"])
    squared, absolute, count = 0.0, 0.0, 0
    psnrs = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.stack([to_model_input(im, resolution, resolution, generator)
                             for im in images[start:start + batch_size]]).to(device)
            rec = model.decode(model.encode(x)[0]).clamp(-1, 1)
            a, b = (x + 1) / 2, (rec + 1) / 2
            per_image = ((a - b) ** 2).flatten(1).mean(1)
            psnrs.extend((10 * torch.log10(1.0 / per_image.clamp_min(1e-10))).tolist())
            squared += float(per_image.sum())
            absolute += float((a - b).abs().flatten(1).mean(1).sum()) * 255.0
            count += len(x)
    mse = squared / count
    return {"mse": mse, "psnr": float(10 * np.log10(1.0 / mse)), "mean_psnr": float(np.mean(psnrs)),
            "mae_255": absolute / count}
