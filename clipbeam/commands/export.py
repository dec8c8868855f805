"""Embeddings -> the clip-retrieval / autofaiss folder layout (`clipbeam export`).

parse -> validate into one frozen ExportConfig -> ExportParts over the
embeddings parts not exported yet -> export.json, last. Partition N comes
from embeddings part N (its number is kept when the corpus grows), the
number has a fixed width, and no 0-row file is written, because
clip-retrieval, autofaiss and embedding-reader pair the files by sorted
position. A rerun exports only the parts without a done-marker, and only
with the settings the output was written with (otherwise one line, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from clipbeam import __version__, storage
from clipbeam.commands.argtypes import positive_int
from clipbeam.commands.common import (
    Stopwatch,
    add_exclude_arguments,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    excluded_samples,
    print_summary,
    storage_options_from_args,
)
from clipbeam.commands.part_jobs import run_parts
from clipbeam.layout import Mode, OutputFolder, open_output
from clipbeam.layout.clip_retrieval import EXPORT, FORMAT_VERSION, partition_width
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart, embeddings_parts
from clipbeam.layout.embeddings.read import resolve_embeddings
from clipbeam.layout.owned import remove_owned, remove_owned_temporaries
from clipbeam.transforms.export_parts import TEXT_MISSING, ExportConfig, ExportParts

LOG = logging.getLogger(__name__)
FORMATS = ("clip-retrieval",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url,
                        help="embed output folder (any fsspec URL)")
    parser.add_argument("--format", default="clip-retrieval", choices=FORMATS, help="output layout")
    parser.add_argument("--text-missing", default="zero", choices=TEXT_MISSING,
                        help="rows without a text embedding: a zero vector in text_emb and has_text=false (zero, "
                             "the default), or no text_emb at all unless every row has one (drop)")
    parser.add_argument("--batch-rows", type=positive_int, default=65_536,
                        help="rows read at a time (default %(default)s)")
    add_exclude_arguments(parser)
    add_output_arguments(parser)
    add_storage_arguments(parser)


def prepare(args: argparse.Namespace) -> tuple[ExportConfig, dict, list[EmbeddingsPart]]:
    """Check arguments and inputs: (config, settings compared on resume, the parts)."""
    storage_options = storage_options_from_args(args)
    inputs = resolve_embeddings(args.embeddings, "image_embedding", "id", [], storage_options)
    exclude = excluded_samples(args, inputs, storage_options)
    parts = embeddings_parts(inputs)
    width = partition_width(max(p.number for p in parts) + 1)
    with_text = "text_embedding" in inputs.schema.names
    recorded = {key: (inputs.manifest or {}).get(key) for key in ("model", "pretrained", "seed", "weights")}
    settings = {"layout": args.format, "embeddings": args.embeddings, "text_missing": args.text_missing,
                "dim": inputs.dim, "width": width, "with_text": with_text, "embeddings_model": recorded,
                **({"exclude": exclude.source} if exclude.source else {})}
    config = ExportConfig(args.output, storage_options, inputs.dim, width, args.batch_rows, with_text,
                          args.text_missing, ledger=None, exclude=exclude.ids)
    return config, settings, parts


def drop_text_files(config: ExportConfig, numbers: list[int]) -> None:
    """Delete the text_emb files of these partitions, and text_emb/ itself only when nothing else is left
    in it: files a user keeps there are not the export's to delete."""
    for number in numbers:
        remove_owned(config.output, config.name("text_emb", number), config.storage_options)
    remove_owned_temporaries(config.output, "text_emb", config.storage_options)
    if not storage.list_names(storage.join(config.output, "text_emb"), config.storage_options):
        remove_owned(config.output, "text_emb", config.storage_options, recursive=True)


def commit(out: OutputFolder, config: ExportConfig, settings: dict) -> dict:
    """export.json, last; under --text-missing drop, text_emb goes unless every partition kept it."""
    partitions = sorted((m for m in out.done_units().values() if m["rows"]), key=lambda m: m["number"])
    text = config.with_text and all(p["text"] for p in partitions)
    if config.with_text and not text:
        LOG.warning("some rows have no text embedding: text_emb is not exported (--text-missing drop)")
        drop_text_files(config, [p["number"] for p in partitions])
    entries = [{"partition": f"{p['number']:0{config.width}d}", "rows": p["rows"], "text": p["text"] and text,
                "source": p["source"]} for p in partitions]
    return out.commit({**settings, "version": FORMAT_VERSION, "dtype": "float16", "text": text, "partitions": entries,
                       "rows": sum(p["rows"] for p in entries), "clipbeam_version": __version__})


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    config, settings, parts = prepare(args)
    with open_output(args.output, EXPORT, settings, Mode.from_flags(args.overwrite), config.storage_options) as out:
        ran = run_parts(out, parts, options, "export",
                        lambda ledger: ExportParts(dataclasses.replace(config, ledger=ledger)))
        if ran.code:
            return ran.code
        manifest = commit(out, config, settings)
    print_summary(f"clipbeam export -> {args.output}", [
        ("format", args.format),
        ("partitions", ran.summary(len(manifest["partitions"]))),
        ("rows", manifest["rows"]),
        ("text_emb", "yes" if manifest["text"] else "no" if not config.with_text else "no (--text-missing drop)"),
        ("seconds", f"{watch.seconds:.1f}")])
    return 0
