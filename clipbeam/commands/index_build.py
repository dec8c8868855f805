"""Embeddings -> a sharded FAISS index that states its measured recall (`clipbeam index`).

parse -> validate and plan into one frozen IndexConfig -> sample, train, build
the shards and tune (clipbeam.index.build) -> index.json, last, through the
output lifecycle (clipbeam.layout). Without Beam options the steps run in this
process, shard after shard, and Beam is never imported (its start-up was a
large share of a 200,000-vector build); any Beam option (--runner,
--direct_num_workers, ...) runs them as the BuildShards and TuneShards
pipeline (transforms/index_shards.py), which builds shards on many workers.
Peak memory is the index budget (one shard's index per worker, at most the
whole index) plus the training sample plus three batches of rows (the next
ones are read while one is added), plus, in-process, the stored vectors when
they fit the budget (each file is then decoded once, for the sample and the
shards together).

Reruns resume: shards with a done-marker are kept when the plan (inputs,
options, shards) is the same, and the run's settings must match the run
record (otherwise one line, exit 2); `--overwrite` starts over, deleting only
what the index owns; `--append` adds the embedding parts not yet indexed as
new shards, with the index's trained quantizer, continuing the global ids.
During an append the previous index.json stays, so the index stays readable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass

from clipbeam import __version__, storage
from clipbeam.commands.argtypes import non_negative_int, positive_int, unit_interval
from clipbeam.commands.common import (
    Stopwatch,
    add_exclude_arguments,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    excluded_samples,
    print_summary,
    report_unfinished,
    run_pipeline,
    storage_options_from_args,
)
from clipbeam.errors import UsageError
from clipbeam.index import manifest as index_layout
from clipbeam.index.build import (
    RECALL_K,
    STAGES,
    BuiltShard,
    IndexConfig,
    Stages,
    build_in_process,
    shard_unit,
)
from clipbeam.index.checksum import verify_index
from clipbeam.index.factory import choose_factory, default_train_sample, format_bytes, parse_memory
from clipbeam.index.faiss_io import METRICS, make_index
from clipbeam.index.plan import plan_sample, plan_shards, query_count, sample_reads, shard_count
from clipbeam.layout import RUN_RECORD, Mode, OutputFolder, open_output, settings_fingerprint
from clipbeam.layout.embeddings.read import EmbeddingsInput, check_indexed_parts, describe, resolve_embeddings
from clipbeam.layout.index import INDEX, WORK
from clipbeam.layout.owned import remove_owned

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", default=None, type=storage.absolute_url,
                        help="embed output folder, or Parquet file(s): a folder, a glob or one file (any fsspec URL); "
                             "required unless --verify")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    parser.add_argument("--column", default="image_embedding", help="vector column (default %(default)s)")
    parser.add_argument("--id-column", default="id", help="id column (default %(default)s)")
    parser.add_argument("--keep-columns", default=None,
                        help="comma-separated columns copied into the shard id tables "
                             "(default: caption,source,source_offset,source_size where present)")
    parser.add_argument("--shards", type=positive_int, default=None, help="number of shards (default 1)")
    parser.add_argument("--shard-size", type=positive_int, default=None, help="rows per shard, instead of --shards")
    parser.add_argument("--index-factory", default="auto", help="auto, or any faiss factory string (default auto)")
    parser.add_argument("--max-index-memory", default="4GB", help="memory budget of the index (default %(default)s)")
    parser.add_argument("--metric", default="ip", choices=sorted(METRICS),
                        help="ip (cosine on normalised vectors) or l2")
    parser.add_argument("--train-sample", type=non_negative_int, default=None,
                        help="training vectors (default: from the factory)")
    parser.add_argument("--target-recall", type=unit_interval, default=0.95,
                        help="recall@10 to tune for (default %(default)s)")
    parser.add_argument("--tune-queries", type=positive_int, default=1000,
                        help="held-out queries for tuning, at most a tenth of the rows (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training / query sample (default 0)")
    parser.add_argument("--batch-rows", type=positive_int, default=65_536,
                        help="rows read at a time (default %(default)s)")
    parser.add_argument("--append", action="store_true",
                        help="add the embedding parts not yet indexed to the index in --output")
    add_exclude_arguments(parser)
    parser.add_argument("--verify", action="store_true",
                        help="build nothing: check every file of the index in --output against index.json's SHA-256")


@dataclass(frozen=True)
class IndexRun:
    """The planned run: what workers need (config) and what only the commit and the lifecycle read."""

    config: IndexConfig
    settings: dict
    fingerprint: str
    factory_requested: str
    factory_reason: str
    max_memory: int
    inputs: dict


@dataclass(frozen=True)
class FactoryChoice:
    factory: str
    requested: str
    reason: str


# ---------------------------------------------------------------- planning


def _fingerprint(inputs: EmbeddingsInput, options: dict) -> str:
    files = [(f.url, f.rows, f.id_start) for f in inputs.files]
    return settings_fingerprint([files, options])


def _read_existing(output: str, storage_options: dict) -> dict | None:
    if not storage.exists(storage.join(output, index_layout.INDEX_JSON), storage_options):
        return None
    return index_layout.read_manifest(output, storage_options)


def _check_args(args: argparse.Namespace) -> int:
    """Argument checks that need no input; returns the memory budget in bytes."""
    max_memory = parse_memory(args.max_index_memory)
    if args.shards is not None and args.shard_size is not None:
        raise UsageError("give --shards or --shard-size, not both")
    if args.append and args.overwrite:
        raise UsageError("--append adds to the index in --output; --overwrite would delete it first")
    if args.exclude and args.append:
        raise UsageError("--exclude applies to a whole corpus: rerun dedup, then rebuild with --overwrite "
                         "instead of --append")
    return max_memory


def _append_inputs(args: argparse.Namespace, previous: dict, keep: list[str] | None,
                   storage_options: dict) -> EmbeddingsInput | None:
    """--append: the embedding parts not in the index yet, with ids after its last one; None when there are none."""
    if args.column != previous.get("column", args.column) or args.metric != previous["metric"]:
        raise UsageError(f"--append: the index was built from column {previous.get('column')!r} with metric "
                         f"{previous['metric']!r}; got {args.column!r} and {args.metric!r}")
    keep = list(previous.get("metadata_columns", [])) if keep is None else keep
    first_id = max((int(s["id_end"]) for s in previous["shards"]), default=0)
    inputs = resolve_embeddings(args.embeddings, args.column, args.id_column, keep, storage_options, first_id)
    if inputs.dim != previous["dim"]:
        raise UsageError(f"--append: new vectors have dimension {inputs.dim}, the index {previous['dim']}")
    _check_unchanged(previous, inputs)
    indexed = {f["url"] for source in previous.get("embeddings", []) for f in source.get("files", [])}
    new_files, next_id = [], first_id
    for f in inputs.files:
        if f.url not in indexed:
            new_files.append(dataclasses.replace(f, id_start=next_id))
            next_id += f.rows
    if not new_files:
        LOG.info("every part of %s is already in the index: nothing to append", args.embeddings)
        return None
    inputs.files = new_files
    return inputs


def _check_unchanged(previous: dict, inputs: EmbeddingsInput) -> None:
    """--append: the parts of this input that the index holds must still be there with the same rows
    (a lost part embedded again under another name would otherwise be indexed twice)."""
    now = {f.url: f.rows for f in inputs.files}
    for source in previous.get("embeddings", []):
        if source.get("url") != inputs.url:
            continue
        for listed in source.get("files", []):
            if now.get(listed["url"]) != listed["rows"]:
                state = "is gone" if listed["url"] not in now else f"has {now[listed['url']]} rows"
                raise UsageError(f"--append: {listed['url']} was indexed with {listed['rows']} rows and now {state}; "
                                 "the embeddings changed under the index: rebuild it with --overwrite")


def _choose_factory(args: argparse.Namespace, previous: dict | None, inputs: EmbeddingsInput,
                    max_memory: int) -> FactoryChoice:
    if previous is not None and args.append:
        return FactoryChoice(previous["factory"], previous.get("factory_requested", previous["factory"]),
                             previous.get("factory_reason", ""))
    if args.index_factory == "auto":
        choice = choose_factory(inputs.rows, inputs.dim, max_memory)
        return FactoryChoice(choice.factory, "auto", choice.reason)
    return FactoryChoice(args.index_factory, args.index_factory, "given with --index-factory")


def _train_count(args: argparse.Namespace, factory: str, inputs: EmbeddingsInput, max_memory: int,
                 appending: bool) -> int:
    """Training vectors: none for indexes that need no training or that reuse --append's quantizer."""
    if appending or make_index(factory, inputs.dim, args.metric).is_trained:
        return 0
    train = args.train_sample if args.train_sample is not None else default_train_sample(factory, inputs.rows)
    budget_rows = max_memory // (inputs.dim * 4)
    if train > budget_rows:
        LOG.warning("training sample cut from %d to %d vectors to stay within %s", train, budget_rows,
                    format_bytes(max_memory))
        train = budget_rows
    if train < 1:
        raise UsageError(f"{factory} needs training vectors; --train-sample must be at least 1")
    return train


