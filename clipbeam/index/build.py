"""The steps of `clipbeam index`, as plain functions: sample and train once, fill each shard, tune on all.

The command runs them in its own process when no Beam option is given (one
machine builds the shards one after the other anyway, so Beam's start-up and
the pickling of the plan buy nothing), and as the Beam pipeline of
transforms/index_shards.py otherwise (a cluster builds shards in parallel).
Both run these same functions, so both build the same index.

Sample training and held-out query vectors -> train one index (or reuse the
trained one: --append, or a rerun after training finished) -> every shard
starts from a copy of the trained empty index and streams its rows in with
global ids, reading the next batch while the current one is added, and
computing the exact neighbours of the held-out queries among its rows on the
way -> shard-NNNNN.faiss + shard-NNNNN.ids.parquet, then a done-marker ->
tuning finds the nprobe/efSearch that reaches the target recall@10 on all
shards together. Work files (queries, per-shard ground truth, training info,
the tuning result) live under OUT/_work/ until the command commits. Every
step times its stages (`Stages`) for the command's summary.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.index import manifest as index_layout
from clipbeam.index.faiss_io import make_index, read_index, train_index, write_index
from clipbeam.index.plan import SampleRead, ShardPlan
from clipbeam.index.sample import READ_THREADS, read_sample
from clipbeam.index.topk import ExactTopK, merge_topk
from clipbeam.index.tune import tune
from clipbeam.layout import UnitLedger
from clipbeam.layout.embeddings.read import StoredVectors, iter_batches, read_vectors
from clipbeam.layout.index import WORK

LOG = logging.getLogger(__name__)
RECALL_K = 10
# The stages of a build, in the order the summary shows them ("recall": the exact search that measures it).
STAGES = ("planning", "sampling", "training", "reading", "adding", "recall", "tuning", "writing")
Item = TypeVar("Item")


class Stages:
    """Wall seconds per named stage, summed over every time the stage runs."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.add(seconds or {})

    @contextlib.contextmanager
    def timing(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add({name: time.perf_counter() - start})

    def add(self, seconds: dict[str, float]) -> None:
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(value)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}


@dataclass(frozen=True)
class IndexConfig:
    """Everything the build steps need, decided and checked before they start.

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
    preload: bool = False  # in-process: read each file's vectors once and keep them (they fit the budget)
    exclude: frozenset[str] = frozenset()  # ids left out of every shard (`--exclude` of a dedup output)

    def url(self, *parts: str) -> str:
        return storage.join(self.output, *parts)


@dataclass(frozen=True)
class BuiltShard:
    """A finished shard, as its done-marker and index.json record it (`stages`: this build's timings)."""

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
    stages: dict = field(default_factory=dict)


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


def sample_and_train(config: IndexConfig, stored: dict[str, StoredVectors] | None = None) -> dict:
    """Read the sample here (not through a Beam shuffle), train once (or reuse --append's quantizer).

    Stores the trained empty index, the held-out queries and the training info (with its stage
    seconds under "stage_seconds", which index.json leaves out) under the output.
    """
    stages = Stages()
    with stages.timing("sampling"):
        sample = read_sample(config.sample, config.column, config.dim, config.batch_rows, config.storage_options,
                             stored)
    if config.previous is not None:
        info = dict(config.previous.get("train", {}))
    else:
        index = make_index(config.factory, config.dim, config.metric)
        with stages.timing("training"):
            info = train_index(index, sample.train)
        with stages.timing("writing"):
            info["index_sha256"] = write_index(index, config.url(index_layout.TRAINED_INDEX),
                                               config.storage_options).sha256
    with stages.timing("writing"):
        save_npz(config.url(WORK, "queries.npz"), config.storage_options, ids=sample.query_ids,
                 vectors=sample.queries)
        storage.write_json(config.url(WORK, "train.json"), {**info, "stage_seconds": stages.rounded()},
                           config.storage_options)
    return info


def prefetched(items: Iterator[Item], depth: int = 1) -> Iterator[Item]:
    """`items`, produced `depth` ahead on a thread: reading (Parquet decoding releases the GIL) overlaps
    with what the caller does with the previous item. An error in `items` is raised here, in order."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put((done, exc))

    thread = threading.Thread(target=produce, name="clipbeam-index-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _write_ids(plan: ShardPlan, config: IndexConfig, index: faiss.Index, exact: ExactTopK, stages: Stages,
               stored: dict[str, StoredVectors]) -> tuple[int, str]:
    """Stream the shard's rows into `index`, `exact` and its id table: (null vectors skipped, the id
    table's SHA-256, hashed as it is written rather than read back)."""
    skipped = 0
    url = config.url(index_layout.shard_ids_name(plan.number))
    with storage.atomic_open(url, "wb", config.storage_options) as handle, contextlib.ExitStack() as stack:
        batches = stack.enter_context(contextlib.closing(prefetched(batch for piece in plan.pieces for batch in (
            iter_batches(piece.file, config.column, config.id_column, list(config.metadata_columns), config.dim,
                         piece.row_start, piece.row_end, config.batch_rows, config.storage_options,
                         config.exclude, stored.get(piece.file.url))))))  # closed on error too: the thread stops
        hashing = storage.HashingWriter(handle)
        writer = None
        while True:
            with stages.timing("reading"):  # only the wait: reading the next batch overlaps with adding this one
                batch = next(batches, None)
            if batch is None:
                break
            with stages.timing("adding"):
                index.add_with_ids(batch.vectors, batch.ids)
            with stages.timing("recall"):
                exact.add(batch.vectors, batch.ids)
            skipped += batch.skipped
            with stages.timing("writing"):
                table = batch.metadata.add_column(0, "faiss_id", pa.array(batch.ids, pa.int64()))
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(hashing, table.schema))
                writer.write_table(table)
        if writer is None:
            raise RuntimeError(f"shard {plan.number} read no rows")
        writer.close()  # the footer, hashed too
    return skipped, hashing.hexdigest()


