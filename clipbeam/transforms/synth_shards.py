"""Writing the synthetic shapes corpus as webdataset tar shards, one shard per work item (`WriteShards`).

Shard i holds samples [i*K, min((i+1)*K, N)) as KEY.png, KEY.txt (caption)
and KEY.json (class, sample seed, geometry). Tars are written with fixed
member metadata (mtime 0, uid/gid 0, mode 0644) so the same seed gives
byte-identical shards, and atomically, so a shard that exists is complete.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass

import apache_beam as beam

from clipbeam.models.shapes import corpus_sample, render
from clipbeam.storage import atomic_open, join

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}.tar"


def plan_shards(n: int, shard_size: int) -> list[ShardSpec]:
    """Cut N samples into shards of at most shard_size, numbered from 0."""
    return [ShardSpec(i, start, min(start + shard_size, n)) for i, start in enumerate(range(0, n, shard_size))]


def sample_key(index: int) -> str:
    return f"{index:08d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(spec: ShardSpec, corpus_seed: int) -> bytes:
    """The tar of one shard, in memory (a 1,000-sample shard is about 8 MB)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(spec.start, spec.stop):
            sample = corpus_sample(corpus_seed, index)
            png = io.BytesIO()
            render(sample).save(png, format="PNG", optimize=False, compress_level=6)
            key = sample_key(index)
            meta = dict(sample.metadata(), index=index, caption=sample.caption)
            _add(tar, f"{key}.png", png.getvalue())
            _add(tar, f"{key}.txt", sample.caption.encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    return buffer.getvalue()


def write_shard(output: str, spec: ShardSpec, corpus_seed: int, storage_options: dict | None = None) -> str:
    """Write one shard under output/ atomically; returns its URL."""
    url = join(output, spec.name)
    data = shard_bytes(spec, corpus_seed)
    with atomic_open(url, "wb", storage_options) as handle:
        handle.write(data)
    return url


class _WriteShardDoFn(beam.DoFn):
    def __init__(self, output: str, seed: int, storage_options: dict) -> None:
        self.output = output
        self.seed = seed
        self.storage_options = storage_options

    def process(self, spec: ShardSpec):
        url = write_shard(self.output, spec, self.seed, self.storage_options)
        LOG.info("wrote %s (%d samples)", url, spec.stop - spec.start)
        yield spec.name


class WriteShards(beam.PTransform):
    """ShardSpecs -> the names of the shards written: each drawn and written by one worker."""

    def __init__(self, output: str, seed: int, storage_options: dict) -> None:
        super().__init__()
        self.output = output
        self.seed = seed
        self.storage_options = storage_options

    def expand(self, specs):
        return (specs
                | "Spread" >> beam.Reshuffle()
                | "Write" >> beam.ParDo(_WriteShardDoFn(self.output, self.seed, self.storage_options)))
