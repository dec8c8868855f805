"""Which CLIP encodes queries and labels: the one that made the stored embeddings.

Search and classify compare new text or image vectors with stored ones, which
only means something when both come from the same model and weights. So the
model, pretrained weights and seed default to those recorded in the
embeddings manifest; flags override them (`--pretrained PATH` when the weights
live somewhere else on this machine).
"""

from __future__ import annotations

import argparse

from clipbeam.errors import UsageError
from clipbeam.models.clip import ClipSpec, LoadedClip, load_clip, validate_spec


def add_query_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: the one recorded in the embeddings manifest)")
    group.add_argument("--model", default=None, help="open_clip architecture")
    group.add_argument("--pretrained", default=None, help="pretrained tag, checkpoint path or URL, or 'none'")
    group.add_argument("--seed", type=int, default=None, help="seed for --pretrained none")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    group.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))


def query_spec(args: argparse.Namespace, recorded: dict | None) -> ClipSpec:
    """The flags where given, else the recorded model; UsageError when neither names a model."""
    recorded = recorded or {}
    model = args.model or recorded.get("model")
    if not model:
        raise UsageError("the embeddings record no model: pass --model (and --pretrained)")
    pretrained = args.pretrained or recorded.get("pretrained") or "none"
    seed = args.seed if args.seed is not None else int(recorded.get("seed", 0) or 0)
    return ClipSpec(model=model, pretrained=pretrained, seed=seed, device=args.device, precision=args.precision)


def load_query_model(spec: ClipSpec, dim: int, storage_options: dict) -> LoadedClip:
    """Load the model and check that it produces vectors of the stored dimension."""
    validate_spec(spec, storage_options)
    clip = load_clip(spec, storage_options)
    if clip.dim != dim:
        raise UsageError(f"{spec.model} makes {clip.dim}-dimensional vectors; the stored ones have {dim}")
    return clip
