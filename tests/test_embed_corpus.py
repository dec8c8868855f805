"""EmbedCorpus on its own: a TestPipeline, a frozen config, assert_that on the done-markers it emits."""

from __future__ import annotations

import os

import apache_beam as beam
import imagefactory as imgs
import pyarrow.parquet as pq
import webdataset as wds
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from clipbeam.corpus.plan import plan_parts
from clipbeam.layout import UnitLedger
from clipbeam.layout.embeddings import MARKERS
from clipbeam.models.clip import ClipSpec, embedding_dim, preprocess_config, validate_spec
from clipbeam.transforms.embed_corpus import EmbedCorpus, EmbedCorpusConfig
from clipbeam.transforms.embed_write import PartInfo


def _shard(path: str, seed: int, corrupt: str | None = None) -> None:
    with wds.TarWriter(path) as sink:
        for i in range(3):
            key = f"s{seed}k{i}"
            data = b"not an image" if key == corrupt else imgs.jpeg(seed * 10 + i)
            sink.write({"__key__": key, "jpg": data, "txt": f"caption {i}"})


def test_embed_corpus_writes_each_part_and_emits_its_marker(tmp_path):
    _shard(str(tmp_path / "a.tar"), 1)
    _shard(str(tmp_path / "b.tar"), 2, corrupt="s2k1")
    parts = plan_parts([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])
    numbered = [(0, parts[0]), (7, parts[1])]  # numbers need not follow positions
    spec = ClipSpec(model="clipbeam-tiny", pretrained="none", seed=0, device="cpu", precision="fp32")
    validate_spec(spec)
    out = str(tmp_path / "out")
    config = EmbedCorpusConfig(
        ledger=UnitLedger(out, MARKERS), spec=spec, dim=embedding_dim(spec), preprocess=preprocess_config(spec),
        parts={n: PartInfo(p.source, p.fingerprint) for n, p in numbered}, batch_size=2, dtype="float32")

    def counts(marker: dict) -> tuple:
        return marker["part"], marker["samples"], marker["rows"], marker["failed_by_stage"], marker["files"]

    with BeamTestPipeline() as pipeline:
        markers = pipeline | beam.Create(numbered) | EmbedCorpus(config)
        assert_that(markers | "Counts" >> beam.Map(counts), equal_to([
            (0, 3, 3, {}, ["embeddings/part-00000.parquet"]),
            (7, 3, 2, {"decode": 1}, ["embeddings/part-00007.parquet", "failures/part-00007.parquet"]),
        ]))
    table = pq.read_table(os.path.join(out, "embeddings", "part-00007.parquet"))
    assert table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    assert len(table.column("image_embedding")[0]) == config.dim
    assert sorted(os.listdir(os.path.join(out, MARKERS))) == ["part-00000.json", "part-00007.json"]
    assert not os.path.exists(os.path.join(out, "_fragments", "part-00000"))
