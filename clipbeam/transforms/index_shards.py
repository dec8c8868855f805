"""The core of `clipbeam index`: sample, train once, build every shard, tune on them.

BuildShards: sample training and held-out query vectors -> train one index
(or reuse the trained one: --append, or a rerun after training finished) ->
hand the trained empty index to every shard -> each shard streams its rows in
with global ids, computing the exact neighbours of the held-out queries among
its rows on the way -> shard-NNNNN.faiss + shard-NNNNN.ids.parquet, then a
done-marker. TuneShards then finds the nprobe/efSearch that reaches the target
recall@10 against exact search and leaves it in OUT/_work/tuned.json for the
command to commit. Work files (queries, per-shard ground truth, the training
info) live under OUT/_work/ until the commit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict, dataclass

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.index import manifest as index_layout
from clipbeam.index.faiss_io import make_index, read_index, train_index, write_index
from clipbeam.index.plan import SampleRead, ShardPlan
from clipbeam.index.sample import read_sample
from clipbeam.index.topk import ExactTopK, merge_topk
from clipbeam.index.tune import tune
from clipbeam.layout import UnitLedger
from clipbeam.layout.embeddings.read import iter_batches
from clipbeam.layout.index import WORK

LOG = logging.getLogger(__name__)
RECALL_K = 10


@dataclass(frozen=True)
class IndexConfig:
    """Everything the pipeline steps need, decided and checked before the pipeline starts.

    `previous` is the index.json being appended to (None for a new index);
    `ledger` marks each finished shard done.
    """

    output: str
    storage_options: dict
    column: str
    id_column: str
    metadata_columns: tuple[str, ...]
    dim: int
    metric: str
    factory: str
    target_recall: float
    batch_rows: int
    shards: tuple[ShardPlan, ...]
    sample: tuple[SampleRead, ...]
    previous: dict | None
    ledger: UnitLedger | None
    exclude: frozenset[str] = frozenset()  # ids left out of every shard (`--exclude` of a dedup output)

    def url(self, *parts: str) -> str:
        return storage.join(self.output, *parts)


@dataclass(frozen=True)
class BuiltShard:
    """A finished shard, as its done-marker and index.json record it."""

    number: int
    index: str
    ids: str
    ntotal: int
    id_start: int
    id_end: int
    bytes: int
    skipped_null: int
    seconds: float
    sha256: str = ""  # of the .faiss file; empty in done-markers of runs before checksums
    ids_sha256: str = ""


def shard_unit(number: int) -> str:
    return f"shard-{number:05d}"


def save_npz(url: str, storage_options: dict, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with storage.atomic_open(url, "wb", storage_options) as handle:
        handle.write(buffer.getvalue())


def load_npz(url: str, storage_options: dict) -> dict[str, np.ndarray]:
    with storage.open_input(url, storage_options) as handle:
        data = np.load(io.BytesIO(handle.read()))
        return {key: data[key] for key in data.files}


def train_once(_, config: IndexConfig) -> dict:
    """Read the sample here (not through a Beam shuffle), train once (or reuse --append's quantizer).

    Stores the trained empty index, the held-out queries and the training info under the output.
    """
    sample = read_sample(config.sample, config.column, config.dim, config.batch_rows, config.storage_options)
    if config.previous is not None:
        info = dict(config.previous.get("train", {}))
    else:
        index = make_index(config.factory, config.dim, config.metric)
        info = train_index(index, sample.train)
        info["index_sha256"] = write_index(index, config.url(index_layout.TRAINED_INDEX),
                                           config.storage_options).sha256
    save_npz(config.url(WORK, "queries.npz"), config.storage_options, ids=sample.query_ids, vectors=sample.queries)
    storage.write_json(config.url(WORK, "train.json"), info, config.storage_options)
    return info


def _write_ids(plan: ShardPlan, config: IndexConfig, index: faiss.Index, exact: ExactTopK) -> tuple[int, str]:
    """Stream the shard's rows into `index`, `exact` and its id table: (null vectors skipped, the id
    table's SHA-256, hashed as it is written rather than read back)."""
    skipped = 0
    url = config.url(index_layout.shard_ids_name(plan.number))
    with storage.atomic_open(url, "wb", config.storage_options) as handle, contextlib.ExitStack() as stack:
        hashing = storage.HashingWriter(handle)
        writer = None
        for piece in plan.pieces:
            for batch in iter_batches(piece.file, config.column, config.id_column, list(config.metadata_columns),
                                      config.dim, piece.row_start, piece.row_end, config.batch_rows,
                                      config.storage_options, config.exclude):
                index.add_with_ids(batch.vectors, batch.ids)
                exact.add(batch.vectors, batch.ids)
                skipped += batch.skipped
                table = batch.metadata.add_column(0, "faiss_id", pa.array(batch.ids, pa.int64()))
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(hashing, table.schema))
                writer.write_table(table)
        if writer is None:
            raise RuntimeError(f"shard {plan.number} read no rows")
        writer.close()  # the footer, hashed too
    return skipped, hashing.hexdigest()