def _settings(args: argparse.Namespace, choice: FactoryChoice, inputs: EmbeddingsInput, max_memory: int,
              storage_options: dict, appending: bool) -> dict:
    """What the run record keeps and a resumed run must repeat; an --append inherits the index's own.

    (An index from before run records has none to inherit: the lifecycle then asks for --overwrite.)
    """
    record = storage.join(args.output, RUN_RECORD)
    if appending:
        return storage.read_json(record, storage_options)["settings"] if storage.exists(record, storage_options) \
            else {}
    return {"embeddings": args.embeddings, "column": args.column, "id_column": args.id_column,
            "metadata_columns": inputs.metadata_columns, "metric": args.metric, "factory": choice.factory,
            "seed": args.seed, "target_recall": args.target_recall, "max_index_memory": max_memory}


def _stored_bytes(inputs: EmbeddingsInput) -> int:
    """The input's vectors as stored (float16: 2 bytes a value): what an in-process build that reads each
    file once keeps in memory, so it does that only within the memory budget."""
    return inputs.rows * inputs.dim * inputs.schema.field(inputs.column).type.value_type.bit_width // 8


def prepare(args: argparse.Namespace) -> IndexRun | None:
    """Check every argument and input, plan shards and samples; None when there is nothing to do.

    `--append` into a folder without a finished index builds a new one, so that
    a daily job runs the same command from its first day on.
    """
    storage_options = storage_options_from_args(args)
    max_memory = _check_args(args)
    keep = None if args.keep_columns is None else [c.strip() for c in args.keep_columns.split(",") if c.strip()]
    previous = _read_existing(args.output, storage_options)
    appending = args.append and previous is not None
    if args.append and not appending:
        LOG.info("--append: %s holds no finished index yet: building a new one", args.output)
    if appending:
        inputs = _append_inputs(args, previous, keep, storage_options)
        if inputs is None:
            return None
    else:
        inputs = resolve_embeddings(args.embeddings, args.column, args.id_column, keep, storage_options)
    exclude = excluded_samples(args, inputs, storage_options)
    choice = _choose_factory(args, previous, inputs, max_memory)
    queries = query_count(inputs.rows, args.tune_queries)
    train = _train_count(args, choice.factory, inputs, max_memory, appending)
    first_number = len(previous["shards"]) if appending else 0
    shards = tuple(plan_shards(inputs.files, shard_count(inputs.rows, args.shards, args.shard_size), first_number))
    options = {"factory": choice.factory, "metric": args.metric, "column": args.column, "id_column": args.id_column,
               "keep": inputs.metadata_columns, "shards": [(s.id_start, s.id_end) for s in shards],
               "train": train, "queries": queries, "seed": args.seed, "target": args.target_recall,
               "memory": max_memory, "append_to": previous.get("fingerprint") if appending else None,
               **({"exclude": exclude.source} if exclude.source else {})}
    fingerprint = _fingerprint(inputs, options)
    if previous is not None and not appending and not args.overwrite:
        if previous.get("fingerprint") == fingerprint:
            LOG.info("%s already holds this index: nothing to do (--overwrite rebuilds it)", args.output)
            return None
        raise UsageError(f"{args.output} already holds an index built from other inputs or options; "
                         "pass --overwrite to rebuild it or --append to add to it")
    sample = sample_reads(inputs.files, *plan_sample(inputs.files, train, queries, args.seed))
    config = IndexConfig(args.output, storage_options, args.column, args.id_column, tuple(inputs.metadata_columns),
                         inputs.dim, args.metric, choice.factory, args.target_recall, args.batch_rows, shards, sample,
                         previous if appending else None, ledger=None, exclude=exclude.ids,
                         preload=_stored_bytes(inputs) <= max_memory)
    settings = _settings(args, choice, inputs, max_memory, storage_options, appending)
    if exclude.source:
        settings["exclude"] = exclude.source
    return IndexRun(config, settings, fingerprint, choice.requested, choice.reason, max_memory, describe(inputs))


