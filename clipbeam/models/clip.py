"""Loading open_clip models the same way in every job, and encoding with them.

A model is named by a ClipSpec: an open_clip architecture plus where its
weights come from (`none` for seeded random weights, a pretrained tag, a local
or remote checkpoint, or a checkpoint shipped with clipbeam). Embed, search,
classify, generate and train all load through `load_clip`, so preprocessing,
tokenisation and normalisation can never differ between them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipbeam.errors import FieldError, UsageError, first_line
from clipbeam.models.text_trim import encode_trimmed, trimmable_tower
from clipbeam.storage import file_sha256

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# (model, pretrained name) -> checkpoint file under clipbeam/assets.
SHIPPED_CHECKPOINTS: dict[tuple[str, str], str] = {
    ("shapes-clip", "shapes"): "shapes-clip.pt",  # trained on the synthetic shapes corpus; see assets/MODELS.md
    ("shapes-judge-clip", "shapes"): "shapes-judge-clip.pt",  # judges renders; never drives the loop
}

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load and how; picklable, so it travels to Beam workers."""

    model: str
    pretrained: str = "none"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"

    def replace(self, **changes: Any) -> "ClipSpec":
        return dataclasses.replace(self, **changes)


@dataclass
class LoadedClip:
    """An open_clip model in eval mode with its own preprocessing and tokenizer."""

    spec: ClipSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    dim: int
    image_size: int
    context_length: int
    weights: str  # pretrained tag, checkpoint sha256, or "random(seed=N)"
    text_tower: Any = None  # a TextTower where encoding captions without padding is exact (text_trim.py)
    autocast: Any = None  # torch dtype to autocast to (bf16 on CPU), None for plain weights' precision


def register_configs() -> None:
    """Make clipbeam's own model configs (tiny test models, shipped models) known to open_clip."""
    import open_clip

    if "clipbeam-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FieldError("device", f"{{field}} {device} asked for, but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise FieldError("device", f"{{field}} must be auto, cpu or cuda[:N], not {device!r}")
    return device


def is_checkpoint_path(pretrained: str) -> bool:
    return "://" in pretrained or "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def validate_spec(spec: ClipSpec, storage_options: dict | None = None) -> None:
    """Check a spec up front: unknown model, bad precision, unreadable checkpoint."""
    import open_clip

    register_configs()
    if spec.model not in open_clip.list_models():
        raise UsageError(
            f"unknown model {spec.model!r}: see open_clip.list_models() (e.g. ViT-B-32, ViT-S-32, clipbeam-tiny)"
        )
    if spec.precision not in PRECISIONS:
        raise FieldError("precision", f"{{field}} must be one of {', '.join(PRECISIONS)}")
    resolve_device(spec.device)
    pretrained = spec.pretrained
    if pretrained == "none" or (spec.model, pretrained) in SHIPPED_CHECKPOINTS:
        return
    if is_checkpoint_path(pretrained) or os.path.exists(pretrained):
        from clipbeam.storage import get_fs

        try:
            fs, path = get_fs(pretrained, storage_options)
            ok = fs.isfile(path)
        except Exception as exc:
            raise UsageError(f"cannot read checkpoint {pretrained}: {exc}") from None
        if not ok:
            raise UsageError(f"checkpoint {pretrained} does not exist or is not a file")
        return
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if pretrained not in tags:
        known = ", ".join(tags) or "none (use {field} none or a checkpoint path)"
        raise FieldError("pretrained", f"unknown pretrained tag {pretrained!r} for {spec.model}; known: {known}")


