"""A VQGAN whose modules, state_dict keys and numerics match taming-transformers.

The public VQGAN checkpoints (vqgan_imagenet_f16_1024, f16_16384,
gumbel_f8_8192 and the first stage of the Net2Net transformers) were trained
with CompVis/taming-transformers, whose package pins an old pytorch-lightning
and breaks on current torch. This module re-implements the same architecture
from its description (see shared/reference/vqgan-clip.md, section 2) so that
those checkpoints load strictly here, with no taming or Lightning import.

Built from a `VQGANConfig` (the `model.params` of a taming YAML). Key names are
load-bearing: `encoder.down.{i}.block.{j}.conv1`, `decoder.up.{i}.upsample`,
`quantize.embedding` and so on must stay exactly as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipbeam.errors import first_line

LOG = logging.getLogger(__name__)

VQ_TARGET = "taming.models.vqgan.VQModel"
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"
NET2NET_TARGET = "taming.models.cond_transformer.Net2NetTransformer"

DDCONFIG_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout",
)
# Accepted by taming's Encoder/Decoder but without effect at their defaults.
_IGNORED_DDCONFIG = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "attn_type": "vanilla"}


@dataclass(frozen=True)
class VQGANConfig:
    """Everything needed to build a VQModel: taming's `model.params` minus the loss."""

    embed_dim: int
    n_embed: int
    ddconfig: dict[str, Any]
    gumbel: bool = False
    kl_weight: float = 1e-8
    extra: dict[str, Any] = field(default_factory=dict)  # other taming params, kept for the YAML round trip

    @property
    def factor(self) -> int:
        """Pixels per latent token along each axis: 2^(len(ch_mult) - 1)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def target(self) -> str:
        return GUMBEL_TARGET if self.gumbel else VQ_TARGET

    def to_yaml_dict(self) -> dict[str, Any]:
        """The taming YAML layout (`model: {target, params}`), so taming could read it too."""
        params: dict[str, Any] = dict(self.extra)
        params.update(embed_dim=self.embed_dim, n_embed=self.n_embed, ddconfig=dict(self.ddconfig))
        if self.gumbel:
            params["kl_weight"] = self.kl_weight
        params.setdefault("lossconfig", {"target": "taming.modules.losses.DummyLoss"})
        return {"model": {"target": self.target, "params": params}}


def config_from_dict(data: dict[str, Any]) -> VQGANConfig:
    """Parse a taming YAML (VQModel, GumbelVQ, or a Net2Net transformer's first stage).

    Raises ValueError with a one-line reason when the layout is not one of those,
    including a field of the wrong type (`ch_mult: 5`, `ddconfig: [1]`), which
    would otherwise surface as a TypeError traceback.
    """
    try:
        return _config_from_dict(data)
    except (TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"VQGAN config: a field has the wrong type or shape ({exc.__class__.__name__}: {exc})"
                         ) from None


def _config_from_dict(data: dict[str, Any]) -> VQGANConfig:
    if not isinstance(data, dict):
        raise ValueError("VQGAN config must be a mapping")
    model = data.get("model", data)
    if not isinstance(model, dict):
        raise ValueError("VQGAN config: 'model' must be a mapping")
    target = str(model.get("target", VQ_TARGET))
    params = model.get("params", model)
    if target == NET2NET_TARGET or "first_stage_config" in params:
        first = params.get("first_stage_config")
        if not isinstance(first, dict):
            raise ValueError("VQGAN config: Net2Net config without model.params.first_stage_config")
        return _config_from_dict({"model": first})
    if target not in (VQ_TARGET, GUMBEL_TARGET):
        raise ValueError(f"VQGAN config: unsupported target {target!r} (VQModel, GumbelVQ or Net2NetTransformer)")
    if params.get("remap"):
        raise ValueError("VQGAN config: quantizer 'remap' is not supported")
    for key in ("embed_dim", "n_embed", "ddconfig"):
        if key not in params:
            raise ValueError(f"VQGAN config: model.params.{key} is missing")
    dd_in = dict(params["ddconfig"])
    for key, default in _IGNORED_DDCONFIG.items():
        if key in dd_in and dd_in.pop(key) != default:
            raise ValueError(f"VQGAN config: ddconfig.{key} other than {default!r} is not supported")
    missing = [k for k in DDCONFIG_KEYS if k not in dd_in and k != "dropout"]
    if missing:
        raise ValueError(f"VQGAN config: ddconfig lacks {', '.join(missing)}")
    unknown = sorted(set(dd_in) - set(DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"VQGAN config: unknown ddconfig keys {', '.join(unknown)}")
    dd = {
        "double_z": bool(dd_in["double_z"]),
        "z_channels": int(dd_in["z_channels"]),
        "resolution": int(dd_in["resolution"]),
        "in_channels": int(dd_in["in_channels"]),
        "out_ch": int(dd_in["out_ch"]),
        "ch": int(dd_in["ch"]),
        "ch_mult": [int(m) for m in dd_in["ch_mult"]],
        "num_res_blocks": int(dd_in["num_res_blocks"]),
        "attn_resolutions": [int(r) for r in dd_in["attn_resolutions"]],
        "dropout": float(dd_in.get("dropout", 0.0)),
    }
    widths = [dd["ch"]] + [dd["ch"] * m for m in dd["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError("VQGAN config: every level width (ch * ch_mult) must be a multiple of 32 (GroupNorm groups)")
    gumbel = target == GUMBEL_TARGET
    if gumbel and dd["z_channels"] != int(params["embed_dim"]):
        raise ValueError("VQGAN config: GumbelVQ needs z_channels == embed_dim")
    extra = {k: v for k, v in params.items()
             if k not in ("embed_dim", "n_embed", "ddconfig", "kl_weight", "lossconfig", "ckpt_path", "ignore_keys")}
    return VQGANConfig(
        embed_dim=int(params["embed_dim"]),
        n_embed=int(params["n_embed"]),
        ddconfig=dd,
        gumbel=gumbel,
        kl_weight=float(params.get("kl_weight", 1e-8)),
        extra=extra,
    )


def config_from_yaml(text: str) -> VQGANConfig:
    """Parse YAML text (taming's config file) into a VQGANConfig."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"VQGAN config is not valid YAML: {first_line(exc)}") from None
    return config_from_dict(data)


def config_to_yaml(config: VQGANConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_yaml_dict(), sort_keys=False)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """taming's Normalize: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv stages with a residual; a 1x1 `nin_shortcut` only when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map.

    scaled_dot_product_attention computes softmax(q k^T / sqrt(c)) v, the same
    quantity as taming's explicit bmm/softmax, but lets CUDA use kernels that
    never hold the (h*w)^2 attention map: the map is what runs large renders
    out of memory.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [b, c, h, w] -> [b, 1, h*w, c]
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (asymmetric, as trained)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> features [B, z_channels (x2 if double_z), H/f, W/f].

    Attention placement follows the config `resolution`, never the runtime
    size: using the runtime size would move attention blocks and change keys.
    """

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 dropout: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths_in = [ch] + [ch * m for m in ch_mult[:-1]]
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_in = widths_in[level]
            block_out = ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f], roughly in [-1, 1] (no tanh).

    Each level holds num_res_blocks + 1 blocks; `up[0]` is the highest resolution.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


QuantizeInfo = tuple[Any, Any, torch.Tensor]


class VectorQuantizer2(nn.Module):
    """Nearest-codebook-vector quantization with a straight-through gradient (taming's default).

    Returns (z_q, codebook loss, (None, None, indices)); `legacy` keeps taming's
    ordering of the beta term, which is what the public checkpoints trained with.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_flat [N, e_dim] (squared L2)."""
        codes = self.embedding.weight
        d = (z_flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)[None, :]
             - 2.0 * z_flat @ codes.t())
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizeInfo]:
        z_last = z.permute(0, 2, 3, 1).contiguous()
        indices = self.nearest(z_last.view(-1, self.e_dim))
        z_q = self.embedding(indices).view(z_last.shape)
        commit = torch.mean((z_q.detach() - z_last) ** 2)
        codebook = torch.mean((z_q - z_last.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z_last + (z_q - z_last).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, indices)


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantization (taming's GumbelVQ): logits from a 1x1 `proj`, codes from `embed`.

    In training mode it samples a (straight-through) Gumbel-softmax as taming
    does. In eval mode it takes the argmax of the logits instead of sampling,
    so that encoding an init image is deterministic (taming samples even in
    eval, which makes the same seed give different images).
    """

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int, straight_through: bool = True,
                 kl_weight: float = 5e-4, temp_init: float = 1.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.n_embed = n_embed
        self.straight_through = straight_through
        self.temperature = temp_init
        self.kl_weight = kl_weight
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z: torch.Tensor, temp: float | None = None) -> tuple[torch.Tensor, torch.Tensor, QuantizeInfo]:
        logits = self.proj(z)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=temp or self.temperature, dim=1, hard=self.straight_through)
        else:
            one_hot = F.one_hot(logits.argmax(dim=1), self.n_embed).permute(0, 3, 1, 2).to(logits.dtype)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
        probs = F.softmax(logits, dim=1)
        kl = self.kl_weight * torch.sum(probs * torch.log(probs * self.n_embed + 1e-10), dim=1).mean()
        return z_q, kl, (None, None, one_hot.argmax(dim=1))


class VQModel(nn.Module):
    """taming's VQModel/GumbelVQ without the training loss: encode, quantize, decode."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        dd = config.ddconfig
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        if config.gumbel:
            self.quantize: nn.Module = GumbelQuantize(dd["z_channels"], config.embed_dim, config.n_embed,
                                                      kl_weight=config.kl_weight)
        else:
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(dd["z_channels"], config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, dd["z_channels"], 1)

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors E [n_embed, embed_dim] (the Gumbel `embed` is used the same way)."""
        q = self.quantize
        return q.embed.weight if isinstance(q, GumbelQuantize) else q.embedding.weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizeInfo]:
        """x in [-1, 1] -> (z_q, quantizer loss, info)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, loss, _ = self.encode(x)
        return self.decode(z_q), loss


def build_vqgan(config: VQGANConfig, device: str | torch.device | None = None) -> VQModel:
    """A VQModel in eval mode (device "meta" builds shapes only, without memory)."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = VQModel(config)
    else:
        model = VQModel(config)
        if device is not None:
            model = model.to(device)
    return model.eval()

