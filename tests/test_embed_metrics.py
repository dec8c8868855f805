"""Embed's per-batch bookkeeping: captions tokenised once per list, failures counted under their stage,
a retried batch's metrics counted once (real DoFns, the real tiny model, Beam metrics from real runs)."""

from __future__ import annotations

import apache_beam as beam
import imagefactory as imgs
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to

from clipbeam.models.clip import ClipSpec, load_tokenizer, preprocess_config, tokenize_texts
from clipbeam.models.images import DEFAULT_MAX_PIXELS
from clipbeam.transforms.clip_handler import NAMESPACE, ClipModelHandler
from clipbeam.transforms.embed_dofns import DecodeDoFn
from clipbeam.transforms.embed_write import SplitResultsDoFn

SPEC = ClipSpec("clipbeam-tiny")


class CountingTokenizer:
    """The real tokenizer, recording how many texts each call got."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __call__(self, texts):
        self.calls.append(len(texts))
        return self.inner(texts)


def counters(result) -> dict[str, int]:
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in found:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(counter.committed or 0)
    return totals


def test_captions_are_tokenised_in_one_call_per_list():
    decode = DecodeDoFn(preprocess_config(SPEC), DEFAULT_MAX_PIXELS, True, batch_size=4, spec=SPEC)
    decode.setup()
    decode._tokenizer = spy = CountingTokenizer(decode._tokenizer)
    captions = [f"caption number {i}" + " word" * i for i in range(8)]
    samples = [{"image": imgs.jpeg(i), "caption": c.encode(), "part": 0, "id": f"s{i}", "source": "x"}
               for i, c in enumerate(captions)]
    decode.start_bundle()
    out = [*decode.process(samples), *decode.finish_bundle()]
    decode.teardown()
    batches = [o.value for o in out]
    assert [len(b) for b in batches] == [4, 4] and spy.calls == [4, 4]
    expected = tokenize_texts(load_tokenizer(SPEC), captions)
    assert np.array_equal(np.stack([s["tokens"] for b in batches for s in b]), expected)


def test_a_gpu_decode_failure_counts_as_decode_not_embed(tmp_path):
    sample = {"part": 0, "id": "a", "source": "x"}
    failed = PredictionResult([sample], [{"error": "not a JPEG", "stage": "decode"}], "m")
    pipeline = beam.Pipeline("DirectRunner")
    _ = (pipeline | beam.Create([failed])
         | beam.ParDo(SplitResultsDoFn(str(tmp_path), 4, "float32", None)).with_outputs("failures", main="rows"))
    result = pipeline.run()
    result.wait_until_finish()
    totals = counters(result)
    assert totals.get("failed_decode") == 1 and not totals.get("failed_embed"), totals


def test_a_batch_retried_one_by_one_counts_its_metrics_once():
    """The batch fails on its captions after its JPEG fell back to the CPU path; the retry counts that
    fallback once (it used to count the failed attempt's too)."""
    size = preprocess_config(SPEC)["size"]
    tokens = tokenize_texts(load_tokenizer(SPEC), ["a red circle"])[0]
    junk_jpeg = {"jpeg": b"\xff\xd8\xff\xe0 not really a JPEG", "embed_text": True, "caption": "a red circle",
                 "tokens": tokens}
    out_of_vocabulary = tokens.copy()
    out_of_vocabulary[1] = 10_000_000
    bad_tokens = {"pixels": np.zeros((3, size, size), np.uint8), "embed_text": True, "caption": "unknown",
                  "tokens": out_of_vocabulary}
    pipeline = beam.Pipeline("DirectRunner")
    stages = (pipeline | beam.Create([[junk_jpeg, bad_tokens]]) | RunInference(ClipModelHandler(SPEC))
              | beam.Map(lambda r: [o.get("stage", "embed") if "error" in o else "ok" for o in r.inference]))
    assert_that(stages, equal_to([["decode", "embed"]]))
    result = pipeline.run()
    result.wait_until_finish()
    assert counters(result).get("gpu_decode_fallbacks") == 1, counters(result)
