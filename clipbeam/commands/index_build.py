"""Embeddings -> a sharded FAISS index that states its measured recall (`clipbeam index`).

The Beam pipeline: sample training and held-out query vectors -> train one
index -> hand the trained empty index to every shard -> each shard streams its
rows in and adds them with global ids, while computing the exact neighbours of
the held-out queries among its rows -> shard-NNNNN.faiss and
shard-NNNNN.ids.parquet -> tune nprobe/efSearch until recall@10 against exact
search reaches the target -> index.json, last. Peak memory is the index budget
(one shard's index per worker, at most the whole index) plus the training
sample plus one batch of rows.

Reruns resume: finished shards (recorded under OUT/_work/) are kept, the rest
are rebuilt; `--overwrite` starts over; `--append` adds new embedding parts to
an existing index with its trained quantizer, continuing the global ids.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import __version__, storage
from clipbeam.errors import UsageError
from clipbeam.index import manifest as layout
from clipbeam.index.factory import choose_factory, default_train_sample, format_bytes, parse_memory
from clipbeam.index.faiss_io import METRICS, make_index, read_index, train_index, write_index
from clipbeam.index.inputs import EmbeddingsInput, InputFile, describe, iter_batches, read_rows, resolve_embeddings
from clipbeam.index.plan import ShardPlan, plan_sample, plan_shards, query_count, rows_by_file, shard_count
from clipbeam.index.topk import ExactTopK, merge_topk
from clipbeam.index.tune import tune
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    storage_options_from_args,
)

LOG = logging.getLogger(__name__)
RECALL_K = 10
WORK = "_work"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url,
                        help="embed output folder, or Parquet file(s): a folder, a glob or one file (any fsspec URL)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    parser.add_argument("--column", default="image_embedding", help="vector column (default %(default)s)")
    parser.add_argument("--id-column", default="id", help="id column (default %(default)s)")
    parser.add_argument("--keep-columns", default=None,
                        help="comma-separated columns copied into the shard id tables "
                             "(default: caption,source,source_offset,source_size where present)")
    parser.add_argument("--shards", type=int, default=None, help="number of shards (default 1)")
    parser.add_argument("--shard-size", type=int, default=None, help="rows per shard, instead of --shards")
    parser.add_argument("--index-factory", default="auto", help="auto, or any faiss factory string (default auto)")
    parser.add_argument("--max-index-memory", default="4GB", help="memory budget of the index (default %(default)s)")
    parser.add_argument("--metric", default="ip", choices=sorted(METRICS), help="ip (cosine on normalised vectors) or l2")
    parser.add_argument("--train-sample", type=int, default=None, help="training vectors (default: from the factory)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune for (default %(default)s)")
    parser.add_argument("--tune-queries", type=int, default=1000,
                        help="held-out queries for tuning, at most a tenth of the rows (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training / query sample (default 0)")
    parser.add_argument("--batch-rows", type=int, default=65_536, help="rows read at a time (default %(default)s)")
    parser.add_argument("--append", action="store_true",
                        help="add the embedding parts not yet indexed to the index in --output")


@dataclass(frozen=True)
class IndexJob:
    """Everything the pipeline steps need, decided and checked before the pipeline starts."""

    output: str
    storage_options: dict
    column: str
    id_column: str
    metadata_columns: tuple[str, ...]
    dim: int
    metric: str
    factory: str
    factory_requested: str
    factory_reason: str
    max_memory: int
    target_recall: float
    batch_rows: int
    shards: tuple[ShardPlan, ...]
    sample: tuple[tuple[InputFile, np.ndarray, np.ndarray], ...]
    train_samples: int
    queries: int
    inputs: dict
    fingerprint: str
    previous: dict | None

    def url(self, *parts: str) -> str:
        return storage.join(self.output, *parts)


# ---------------------------------------------------------------- planning


def _fingerprint(inputs: EmbeddingsInput, options: dict) -> str:
    files = [(f.url, f.rows, f.id_start) for f in inputs.files]
    return hashlib.sha256(json.dumps([files, options], sort_keys=True).encode()).hexdigest()[:16]


def _read_existing(output: str, so: dict) -> dict | None:
    if not storage.exists(storage.join(output, layout.INDEX_JSON), so):
        return None
    return layout.read_manifest(output, so)


def prepare(args: argparse.Namespace) -> IndexJob | None:
    """Check every argument and input, plan shards and samples; None when the output is already complete."""
    so = storage_options_from_args(args)
    max_memory = parse_memory(args.max_index_memory)
    if not 0 < args.target_recall <= 1:
        raise UsageError(f"--target-recall must be in (0, 1], not {args.target_recall}")
    if args.batch_rows < 1 or args.tune_queries < 1:
        raise UsageError("--batch-rows and --tune-queries must be at least 1")
    if args.shards is not None and args.shard_size is not None:
        raise UsageError("give --shards or --shard-size, not both")
    if args.append and args.overwrite:
        raise UsageError("--append adds to the index in --output; --overwrite would delete it first")
    keep = None if args.keep_columns is None else [c.strip() for c in args.keep_columns.split(",") if c.strip()]
    previous = _read_existing(args.output, so)
    if args.append:
        if previous is None:
            raise UsageError(f"--append: {args.output} holds no finished index to add to")
        if args.column != previous.get("column", args.column) or args.metric != previous["metric"]:
            raise UsageError(f"--append: the index was built from column {previous.get('column')!r} with metric "
                             f"{previous['metric']!r}; got {args.column!r} and {args.metric!r}")
        keep = list(previous.get("metadata_columns", [])) if keep is None else keep
    first_id = max((int(s["id_end"]) for s in previous["shards"]), default=0) if args.append else 0
    inputs = resolve_embeddings(args.embeddings, args.column, args.id_column, keep, so, first_id)
    if args.append:
        indexed = {f["url"] for source in previous.get("embeddings", []) for f in source.get("files", [])}
        new_files, next_id = [], first_id
        for f in inputs.files:
            if f.url not in indexed:
                new_files.append(InputFile(f.url, f.rows, next_id))
                next_id += f.rows
        if not new_files:
            LOG.info("every part of %s is already in the index: nothing to append", args.embeddings)
            return None
        inputs.files = new_files
        if inputs.dim != previous["dim"]:
            raise UsageError(f"--append: new vectors have dimension {inputs.dim}, the index {previous['dim']}")
    rows = inputs.rows
    if args.append:
        factory, requested, reason = previous["factory"], previous.get("factory_requested", previous["factory"]), \
            previous.get("factory_reason", "")
    elif args.index_factory == "auto":
        choice = choose_factory(rows, inputs.dim, max_memory)
        factory, requested, reason = choice.factory, "auto", choice.reason
    else:
        factory, requested, reason = args.index_factory, args.index_factory, "given with --index-factory"
    needs_training = not make_index(factory, inputs.dim, args.metric).is_trained
    queries = query_count(rows, args.tune_queries)
    train = 0
    if needs_training and not args.append:
        train = args.train_sample if args.train_sample is not None else default_train_sample(factory, rows)
        budget_rows = max_memory // (inputs.dim * 4)
        if train > budget_rows:
            LOG.warning("training sample cut from %d to %d vectors to stay within %s", train, budget_rows,
                        format_bytes(max_memory))
            train = budget_rows
        if train < 1:
            raise UsageError(f"{factory} needs training vectors; --train-sample must be at least 1")
    train_ids, query_ids = plan_sample(inputs.files, train, queries, args.seed)
    train_rows, query_rows = rows_by_file(inputs.files, train_ids), rows_by_file(inputs.files, query_ids)
    sample = tuple((f, train_rows.get(i, np.zeros(0, np.int64)), query_rows.get(i, np.zeros(0, np.int64)))
                   for i, f in enumerate(inputs.files) if i in train_rows or i in query_rows)
    count = shard_count(rows, args.shards, args.shard_size)
    first_number = len(previous["shards"]) if args.append else 0
    shards = tuple(plan_shards(inputs.files, count, first_number))
    options = {"factory": factory, "metric": args.metric, "column": args.column, "id_column": args.id_column,
               "keep": inputs.metadata_columns, "shards": [(s.id_start, s.id_end) for s in shards],
               "train": train, "queries": queries, "seed": args.seed, "target": args.target_recall,
               "memory": max_memory, "append_to": previous.get("fingerprint") if args.append else None}
    fingerprint = _fingerprint(inputs, options)
    if previous is not None and not args.append and not args.overwrite:
        if previous.get("fingerprint") == fingerprint:
            LOG.info("%s already holds this index: nothing to do (--overwrite rebuilds it)", args.output)
            return None
        raise UsageError(f"{args.output} already holds an index built from other inputs or options; "
                         "pass --overwrite to rebuild it or --append to add to it")
    storage.check_writable(args.output, so)
    return IndexJob(args.output, so, args.column, args.id_column, tuple(inputs.metadata_columns), inputs.dim,
                    args.metric, factory, requested, reason, max_memory, args.target_recall, args.batch_rows,
                    shards, sample, train, queries, describe(inputs), fingerprint,
                    previous if args.append else None)


def _clear_output(job: IndexJob) -> None:
    """--overwrite: remove index.json first (the index stops being complete), then everything it owned."""
    fs, path = storage.get_fs(job.output, job.storage_options)
    for name in (layout.INDEX_JSON, layout.TRAINED_INDEX):
        if fs.exists(storage.join(path, name)):
            fs.rm(storage.join(path, name))
    for found in fs.glob(storage.join(path, "shard-*")):
        fs.rm(found)
    if fs.exists(storage.join(path, WORK)):
        fs.rm(storage.join(path, WORK), recursive=True)


def _start_work(job: IndexJob) -> bool:
    """Keep the work of an interrupted run of the same plan, else start clean; True when training is done."""
    fs, path = storage.get_fs(job.output, job.storage_options)
    plan_url = job.url(WORK, "plan.json")
    if fs.exists(storage.join(path, WORK, "plan.json")):
        if storage.read_json(plan_url, job.storage_options).get("fingerprint") == job.fingerprint:
            return fs.exists(storage.join(path, WORK, "train.json"))
        LOG.info("discarding the unfinished work of a run with other inputs or options")
        fs.rm(storage.join(path, WORK), recursive=True)
    committed = {s["index"] for s in (job.previous or {}).get("shards", [])}
    committed |= {s["ids"] for s in (job.previous or {}).get("shards", [])}
    for found in fs.glob(storage.join(path, "shard-*")):
        if found.rsplit("/", 1)[-1] not in committed:
            fs.rm(found)
    storage.write_json(plan_url, {"fingerprint": job.fingerprint}, job.storage_options)
    return False


# ---------------------------------------------------------------- pipeline steps


def _read_sample(task: tuple[InputFile, np.ndarray, np.ndarray], job: IndexJob):
    """One file's training rows and query rows, read in one pass."""
    file, train_rows, query_rows = task
    rows = np.union1d(train_rows, query_rows)
    vectors, ids = read_rows(file, job.column, job.dim, rows, job.batch_rows, job.storage_options)
    is_query = np.isin(ids - file.id_start, query_rows)
    yield "train", ids[~is_query], vectors[~is_query]
    yield "query", ids[is_query], vectors[is_query]