class BuildShard(beam.DoFn):
    """Fill one copy of the trained empty index with a shard's rows; exact neighbours of the queries on the way."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self._trained: np.ndarray | None = None
        self._queries: dict | None = None

    def process(self, plan: ShardPlan, train_info: dict):
        config = self.config
        started = time.monotonic()
        if self._trained is None:
            trained = read_index(config.url(index_layout.TRAINED_INDEX), config.storage_options, mmap=False)
            self._trained = faiss.serialize_index(trained)
            self._queries = load_npz(config.url(WORK, "queries.npz"), config.storage_options)
        index = faiss.deserialize_index(self._trained)
        exact = ExactTopK(self._queries["vectors"], RECALL_K + 1, config.metric)
        skipped, ids_sha256 = _write_ids(plan, config, index, exact)
        written = write_index(index, config.url(index_layout.shard_index_name(plan.number)), config.storage_options)
        save_npz(config.url(WORK, f"{shard_unit(plan.number)}.gt.npz"), config.storage_options,
                 scores=exact.scores, ids=exact.ids)
        shard = BuiltShard(plan.number, index_layout.shard_index_name(plan.number),
                           index_layout.shard_ids_name(plan.number), int(index.ntotal), plan.id_start, plan.id_end,
                           written.bytes, skipped, round(time.monotonic() - started, 3), written.sha256,
                           ids_sha256)
        if config.ledger is not None:
            config.ledger.mark_done(shard_unit(plan.number), asdict(shard), files=[shard.index, shard.ids])
        LOG.info("shard %d: %d vectors in %.1fs", plan.number, index.ntotal, shard.seconds)
        yield shard


class BuildShards(beam.PTransform):
    """PBegin -> PCollection[BuiltShard]: the shards in `pending` built, the `built` ones passed through.

    Training runs unless `trained` says an earlier run of the same plan already
    stored the trained index and the queries.
    """

    def __init__(self, config: IndexConfig, pending: list[ShardPlan], built: list[BuiltShard],
                 trained: bool) -> None:
        super().__init__()
        self.config, self.pending, self.built, self.trained = config, pending, built, trained

    def expand(self, pbegin):
        config = self.config
        if self.trained:
            train_info = pbegin | "TrainedBefore" >> beam.Create(
                [storage.read_json(config.url(WORK, "train.json"), config.storage_options)])
        else:
            train_info = (pbegin
                          | "Start" >> beam.Create([None])
                          | "SampleAndTrain" >> beam.Map(train_once, config))
        fresh = (pbegin
                 | "Shards" >> beam.Create(self.pending)
                 | "Spread" >> beam.Reshuffle()
                 | "Build" >> beam.ParDo(BuildShard(config), beam.pvalue.AsSingleton(train_info)))
        earlier = pbegin | "BuiltBefore" >> beam.Create(self.built)
        return (fresh, earlier) | "AllShards" >> beam.Flatten()


def tune_shards(shards: list[BuiltShard], config: IndexConfig) -> dict:
    """Tune nprobe/efSearch on this run's shards; the result goes to OUT/_work/tuned.json for the commit."""
    shards = sorted(shards, key=lambda s: s.number)
    storage_options = config.storage_options
    queries = load_npz(config.url(WORK, "queries.npz"), storage_options)
    truths = [load_npz(config.url(WORK, f"{shard_unit(s.number)}.gt.npz"), storage_options) for s in shards]
    _, truth_ids = merge_topk([t["scores"] for t in truths], [t["ids"] for t in truths], RECALL_K + 1, config.metric)
    indexes = [read_index(config.url(s.index), storage_options, expected_bytes=s.bytes) for s in shards]
    tuned = tune(indexes, config.metric, queries["vectors"], queries["ids"], truth_ids, RECALL_K,
                 config.target_recall)
    result = {"search_params": tuned.params, "recall_at_10": tuned.recall,
              "queries_per_second": tuned.queries_per_second, "target_reached": tuned.target_reached,
              "queries": int(len(queries["ids"])), "measured_on_shards": [s.number for s in shards],
              "curve": tuned.curve}
    storage.write_json(config.url(WORK, "tuned.json"), result, storage_options)
    return result


class TuneShards(beam.PTransform):
    """PCollection[BuiltShard] -> one tuning result, measured on all of them together."""

    def __init__(self, config: IndexConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, shards):
        return (shards
                | "Gather" >> beam.combiners.ToList()
                | "Tune" >> beam.Map(tune_shards, self.config))