# ---------------------------------------------------------------- lifecycle


def _built(out: OutputFolder, config: IndexConfig) -> list[BuiltShard]:
    """This plan's shards that have a done-marker (and their files)."""
    fields = {f.name for f in dataclasses.fields(BuiltShard)}
    done = out.done_units()
    return [BuiltShard(**{k: v for k, v in done[shard_unit(p.number)].items() if k in fields})
            for p in config.shards if shard_unit(p.number) in done]


def start_work(out: OutputFolder, run: IndexRun) -> tuple[bool, list[BuiltShard]]:
    """Keep the work of an interrupted run of the same plan, else drop it: (trained already, shards built)."""
    config, storage_options = run.config, run.config.storage_options
    plan_url = config.url(WORK, "plan.json")
    planned = storage.read_json(plan_url, storage_options) if storage.exists(plan_url, storage_options) else {}
    if planned.get("fingerprint") == run.fingerprint:
        return storage.exists(config.url(WORK, "train.json"), storage_options), _built(out, config)
    committed = {shard_unit(n) for n in range(len((config.previous or {}).get("shards", [])))}
    stale = {unit: marker for unit, marker in out.done_units().items() if unit not in committed}
    if stale:
        LOG.info("discarding %d shard(s) of an unfinished run with other inputs or options", len(stale))
    out.ledger.discard(stale)
    remove_owned(config.output, WORK, storage_options, recursive=True)
    out.claim([index_layout.TRAINED_INDEX, *(n for p in config.shards for n in (
        index_layout.shard_index_name(p.number), index_layout.shard_ids_name(p.number)))])
    storage.write_json(plan_url, {"fingerprint": run.fingerprint}, storage_options)
    return False, []