def _save_npz(url: str, storage_options: dict, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with storage.atomic_open(url, "wb", storage_options) as handle:
        handle.write(buffer.getvalue())


def _load_npz(url: str, storage_options: dict) -> dict[str, np.ndarray]:
    with storage.open_input(url, storage_options) as handle:
        data = np.load(io.BytesIO(handle.read()))
        return {key: data[key] for key in data.files}


def _train(samples: list, job: IndexJob) -> dict:
    """Train once (or reuse the index's trained quantizer with --append); store it and the queries."""
    def gather(kind: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [(ids, vectors) for k, ids, vectors in samples if k == kind]
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, job.dim), np.float32)
        ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(ids, kind="stable")
        return ids[order], np.concatenate([p[1] for p in parts])[order]

    _, train_vectors = gather("train")
    query_ids, queries = gather("query")
    if job.previous is not None:
        info = dict(job.previous.get("train", {}))
    else:
        index = make_index(job.factory, job.dim, job.metric)
        info = train_index(index, train_vectors)
        write_index(index, job.url(layout.TRAINED_INDEX), job.storage_options)
    _save_npz(job.url(WORK, "queries.npz"), job.storage_options, ids=query_ids, vectors=queries)
    storage.write_json(job.url(WORK, "train.json"), info, job.storage_options)
    return info