def fetch_pretrained(spec: ClipSpec, local_runner: bool = True) -> str | None:
    """Make sure a pretrained tag's weights can be had before any pipeline starts.

    With a local runner the weights are downloaded now (or found in open_clip's
    cache), so a tag that cannot be downloaded (offline, a hub error) is one
    line and exit 2, not a pipeline that starts and then fails with "rerun to
    resume". A remote runner's workers download for themselves: then only the
    registry is checked (validate_spec) and the returned line says so.
    Checkpoints, shipped models and `none` need nothing: returns None.
    """
    import open_clip

    pretrained = spec.pretrained
    if (pretrained == "none" or (spec.model, pretrained) in SHIPPED_CHECKPOINTS
            or is_checkpoint_path(pretrained) or os.path.exists(pretrained)):
        return None
    if not local_runner:
        return (f"the workers will download the {pretrained!r} weights of {spec.model} through open_clip "
                "(they need the Hugging Face hub or the weights' URL)")
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(open_clip.get_pretrained_cfg(spec.model, pretrained))
    except Exception as exc:  # offline hub, HTTP errors, a missing file on the hub
        first = first_line(exc, 200)
        raise FieldError("pretrained", f"cannot download the {pretrained!r} weights of {spec.model} "
                         f"({exc.__class__.__name__}: {first}); use {{field}} PATH for a local checkpoint") from None
    if not path:
        raise UsageError(f"open_clip knows no download for the {pretrained!r} weights of {spec.model}")
    return None


def _local_checkpoint(pretrained: str, storage_options: dict | None) -> str:
    """A local path for a checkpoint; remote URLs go through the private, revalidated cache.

    Torch files are checked for TorchScript here, before open_clip's loader sees them.
    """
    if "://" not in pretrained or pretrained.startswith("file://"):
        local = pretrained[len("file://"):] if pretrained.startswith("file://") else pretrained
    else:
        from clipbeam.models.checkpoint_cache import cached_copy

        local = cached_copy(pretrained, storage_options)
    if not local.endswith(".safetensors"):
        from clipbeam.models.torch_files import refuse_torchscript

        refuse_torchscript(local, pretrained)
    return local


def _weights_source(spec: ClipSpec, storage_options: dict | None) -> tuple[str | None, str]:
    """(what open_clip's `pretrained` gets, the weights' label for manifests).

    None means seeded random weights; a checkpoint (shipped, local or remote)
    becomes a local path labelled by its sha256; anything else is a pretrained tag.
    """
    pretrained = spec.pretrained
    if (spec.model, pretrained) in SHIPPED_CHECKPOINTS:
        pretrained = str(ASSETS_DIR / SHIPPED_CHECKPOINTS[(spec.model, pretrained)])
    if pretrained == "none":
        return None, f"random(seed={spec.seed})"
    if is_checkpoint_path(pretrained) or os.path.exists(pretrained):
        local = _local_checkpoint(pretrained, storage_options)
        return local, "sha256:" + file_sha256(local)
    return pretrained, pretrained


def load_clip(spec: ClipSpec, storage_options: dict | None = None, cpu_autocast: bool = False) -> LoadedClip:
    """Build the model, load its weights, move it to its device, set eval mode.

    `cpu_autocast`: bf16 on CPU keeps fp32 weights and runs the encoders under
    torch.autocast (matmuls in bf16, norms and softmax in fp32), which is both
    closer to fp32 and, on CPUs with avx512_bf16, faster than pure bf16 weights.
    """
    import open_clip
    import torch

    register_configs()
    device = resolve_device(spec.device)
    tag, weights = _weights_source(spec, storage_options)
    autocast = torch.bfloat16 if cpu_autocast and spec.precision == "bf16" and device == "cpu" else None
    if tag is None:
        torch.manual_seed(spec.seed)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=tag, precision="fp32" if autocast else spec.precision, device=device
        )
    except Exception as exc:  # corrupt files, wrong architecture, failed downloads
        first = first_line(exc, 300)
        raise UsageError(f"cannot load {spec.model} weights from {spec.pretrained}: "
                         f"{exc.__class__.__name__}: {first}") from None
    model.eval()
    tokenizer = load_tokenizer(spec)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=device,
                            dtype=torch.float32 if autocast else _dtype(spec.precision))
        dim = int(model.encode_image(probe).shape[-1])
    return LoadedClip(spec, model, preprocess, tokenizer, device, dim, image_size, context_length, weights,
                      text_tower=trimmable_tower(model), autocast=autocast)


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _input_dtype(clip: LoadedClip):
    import torch

    return torch.float32 if clip.autocast else _dtype(clip.spec.precision)