def _manifest(run: IndexRun, shards: list[BuiltShard], tuned: dict, train_info: dict) -> dict:
    config, previous = run.config, run.config.previous or {}
    keys = ("index", "ids", "ntotal", "id_start", "id_end", "bytes", "sha256", "ids_sha256", "skipped_null")
    entries = list(previous.get("shards", [])) + [{k: getattr(s, k) for k in keys} for s in shards]
    return {
        "format": index_layout.FORMAT, "version": index_layout.FORMAT_VERSION, "clipbeam_version": __version__,
        "factory": config.factory, "factory_requested": run.factory_requested, "factory_reason": run.factory_reason,
        "metric": config.metric, "dim": config.dim, "ntotal": sum(int(e["ntotal"]) for e in entries),
        "column": config.column, "id_column": config.id_column, "metadata_columns": list(config.metadata_columns),
        "max_index_memory": run.max_memory, "index_bytes": sum(int(e["bytes"]) for e in entries),
        "search_params": tuned["search_params"], "recall_at_10": tuned["recall_at_10"],
        "queries_per_second": tuned["queries_per_second"], "target_recall": config.target_recall,
        "target_reached": tuned["target_reached"],
        "tuning": {"k": RECALL_K, "queries": tuned["queries"], "measured_on_shards": tuned["measured_on_shards"],
                   "method": "held-out database vectors (not in the training sample), own id excluded, "
                             "against exact search over the measured shards",
                   "curve": tuned["curve"]},
        "train": {k: v for k, v in train_info.items() if k != "stage_seconds"},
        "trained_index": index_layout.TRAINED_INDEX, "shards": entries,
        "embeddings": list(previous.get("embeddings", [])) + [run.inputs], "fingerprint": run.fingerprint,
    }


def commit(out: OutputFolder, run: IndexRun) -> dict:
    """index.json last (through the lifecycle), then the work folder goes."""
    config, storage_options = run.config, run.config.storage_options
    shards = _built(out, config)
    if len(shards) != len(config.shards):
        raise RuntimeError(f"{len(config.shards) - len(shards)} shard(s) have no done-marker after the run")
    manifest = out.commit(_manifest(run, shards, storage.read_json(config.url(WORK, "tuned.json"), storage_options),
                                    storage.read_json(config.url(WORK, "train.json"), storage_options)))
    remove_owned(config.output, WORK, storage_options, recursive=True)
    return manifest


