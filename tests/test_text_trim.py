"""Captions encoded without their padding equal open_clip's own encode_text, for every text-tower kind.

Each case is a real open_clip config, shrunk to a tiny random-weight model of
the same class and text-tower settings (pooling, causal mask, class token), so
that building it costs nothing and nothing is downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clipbeam.models.clip import ClipSpec, LoadedClip, encode_texts, load_clip
from clipbeam.models.text_trim import MIN_GROUP, length_groups, trimmable_tower

CAPTIONS = [
    "", "image", "a red circle", "a photo of a dog running on the beach at sunset with a frisbee",
    " ".join(["very long caption"] * 40),  # longer than the context: truncated, EOT at the last position
    "Product: Stainless steel water bottle, 750 ml, vacuum insulated, keeps drinks cold 24 h",
] + [" ".join(f"word{j}" for j in range(i % 23 + 1)) for i in range(40)]

# config name -> whether the padding can be dropped exactly (None: skipped, with the reason)
CASES = {
    "ViT-B-32": True,              # CLIP, causal, EOT (argmax) pooling
    "RN50": True,                  # CLIP with a ResNet image tower: same text tower
    "EVA02-B-16": True,            # CustomTextCLIP, causal, argmax
    "ViT-H-14-worldwide": True,    # CLIP, causal, EOS-token pooling (hub tokenizer replaced, see _tiny)
    "MobileCLIP-S1": False,        # CustomTextCLIP, bidirectional
    "ViT-B-16-SigLIP": False,      # CustomTextCLIP, `last` pooling, bidirectional
    "ViT-L-14-CLIPA": False,       # CLIP, `last` pooling, bidirectional
    "coca_ViT-B-32": False,        # CoCa: the class token is appended after the padding
    "mt5-base-ViT-B-32": "Hugging Face text tower: needs the hub's model config and tokenizer",
    "nllb-clip-base-siglip": "Hugging Face text tower: needs the hub's model config and tokenizer",
}


def _tiny(name: str):
    """The config's model class and text settings at width 64, 2 layers; a tiny ViT image tower."""
    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    text = cfg["text_cfg"]
    text.update(width=64, heads=2, layers=2)
    if "hf_tokenizer_name" in text:  # a hub tokenizer: use open_clip's BPE, and pool at its EOT id
        del text["hf_tokenizer_name"]
        text.pop("tokenizer_kwargs", None)
        text.update(vocab_size=49408, eos_id=49407)
    cfg["vision_cfg"] = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    cfg["embed_dim"] = 48
    torch.manual_seed(0)
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(width=64, heads=2, layers=1)
        model = open_clip.CoCa(**cfg)
    elif custom_text:
        model = open_clip.CustomTextCLIP(**cfg)
    else:
        model = open_clip.CLIP(**cfg)
    return model.eval(), open_clip.get_tokenizer("ViT-B-32", context_length=text.get("context_length", 77))


@pytest.mark.parametrize("name", list(CASES))
def test_trimmed_text_equals_open_clip(name):
    expected = CASES[name]
    if isinstance(expected, str):
        pytest.skip(expected)
    model, tokenizer = _tiny(name)
    tower = trimmable_tower(model)
    assert (tower is not None) == expected
    clip = LoadedClip(ClipSpec(name), model, None, tokenizer, "cpu", 48, 32, 77, "random", text_tower=tower)
    ours = encode_texts(clip, CAPTIONS)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model.encode_text(tokenizer(CAPTIONS)).float(), dim=-1).numpy()
    cosines = (ours * reference).sum(axis=1)
    assert cosines.min() >= 0.9999, (name, cosines.min())
    assert not np.allclose(reference[2], reference[3])  # the model does tell captions apart


def test_shipped_and_test_models_are_trimmed_and_exact():
    for spec in (ClipSpec("clipbeam-tiny"), ClipSpec("shapes-clip", "shapes")):
        clip = load_clip(spec)
        assert clip.text_tower is not None
        trimmed, full = encode_texts(clip, CAPTIONS), encode_texts(clip, CAPTIONS, trim=False)
        assert (trimmed * full).sum(axis=1).min() >= 0.9999


def test_length_groups_sort_and_cover_every_caption():
    lengths = np.array([5, 77, 3, 9, 9, 2] * 11)
    groups = length_groups(lengths)
    assert 1 < len(groups) <= 4 and all(len(g) >= MIN_GROUP for g in groups)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(groups, groups[1:], strict=False))
    assert len(length_groups(np.array([4, 2, 7]))) == 1