class _BuildShard(beam.DoFn):
    """Fill one copy of the trained empty index with a shard's rows; exact neighbours of the queries on the way."""

    def __init__(self, job: IndexJob) -> None:
        self.job = job
        self._trained: np.ndarray | None = None
        self._queries: dict | None = None

    def process(self, plan: ShardPlan, train_info: dict):
        job = self.job
        done_url = job.url(WORK, f"shard-{plan.number:05d}.done.json")
        if storage.exists(done_url, job.storage_options):
            LOG.info("shard %d: already built", plan.number)
            yield storage.read_json(done_url, job.storage_options)
            return
        started = time.monotonic()
        if self._trained is None:
            trained = read_index(job.url(layout.TRAINED_INDEX), job.storage_options, mmap=False)
            self._trained = faiss.serialize_index(trained)
            self._queries = _load_npz(job.url(WORK, "queries.npz"), job.storage_options)
        index = faiss.deserialize_index(self._trained)
        exact = ExactTopK(self._queries["vectors"], RECALL_K + 1, job.metric)
        skipped = 0
        ids_url = job.url(layout.shard_ids_name(plan.number))
        with storage.atomic_open(ids_url, "wb", job.storage_options) as handle, \
                contextlib.ExitStack() as stack:
            writer = None
            for piece in plan.pieces:
                for batch in iter_batches(piece.file, job.column, job.id_column, list(job.metadata_columns), job.dim,
                                          piece.row_start, piece.row_end, job.batch_rows, job.storage_options):
                    index.add_with_ids(batch.vectors, batch.ids)
                    exact.add(batch.vectors, batch.ids)
                    skipped += batch.skipped
                    table = batch.metadata.add_column(0, "faiss_id", pa.array(batch.ids, pa.int64()))
                    if writer is None:
                        writer = stack.enter_context(pq.ParquetWriter(handle, table.schema))
                    writer.write_table(table)
            if writer is None:
                raise RuntimeError(f"shard {plan.number} read no rows")
        size = write_index(index, job.url(layout.shard_index_name(plan.number)), job.storage_options)
        _save_npz(job.url(WORK, f"shard-{plan.number:05d}.gt.npz"), job.storage_options,
                  scores=exact.scores, ids=exact.ids)
        result = {"number": plan.number, "index": layout.shard_index_name(plan.number),
                  "ids": layout.shard_ids_name(plan.number), "ntotal": int(index.ntotal),
                  "id_start": plan.id_start, "id_end": plan.id_end, "bytes": size, "skipped_null": skipped,
                  "seconds": round(time.monotonic() - started, 3)}
        storage.write_json(done_url, result, job.storage_options)
        LOG.info("shard %d: %d vectors in %.1fs", plan.number, index.ntotal, time.monotonic() - started)
        yield result


