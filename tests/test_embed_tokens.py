"""Captions tokenised where the images are decoded (DecodeDoFn) embed exactly as `encode_texts` does,
and a batch of images reaches the model's device in one copy."""

from __future__ import annotations

import pickle

import apache_beam as beam
import imagefactory as imgs
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from clipbeam.models.clip import ClipSpec, encode_texts, load_clip, load_tokenizer, preprocess_config, tokenize_texts
from clipbeam.models.embedder import ClipEmbedder
from clipbeam.models.pixels import PixelRecipe, device_pixels, to_device
from clipbeam.transforms.clip_handler import ClipModelHandler
from clipbeam.transforms.embed_dofns import DecodeDoFn

SPEC = ClipSpec("clipbeam-tiny")
CAPTIONS = ["image", "a red cube on a blue floor", "image",
            "a very long caption " + "with many repeated words " * 30 + "past the context",
            "ünïcödé &amp; ftfy-fixed â€™ text"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(SPEC)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_tokenizer_loaded_without_the_model_gives_the_models_ids(clip):
    tokens = tokenize_texts(load_tokenizer(SPEC), CAPTIONS)
    assert tokens.dtype == np.int32 and tokens.shape == (len(CAPTIONS), clip.context_length)
    assert np.array_equal(tokens, clip.tokenizer(CAPTIONS).numpy())


@pytest.mark.parametrize("trim", [True, False])
def test_embeddings_from_tokens_equal_encode_texts(clip, trim):
    embedder = ClipEmbedder(clip, PixelRecipe(preprocess_config(SPEC), 10**8), trim_text=trim)
    rows = list(tokenize_texts(load_tokenizer(SPEC), CAPTIONS))  # one row per sample, as DecodeDoFn attaches
    assert cosines(embedder.embed_tokens(np.stack(rows)), encode_texts(clip, CAPTIONS)).min() >= 0.9999


def decoded_samples(tmp_path, embed_text: bool, spec: ClipSpec | None) -> list[dict]:
    """Raw samples through DecodeDoFn in a real (DirectRunner) pipeline, kept as pickles in tmp_path."""
    raw = [{"id": str(i), "part": 0, "source": "mem", "image": imgs.jpeg(i), "caption": caption.encode()}
           for i, caption in enumerate(CAPTIONS)]
    out = tmp_path / f"decoded-{embed_text}-{spec is not None}"
    out.mkdir()

    def keep(samples: list[dict]) -> None:
        for sample in samples:
            (out / f"{int(sample['id']):03d}.pkl").write_bytes(pickle.dumps(sample))

    with BeamTestPipeline() as pipeline:
        decoded = (pipeline | beam.Create([raw[:2], raw[2:]])  # lists of samples, as ReadPartDoFn makes them
                   | beam.ParDo(DecodeDoFn(preprocess_config(SPEC), 10**8, embed_text, batch_size=3, spec=spec))
                   .with_outputs("failures", main="decoded"))
        decoded.decoded | beam.Map(keep)
    return [pickle.loads(path.read_bytes()) for path in sorted(out.iterdir())]


def test_decode_dofn_attaches_token_ids_and_the_handler_embeds_from_them(clip, tmp_path):
    tokenized, plain = decoded_samples(tmp_path, True, SPEC), decoded_samples(tmp_path, True, None)
    assert [s["caption"] for s in tokenized] == CAPTIONS
    assert np.array_equal(np.stack([s["tokens"] for s in tokenized]), tokenize_texts(clip.tokenizer, CAPTIONS))
    assert all("tokens" not in s for s in plain + decoded_samples(tmp_path, False, SPEC))
    handler = ClipModelHandler(SPEC)
    model = handler.load_model()
    for samples in (tokenized, plain):  # from tokens, and from text where a sample has none
        (result,) = handler.run_inference([samples], model)  # one list of samples, one model batch
        assert result.example is samples and len(result.inference) == len(samples)
        texts = np.stack([output["text"] for output in result.inference])
        assert cosines(texts, encode_texts(clip, CAPTIONS)).min() >= 0.9999


def test_pixels_reach_the_device_in_one_batch_in_order(clip):
    recipe = PixelRecipe(preprocess_config(SPEC), 10**8)
    arrays = [np.full((3, 64, 64), i, dtype=np.uint8) for i in range(5)]
    batch = to_device(arrays, "cpu")
    assert batch.dtype == torch.uint8 and torch.equal(batch, torch.from_numpy(np.stack(arrays)))
    mixed = device_pixels([arrays[0], imgs.jpeg(1), arrays[2], b"not an image"], recipe, "cpu")
    assert torch.equal(mixed.pixels[0], batch[0]) and torch.equal(mixed.pixels[2], batch[2])
    assert list(mixed.failed) == [3] and mixed.fallbacks == 1 and not mixed.pixels[3].any()
    assert mixed.pixels[1].float().mean() > 0


def test_order_by_caption_length_sorts_each_window_and_loses_nothing():
    """Lists of samples leave cut to the batch size, sorted by token count within each window of 4 (and
    the rest at the bundle's end); samples without tokens (no caption, --no-text) count as length 0; none is
    dropped or repeated."""
    from apache_beam.utils.windowed_value import WindowedValue

    from clipbeam.transforms.embed_dofns import OrderByCaptionLength

    lengths = [9, 3, 7, 1, 0, 5, 2, 8, 4, 6]
    samples = [{"id": str(i), "tokens": np.array([1] * n + [0] * (12 - n), dtype=np.int32) if n else None}
               for i, n in enumerate(lengths)]
    dofn = OrderByCaptionLength(window=4, batch_size=3)
    dofn.start_bundle()
    released = []
    for batch in (samples[:3], samples[3:6], samples[6:9], samples[9:]):
        released += list(dofn.process(batch))
    released += list(dofn.finish_bundle())
    assert all(isinstance(value, WindowedValue) for value in released)
    batches = [[lengths[int(s["id"])] for s in value.value] for value in released]
    assert batches == [[0, 1, 3], [5, 7, 9], [2, 4, 6], [8]]
    assert sorted(s["id"] for value in released for s in value.value) == sorted(s["id"] for s in samples)