class ShardBuilder:
    """Fills copies of the trained empty index with shards' rows (the trained index and the queries are
    read once per builder, so once per Beam worker). `stored`: files' vectors read before (in-process)."""

    def __init__(self, config: IndexConfig, stored: dict[str, StoredVectors] | None = None) -> None:
        self.config = config
        self.stored = stored or {}
        self._trained: np.ndarray | None = None
        self._queries: dict | None = None

    def build(self, plan: ShardPlan) -> BuiltShard:
        config = self.config
        started = time.monotonic()
        stages = Stages()
        if self._trained is None:
            with stages.timing("reading"):
                trained = read_index(config.url(index_layout.TRAINED_INDEX), config.storage_options, mmap=False)
                self._trained = faiss.serialize_index(trained)
                self._queries = load_npz(config.url(WORK, "queries.npz"), config.storage_options)
        index = faiss.deserialize_index(self._trained)
        exact = ExactTopK(self._queries["vectors"], RECALL_K + 1, config.metric)
        skipped, ids_sha256 = _write_ids(plan, config, index, exact, stages, self.stored)
        ids_name = index_layout.shard_ids_name(plan.number)
        with stages.timing("writing"):
            written = write_index(index, config.url(index_layout.shard_index_name(plan.number)),
                                  config.storage_options)
            save_npz(config.url(WORK, f"{shard_unit(plan.number)}.gt.npz"), config.storage_options,
                     scores=exact.scores, ids=exact.ids)
        shard = BuiltShard(plan.number, index_layout.shard_index_name(plan.number), ids_name, int(index.ntotal),
                           plan.id_start, plan.id_end, written.bytes, skipped, round(time.monotonic() - started, 3),
                           written.sha256, ids_sha256, stages.rounded())
        if config.ledger is not None:
            config.ledger.mark_done(shard_unit(plan.number), asdict(shard), files=[shard.index, shard.ids])
        LOG.info("shard %d: %d vectors in %.1fs", plan.number, index.ntotal, shard.seconds)
        return shard


def tune_shards(shards: list[BuiltShard], config: IndexConfig) -> dict:
    """Tune nprobe/efSearch on this run's shards; the result goes to OUT/_work/tuned.json for the commit."""
    stages = Stages()
    shards = sorted(shards, key=lambda s: s.number)
    storage_options = config.storage_options
    with stages.timing("recall"):
        queries = load_npz(config.url(WORK, "queries.npz"), storage_options)
        truths = [load_npz(config.url(WORK, f"{shard_unit(s.number)}.gt.npz"), storage_options) for s in shards]
        _, truth_ids = merge_topk([t["scores"] for t in truths], [t["ids"] for t in truths], RECALL_K + 1,
                                  config.metric)
    with stages.timing("tuning"):
        indexes = [read_index(config.url(s.index), storage_options, expected_bytes=s.bytes) for s in shards]
        tuned = tune(indexes, config.metric, queries["vectors"], queries["ids"], truth_ids, RECALL_K,
                     config.target_recall)
    result = {"search_params": tuned.params, "recall_at_10": tuned.recall,
              "queries_per_second": tuned.queries_per_second, "target_reached": tuned.target_reached,
              "queries": int(len(queries["ids"])), "measured_on_shards": [s.number for s in shards],
              "curve": tuned.curve, "stage_seconds": stages.rounded()}
    storage.write_json(config.url(WORK, "tuned.json"), result, storage_options)
    return result


def read_all_vectors(config: IndexConfig, plans: list[ShardPlan], sample: bool) -> dict[str, StoredVectors]:
    """Every file's vectors that the pending shards (and the sample) need, each file decoded once."""
    files = {piece.file.url: piece.file for plan in plans for piece in plan.pieces}
    if sample:
        files.update({read.file.url: read.file for read in config.sample})
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(files)))) as pool:
        loaded = pool.map(lambda f: read_vectors(f, config.column, config.dim, config.storage_options),
                          files.values())
        return dict(zip(files, loaded, strict=True))


def build_in_process(config: IndexConfig, pending: list[ShardPlan], built: list[BuiltShard],
                     trained: bool, stages: Stages | None = None) -> dict:
    """The whole build in this process, shard after shard (what the DirectRunner does with one worker);
    returns the tuning result. `trained`: an earlier run of the same plan already trained. `stages` gets
    the time spent outside the steps (which record theirs in the work files).

    With `config.preload` each file's vectors are decoded once, for the sample and the shards together
    (the Beam path decodes the sampled row groups a second time, on another worker).
    """
    stored = None
    if config.preload:
        with (stages or Stages()).timing("reading"):
            stored = read_all_vectors(config, pending, not trained)
    if not trained:
        sample_and_train(config, stored)
    builder = ShardBuilder(config, stored)
    shards = [builder.build(plan) for plan in pending]
    del stored, builder  # the vectors go before tuning reads the shards back
    return tune_shards(shards + list(built), config)