def verify(args: argparse.Namespace) -> int:
    """--verify: read every file of the index in --output once and compare its SHA-256 with index.json's."""
    if args.embeddings is not None:
        raise UsageError("--verify checks the index in --output and builds nothing; drop --embeddings")
    storage_options = storage_options_from_args(args)
    manifest = index_layout.read_manifest(args.output, storage_options)
    checked = verify_index(args.output, manifest, storage_options)
    parts = check_indexed_parts(manifest, storage_options)
    print(f"clipbeam index --verify: {args.output}: all {checked} files match the checksums in index.json; "
          f"the {parts} embeddings parts it lists have their recorded rows")
    return 0


def _build(config: IndexConfig, beam_args: list[str], pending: list, built: list[BuiltShard], trained: bool,
           stages: Stages) -> int:
    """Train, build the pending shards and tune: here without Beam options, else as a Beam pipeline."""
    if not beam_args:
        try:
            build_in_process(config, pending, built, trained, stages)
        except Exception as exc:  # as a failed pipeline: one line, exit 1, a rerun resumes
            return report_unfinished("index", exc)
        return 0
    import apache_beam as beam

    from clipbeam.transforms.index_shards import BuildShards, TuneShards

    pipeline = beam.Pipeline(options=beam_options(beam_args))
    _ = (pipeline
         | "BuildShards" >> BuildShards(config, pending, built, trained)
         | "TuneShards" >> TuneShards(config))
    return run_pipeline(pipeline, "index")


def _step_stages(out: OutputFolder, config: IndexConfig, built: list[BuiltShard], trained: bool) -> dict:
    """The stage seconds the build steps recorded in this run (not those of an interrupted earlier run)."""
    storage_options, earlier = config.storage_options, {s.number for s in built}
    stages = Stages(storage.read_json(config.url(WORK, "tuned.json"), storage_options).get("stage_seconds"))
    if not trained:
        stages.add(storage.read_json(config.url(WORK, "train.json"), storage_options).get("stage_seconds", {}))
    for shard in _built(out, config):
        if shard.number not in earlier:
            stages.add(shard.stages)
    return stages.seconds


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.verify:
        return verify(args)
    if args.embeddings is None:
        raise UsageError("--embeddings is required (or --verify, to check an existing index)")
    watch, stages = Stopwatch(), Stages()
    if beam_args:
        beam_options(beam_args)  # unknown Beam flags: one line, exit 2, before any work
    with stages.timing("planning"):
        planned = prepare(args)
    if planned is None:
        return 0
    config = planned.config
    mode = Mode.from_flags(args.overwrite)
    # An append keeps the previous index.json until the new one replaces it: the index stays readable.
    with open_output(args.output, INDEX, planned.settings, mode, config.storage_options,
                     keep_manifest=config.previous is not None) as out:
        with stages.timing("planning"):
            trained, built = start_work(out, planned)
        pending = [p for p in config.shards if p.number not in {s.number for s in built}]
        LOG.info("index %d vectors of dimension %d: %s (%s), %d shard(s), %d built already",
                 sum(f["rows"] for f in planned.inputs["files"]), config.dim, config.factory,
                 planned.factory_reason, len(config.shards), len(built))
        started, outside = time.perf_counter(), Stages()
        code = _build(dataclasses.replace(config, ledger=out.ledger), beam_args, pending, built, trained, outside)
        if code:
            return code
        outside.add(_step_stages(out, config, built, trained))
        stages.add({**outside.seconds, "beam" if beam_args else "other":
                    time.perf_counter() - started - sum(outside.seconds.values())})
        with stages.timing("writing"):
            manifest = commit(out, planned)
    _print_summary(manifest, args.output, watch, stages)
    return 0


def _print_summary(manifest: dict, output: str, watch: Stopwatch, stages: Stages) -> None:
    print_summary(f"clipbeam index -> {output}", [
        ("factory", f"{manifest['factory']} ({manifest['factory_reason']})"),
        ("vectors", f"{manifest['ntotal']} in {len(manifest['shards'])} shard(s)"),
        ("search params", manifest["search_params"] or "(none)"),
        ("recall@10", f"{manifest['recall_at_10']:.4f} (target {manifest['target_recall']}"
                      f"{'' if manifest['target_reached'] else ', NOT reached'})"),
        ("queries/s", manifest["queries_per_second"]),
        ("index size", format_bytes(manifest["index_bytes"])),
        ("seconds", f"{watch.seconds:.1f}"),
        ("stages", ", ".join(f"{name} {stages.seconds[name]:.2f}" for name in (*STAGES, "beam", "other")
                             if name in stages.seconds)),
    ])
