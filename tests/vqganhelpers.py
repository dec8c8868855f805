"""Helpers for VQGAN tests: tiny seeded VQGANs and the public taming configs."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from clipbeam.models.vqgan import VQModel, build_vqgan, config_from_dict
from clipbeam.models.vqgan_checkpoint import save_vqgan

# Copies of shared/reference/vqgan-keys: the state_dict names and shapes of the public checkpoints.
KEYS_DIR = Path(__file__).parent / "data" / "vqgan-keys"

TINY_DDCONFIG = {
    "double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
}

_PUBLIC_DD = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "num_res_blocks": 2, "dropout": 0.0}

# The taming YAMLs of the public checkpoints (model section), as published.
PUBLIC_CONFIGS = {
    "vqgan_imagenet_f16_1024": {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": 256, "n_embed": 1024,
                   "ddconfig": dict(_PUBLIC_DD, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]),
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                  "params": {"disc_conditional": False, "disc_in_channels": 3,
                                             "disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}}}}},
    "vqgan_imagenet_f16_16384": {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": 256, "n_embed": 16384, "monitor": "val/rec_loss",
                   "ddconfig": dict(_PUBLIC_DD, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]),
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                  "params": {"disc_num_layers": 2, "disc_start": 0, "disc_weight": 0.75}}}}},
    "vqgan_gumbel_f8_8192": {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.GumbelVQ",
        "params": {"kl_weight": 1e-08, "embed_dim": 256, "n_embed": 8192, "monitor": "val/rec_loss",
                   "temperature_scheduler_config": {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                                                    "params": {"warm_up_steps": 0, "max_decay_steps": 1000001,
                                                               "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-06}},
                   "ddconfig": dict(_PUBLIC_DD, ch_mult=[1, 1, 2, 4], attn_resolutions=[32]),
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}},
}


def tiny_config(gumbel: bool = False, n_embed: int = 64):
    target = "taming.models.vqgan.GumbelVQ" if gumbel else "taming.models.vqgan.VQModel"
    return config_from_dict({"model": {"target": target, "params": {
        "embed_dim": 32, "n_embed": n_embed, "ddconfig": dict(TINY_DDCONFIG)}}})


def tiny_vqgan(seed: int = 0, gumbel: bool = False) -> VQModel:
    """A tiny VQGAN with seeded random weights (codebook spread like a trained one, not near zero)."""
    torch.manual_seed(seed)
    model = build_vqgan(tiny_config(gumbel))
    with torch.no_grad():
        model.codebook.normal_(0.0, 1.0)
    return model


def save_tiny_vqgan(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    """Write tiny.safetensors + tiny.yaml in folder; returns the weights path."""
    path = folder / f"{name}.safetensors"
    save_vqgan(tiny_vqgan(seed), str(path))
    return path


def reference_keys(name: str) -> dict[str, list[int]]:
    """name -> shape from vqgan-keys/keys_<name>.txt."""
    keys = {}
    for line in (KEYS_DIR / f"keys_{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            keys[key] = list(ast.literal_eval(shape))
    return keys