def _inference(clip: LoadedClip):
    """no_grad, plus bf16 autocast where the model was loaded for it."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if clip.autocast is not None:
        stack.enter_context(torch.autocast(device_type="cpu", dtype=clip.autocast))
    return stack


def encode_images(clip: LoadedClip, pixels) -> np.ndarray:
    """Preprocessed image tensor [N,3,H,W] -> L2-normalised float32 [N, D]."""
    import torch

    with _inference(clip):
        pixels = pixels.to(clip.device, dtype=_input_dtype(clip))
        features = clip.model.encode_image(pixels).float()
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()


def encode_pixels(clip: LoadedClip, pixels, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 pixels [N,3,H,W] (resized and cropped, not normalised) -> L2-normalised float32 [N, D].

    The pixels travel as uint8 (4x fewer bytes than float32) and are scaled to
    [0, 1] and normalised here, on the model's device: the same arithmetic as
    open_clip's ToTensor + Normalize.
    """
    import torch

    with torch.no_grad():
        x = pixels.to(clip.device, non_blocking=True).float().div_(255.0)
        x = x.sub_(torch.tensor(mean, device=x.device).view(1, -1, 1, 1))
        x = x.div_(torch.tensor(std, device=x.device).view(1, -1, 1, 1))
    return encode_images(clip, x)


def load_tokenizer(spec: ClipSpec):
    """The tokenizer `load_clip(spec)` would give, without building the model.

    For decode workers: tokenising (ftfy and a regex BPE in pure Python) holds
    the GIL, so it belongs where decoding runs, in every worker process, not on
    the thread that feeds the model.
    """
    import open_clip

    register_configs()
    return open_clip.get_tokenizer(spec.model)


def tokenize_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Texts -> token ids [N, context] as int32 (half the bytes through Beam; every vocabulary fits),
    the ids `encode_texts` feeds the text tower."""
    return tokenizer(list(texts)).numpy().astype(np.int32)


def encode_texts(clip: LoadedClip, texts: Sequence[str], trim: bool = True) -> np.ndarray:
    """Texts -> L2-normalised float32 [N, D]; texts longer than the context are truncated.

    With `trim` (and a tower where it is exact, see text_trim.py) captions are
    encoded without the padding after their EOT token; the result is the same.
    """
    if len(texts) == 0:
        return np.zeros((0, clip.dim), dtype=np.float32)
    return encode_tokens(clip, tokenize_texts(clip.tokenizer, texts), trim)


def encode_tokens(clip: LoadedClip, tokens: np.ndarray, trim: bool = True) -> np.ndarray:
    """Token ids [N, context] (from `tokenize_texts`) -> L2-normalised float32 [N, D], as `encode_texts`."""
    import torch

    if len(tokens) == 0:
        return np.zeros((0, clip.dim), dtype=np.float32)
    with _inference(clip):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(clip.device)
        if trim and clip.text_tower is not None:
            features = encode_trimmed(clip.text_tower, tokens).float()
        else:
            features = clip.model.encode_text(tokens).float()
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()


def preprocess_config(spec: ClipSpec) -> dict:
    """open_clip's inference preprocessing settings for a spec, without building the model.

    Mirrors open_clip's factory: the defaults, overlaid with the pretrained
    tag's settings (mean, std, interpolation, resize mode), at the model's image
    size. Lets decode workers preprocess without holding a copy of the weights.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_configs()
    cfg = dataclasses.asdict(PreprocessCfg())
    if spec.pretrained != "none" and (spec.model, spec.pretrained) not in SHIPPED_CHECKPOINTS:
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        raise UsageError(f"unknown model {spec.model!r}")
    size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    cfg["size"] = tuple(size) if isinstance(size, (list, tuple)) else size
    return cfg


def embedding_dim(spec: ClipSpec) -> int:
    """The embedding width from the model config (no weights needed)."""
    import open_clip

    register_configs()
    return int(open_clip.get_model_config(spec.model)["embed_dim"])


def image_normalisation(clip: LoadedClip) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model's preprocessing applies to [0, 1] pixels; for code that builds its own
    pixel tensors (VQGAN+CLIP cutouts) instead of going through `preprocess`."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(clip.model.visual, "preprocess_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD))
    return mean, std


def weights_label(spec: ClipSpec, storage_options: dict | None = None) -> str:
    """What `load_clip(spec).weights` will say, without building the model (for manifests written
    by a launcher whose workers do the loading)."""
    return _weights_source(spec, storage_options)[1]
