"""Encoding captions without the padding: exact, and several times faster on short captions.

open_clip always runs the text tower over the full context (77 tokens), but a
caption of 15 words is about 19 tokens. Where the tower is causal (position p
attends only to positions <= p) and pools at the EOT token (`argmax`), at a
tokenizer's EOS (`eos`) or at the first token (`first`), no position after the
pooled one can reach the output, so running the tower on the prefix up to the
longest caption of a batch gives the same embedding (up to float rounding).
Everywhere else (SigLIP-style `last` pooling, bidirectional towers, CoCa's
appended class token, Hugging Face towers) `trimmable_tower` says no and the
caller encodes at the full context.

Captions are also sorted by token length and encoded in a few groups, so that
each group pads only to its own longest caption; results return in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TRIMMABLE_POOLING = ("argmax", "eos", "first")
MAX_GROUPS = 4  # sorted captions are encoded in at most this many groups ...
MIN_GROUP = 16  # ... of at least this many captions (small groups waste the matmuls)


@dataclass(frozen=True)
class TextTower:
    """The modules of a causal open_clip text tower, wherever the model class keeps them."""

    token_embedding: Any
    positional_embedding: Any
    transformer: Any
    attn_mask: Any
    ln_final: Any
    text_projection: Any
    pool_type: str
    eos_id: int | None


def trimmable_tower(model) -> TextTower | None:
    """The model's text tower if running it on a prefix of the context is exact, else None."""
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):  # the built-in tower's modules live on the model itself
        owner, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):  # CustomTextCLIP, CoCa
        owner = model.text
        if owner.cls_emb is not None or owner.use_pad_mask:  # CoCa's class token sits after the padding
            return None
        pool_type, eos_id = owner.pool_type, owner.eos_id
    else:  # Hugging Face and other towers
        return None
    if owner.attn_mask is None or pool_type not in TRIMMABLE_POOLING:
        return None
    return TextTower(owner.token_embedding, owner.positional_embedding, owner.transformer, owner.attn_mask,
                     owner.ln_final, owner.text_projection, pool_type, eos_id)


def needed_lengths(tower: TextTower, tokens) -> np.ndarray:
    """Per caption, how many leading positions the pooled output depends on."""
    if tower.pool_type == "first":
        return np.ones(tokens.shape[0], dtype=np.int64)
    if tower.pool_type == "argmax":  # the EOT token has the highest id
        pooled_at = tokens.argmax(dim=-1)
    else:
        pooled_at = (tokens == tower.eos_id).int().argmax(dim=-1)
    return pooled_at.cpu().numpy().astype(np.int64) + 1


def encode_prefix(tower: TextTower, tokens):
    """open_clip's encode_text, on tokens cut to any length (positions and causal mask cut to match)."""
    import torch
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def length_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices sorted by length, cut into at most MAX_GROUPS groups of at least MIN_GROUP."""
    order = np.argsort(lengths, kind="stable")
    groups = max(1, min(MAX_GROUPS, len(order) // MIN_GROUP))
    return [chunk for chunk in np.array_split(order, groups) if len(chunk)]


def encode_trimmed(tower: TextTower, tokens):
    """Token ids [N, context] -> text features [N, D] in input order, each group cut to its longest caption."""
    import torch

    lengths = needed_lengths(tower, tokens)
    out = None
    for group in length_groups(lengths):
        index = torch.from_numpy(group).to(tokens.device)
        features = encode_prefix(tower, tokens[index, :int(lengths[group].max())])
        if out is None:
            out = features.new_empty((tokens.shape[0], features.shape[-1]))
        out[index] = features
    return out