def _commit(results: list[dict], job: IndexJob) -> dict:
    """Tune on the shards just built, then write index.json last and drop the work folder."""
    results = sorted(results, key=lambda r: r["number"])
    queries = _load_npz(job.url(WORK, "queries.npz"), job.storage_options)
    truths = [_load_npz(job.url(WORK, f"shard-{r['number']:05d}.gt.npz"), job.storage_options) for r in results]
    _, truth_ids = merge_topk([t["scores"] for t in truths], [t["ids"] for t in truths], RECALL_K + 1, job.metric)
    shards = [read_index(job.url(r["index"]), job.storage_options, expected_bytes=r["bytes"]) for r in results]
    tuned = tune(shards, job.metric, queries["vectors"], queries["ids"], truth_ids, RECALL_K, job.target_recall)
    previous = job.previous or {}
    entries = list(previous.get("shards", [])) + [
        {key: r[key] for key in ("index", "ids", "ntotal", "id_start", "id_end", "bytes", "skipped_null")}
        for r in results]
    train_info = storage.read_json(job.url(WORK, "train.json"), job.storage_options)
    manifest = {
        "format": layout.FORMAT,
        "version": layout.FORMAT_VERSION,
        "clipbeam_version": __version__,
        "factory": job.factory,
        "factory_requested": job.factory_requested,
        "factory_reason": job.factory_reason,
        "metric": job.metric,
        "dim": job.dim,
        "ntotal": sum(int(e["ntotal"]) for e in entries),
        "column": job.column,
        "id_column": job.id_column,
        "metadata_columns": list(job.metadata_columns),
        "max_index_memory": job.max_memory,
        "index_bytes": sum(int(e["bytes"]) for e in entries),
        "search_params": tuned.params,
        "recall_at_10": tuned.recall,
        "queries_per_second": tuned.queries_per_second,
        "target_recall": job.target_recall,
        "target_reached": tuned.target_reached,
        "tuning": {
            "k": RECALL_K,
            "queries": int(len(queries["ids"])),
            "measured_on_shards": [r["number"] for r in results],
            "method": "held-out database vectors (not in the training sample), own id excluded, "
                      "against exact search over the measured shards",
            "curve": tuned.curve,
        },
        "train": train_info,
        "trained_index": layout.TRAINED_INDEX,
        "shards": entries,
        "embeddings": list(previous.get("embeddings", [])) + [job.inputs],
        "fingerprint": job.fingerprint,
    }
    layout.write_manifest(job.output, manifest, job.storage_options)
    fs, path = storage.get_fs(job.output, job.storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(storage.join(path, WORK), recursive=True)
    return {"ntotal": manifest["ntotal"], "recall": tuned.recall}


def build_pipeline(pipeline: beam.Pipeline, job: IndexJob, trained_done: bool) -> None:
    if trained_done:
        train_info = pipeline | "TrainedBefore" >> beam.Create(
            [storage.read_json(job.url(WORK, "train.json"), job.storage_options)])
    else:
        train_info = (pipeline
                      | "SampleFiles" >> beam.Create(list(job.sample))
                      | "ReadSample" >> beam.FlatMap(_read_sample, job)
                      | "GatherSample" >> beam.combiners.ToList()
                      | "TrainOnce" >> beam.Map(_train, job))
    _ = (pipeline
         | "Shards" >> beam.Create(list(job.shards))
         | "Spread" >> beam.Reshuffle()
         | "BuildShards" >> beam.ParDo(_BuildShard(job), beam.pvalue.AsSingleton(train_info))
         | "GatherShards" >> beam.combiners.ToList()
         | "TuneAndCommit" >> beam.Map(_commit, job))


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    job = prepare(args)
    if job is None:
        return 0
    if args.overwrite:
        _clear_output(job)
    trained_done = _start_work(job)
    LOG.info("index %d vectors of dimension %d: %s (%s), %d shard(s)", sum(f["rows"] for f in job.inputs["files"]),
             job.dim, job.factory, job.factory_reason, len(job.shards))
    with beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, job, trained_done)
    manifest = layout.read_manifest(job.output, job.storage_options)
    print_summary(f"clipbeam index -> {job.output}", [
        ("factory", f"{manifest['factory']} ({manifest['factory_reason']})"),
        ("vectors", f"{manifest['ntotal']} in {len(manifest['shards'])} shard(s)"),
        ("search params", manifest["search_params"] or "(none)"),
        ("recall@10", f"{manifest['recall_at_10']:.4f} (target {manifest['target_recall']}"
                      f"{'' if manifest['target_reached'] else ', NOT reached'})"),
        ("queries/s", manifest["queries_per_second"]),
        ("index size", format_bytes(manifest["index_bytes"])),
        ("seconds", f"{watch.seconds:.1f}"),
    ])
    return 0
