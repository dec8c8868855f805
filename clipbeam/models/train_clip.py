"""Contrastive training of an open_clip model: the CLIP objective itself, on any corpus embed reads.

Each step embeds a batch of images and their captions, forms the batch's
image-text cosine-similarity matrix scaled by a learnable temperature
(open_clip's `logit_scale`, clamped at 100 as in CLIP), and minimises the
symmetric cross-entropy: every image should pick its own caption among the
batch's captions, and every caption its own image. Captions that occur more
than once in a batch (frequent in small-vocabulary corpora such as the shapes
corpus) are all counted as correct: their target mass is shared equally, so
that a batch never asks the model to tell "a red circle" from "a red circle".
With distinct captions this is exactly CLIP's loss.

The model is built and its starting weights loaded through
clipbeam.models.clip.load_clip, the same path embed/search/classify use, and
the result is written as an open_clip checkpoint (`--pretrained PATH` loads it)
with the model config JSON beside it.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.nn.functional as F

from clipbeam import __version__
from clipbeam.models.clip import ClipSpec, load_clip, preprocess_config
from clipbeam.storage import atomic_open, join

LOG = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)
EXPORT_PRECISIONS = ("fp32", "fp16")
AUGMENTS = ("crop", "loop", "none")
# `--augment loop`: the cutouts of the demo's VQGAN+CLIP loop (clipbeam.demo.DEMO_SETTINGS), so that the CLIP
# that steers the loop has seen shapes flipped, warped and shrunk over gray as the loop shows them to it.
LOOP_AUGMENT, LOOP_STRENGTH = ("flip", "affine", "perspective", "shrink"), 1.5


class LoopCutouts:
    """PIL image -> one normalised cutout [3, S, S] made by the generation loop's own make_cutouts (one piece
    of code for the loop's augmentations), from a private generator seeded with the run's seed."""

    def __init__(self, spec: ClipSpec) -> None:
        cfg = preprocess_config(spec)
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(cfg["mean"])[:, None, None]
        self.std = torch.tensor(cfg["std"])[:, None, None]
        self.gen = torch.Generator().manual_seed(spec.seed)

    def __call__(self, image) -> torch.Tensor:
        from clipbeam.models.vqgan_clip import make_cutouts, pil_to_tensor

        pixels = pil_to_tensor(image, (self.size, self.size))
        cut = make_cutouts(pixels, self.size, 1, 1.0, LOOP_AUGMENT, 0.0, self.gen, LOOP_STRENGTH)[0]
        return (cut - self.mean) / self.std


def build_train_preprocess(spec: ClipSpec, augment: str):
    """The training transform for the model's own size, mean and std: open_clip's random resized crop (scale
    0.9-1) for "crop", the generation loop's cutouts for "loop", open_clip's inference transform for "none"."""
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r} (choose from {', '.join(AUGMENTS)})")
    if augment == "loop":
        return LoopCutouts(spec)
    cfg = PreprocessCfg(**preprocess_config(spec))
    return image_transform_v2(cfg, is_train=augment == "crop", aug_cfg=AugmentationCfg(scale=(0.9, 1.0)))


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, image->text accuracy, text->image accuracy) for L2-normalised features of one batch.

    Targets are uniform over the captions equal to the row's own (the identity matrix when all differ).
    """
    ids = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=image_features.device)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    logits = logit_scale * image_features @ text_features.t()
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    with torch.no_grad():
        rows = torch.arange(len(captions), device=logits.device)
        acc_i = same[rows, logits.argmax(dim=1)].mean()
        acc_t = same[rows, logits.argmax(dim=0)].mean()
    return (loss_i + loss_t) / 2, acc_i, acc_t


class ClipTask:
    """A `TrainTask` (see train_common) for open_clip models."""

    name = "clip"

    def __init__(self, spec: ClipSpec, augment: str = "crop", export_precision: str = "fp32",
                 storage_options: dict | None = None, settings: dict | None = None) -> None:
        if export_precision not in EXPORT_PRECISIONS:
            raise ValueError(f"export precision must be one of {EXPORT_PRECISIONS}")
        # seed, weights and device exactly as every other job loads this model; then back to training mode
        clip = load_clip(spec.replace(precision="fp32"), storage_options)
        self.spec = spec
        self.model = clip.model
        self.tokenizer = clip.tokenizer
        self.device = clip.device
        self.preprocess = build_train_preprocess(spec, augment)
        self.export_precision = export_precision
        self.settings = dict(settings or {})
        self._tokens: dict[str, torch.Tensor] = {}
        self.model.requires_grad_(True)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only (not on gains, biases, embeddings of positions or the temperature),
        as open_clip's own training does."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if skip else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def tokens(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing:
            for caption, row in zip(missing, self.tokenizer(missing), strict=True):
                self._tokens[caption] = row
        return torch.stack([self._tokens[c] for c in captions]).to(self.device)

    def step(self, images: list, captions: list[str | None]) -> tuple[torch.Tensor, dict[str, float]]:
        pairs = [(image, caption) for image, caption in zip(images, captions, strict=True) if caption]
        pixels = torch.stack([self.preprocess(image) for image, _ in pairs]).to(self.device)
        texts = [caption for _, caption in pairs]
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        image_features = F.normalize(self.model.encode_image(pixels), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokens(texts)), dim=-1)
        scale = self.model.logit_scale.exp()
        loss, acc_i, acc_t = contrastive_loss(image_features, text_features, scale, texts)
        return loss, {"acc_i2t": float(acc_i), "acc_t2i": float(acc_t), "temperature": float(1.0 / scale.detach())}

    def export(self, output: str, storage_options: dict | None) -> list[str]:
        """OUT/{model}.pt (open_clip checkpoint, `--pretrained` loads it) and OUT/{model}.json (its config)."""
        import open_clip

        from clipbeam.models.train_common import save_torch

        state = self.model.state_dict()
        if self.export_precision == "fp16":
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        model_cfg = open_clip.get_model_config(self.spec.model)
        weights_url = join(output, f"{self.spec.model}.pt")
        config_url = join(output, f"{self.spec.model}.json")
        save_torch({"state_dict": state, "model": self.spec.model, "model_cfg": model_cfg,
                    "clipbeam_version": __version__}, weights_url, storage_options)
        with atomic_open(config_url, "wb", storage_options) as handle:
            handle.write(json.dumps(model_cfg, indent=4).encode("utf-8"))
        return [weights_url, config_url]
