"""Zero-shot labels from stored image embeddings (`clipbeam classify`).

parse -> validate into one frozen ClassifyConfig -> ClassifyParts over the
embeddings parts not labelled yet -> manifest.json, last. Images are never
embedded again; the math is in models/zero_shot.py, the per-part work in
transforms/classify_parts.py. A rerun (and a rerun after the corpus grew)
labels only the parts without a done-marker, and only when the labels,
templates, model and embeddings are those the output was written with:
otherwise one line, exit 2 (`--overwrite` redoes everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from clipbeam import __version__, storage
from clipbeam.commands.argtypes import positive_int
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    storage_options_from_args,
)
from clipbeam.commands.part_jobs import run_parts
from clipbeam.commands.query_model import add_query_model_arguments, load_query_model, query_spec
from clipbeam.errors import UsageError
from clipbeam.layout import Mode, OutputFolder, open_output
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart, embeddings_parts
from clipbeam.layout.embeddings.read import resolve_embeddings
from clipbeam.layout.labels import FORMAT_VERSION, LABELS
from clipbeam.models.zero_shot import DEFAULT_TEMPLATE, LOGIT_SCALE, label_embeddings
from clipbeam.transforms.classify_parts import ClassifyConfig, ClassifyParts

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=storage.absolute_url,
                        help="embed output folder (any fsspec URL)")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,person"')
    labels.add_argument("--labels-file", help="text file with one label a line")
    parser.add_argument("--template", action="append", default=None,
                        help=f'prompt template with {{}} for the label (repeatable; default "{DEFAULT_TEMPLATE}")')
    parser.add_argument("--top-k", type=positive_int, default=3, help="labels kept per image (default %(default)s)")
    parser.add_argument("--column", default="image_embedding", help="vector column (default %(default)s)")
    parser.add_argument("--batch-rows", type=positive_int, default=65_536,
                        help="rows read at a time (default %(default)s)")
    add_output_arguments(parser)
    add_storage_arguments(parser)
    add_query_model_arguments(parser)


def read_labels(args: argparse.Namespace, storage_options: dict) -> list[str]:
    """--labels or --labels-file -> at least two distinct, stripped labels."""
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
    else:
        try:
            with storage.open_input(args.labels_file, storage_options) as handle:
                data = handle.read()
        except FileNotFoundError:
            raise UsageError(f"--labels-file {args.labels_file} does not exist") from None
        labels = [line.strip() for line in storage.decode_utf8(data, args.labels_file, "--labels-file").splitlines()]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise UsageError("zero-shot classification needs at least two labels")
    if len(set(labels)) != len(labels):
        raise UsageError("labels must be distinct")
    return labels


def read_templates(args: argparse.Namespace) -> list[str]:
    templates = args.template or [DEFAULT_TEMPLATE]
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"--template {template!r} has no {{}} for the label")
    return templates


def prepare(args: argparse.Namespace) -> tuple[ClassifyConfig, dict, list[EmbeddingsPart]]:
    """Check every argument and input, encode the labels: (config without ledger, settings, parts)."""
    storage_options = storage_options_from_args(args)
    templates = read_templates(args)
    labels = read_labels(args, storage_options)
    inputs = resolve_embeddings(args.embeddings, args.column, "id", [], storage_options)
    spec = query_spec(args, inputs.manifest)
    clip = load_query_model(spec, inputs.dim, storage_options)
    top_k = min(args.top_k, len(labels))
    settings = {"embeddings": args.embeddings, "column": args.column, "labels": labels, "templates": templates,
                "top_k": top_k, "model": spec.model, "pretrained": spec.pretrained, "seed": spec.seed,
                "weights": clip.weights, "logit_scale": LOGIT_SCALE}
    config = ClassifyConfig(args.output, storage_options, args.column, inputs.dim, tuple(labels),
                            label_embeddings(clip, labels, templates), top_k, args.batch_rows, ledger=None)
    return config, settings, embeddings_parts(inputs)


def commit(out: OutputFolder, settings: dict) -> dict:
    """manifest.json, last: every labelled part (earlier runs' too), in part order."""
    parts = sorted((m for m in out.done_units().values()), key=lambda m: m["number"])
    entries = [{key: m[key] for key in ("path", "rows", "source", "skipped")} for m in parts]
    return out.commit({**settings, "version": FORMAT_VERSION, "parts": entries, "rows": sum(p["rows"] for p in entries),
                       "clipbeam_version": __version__})


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    watch = Stopwatch()
    options = beam_options(beam_args)
    config, settings, parts = prepare(args)
    with open_output(args.output, LABELS, settings, Mode.from_flags(args.overwrite), config.storage_options) as out:
        ran = run_parts(out, parts, options, "classify",
                        lambda ledger: ClassifyParts(dataclasses.replace(config, ledger=ledger)))
        if ran.code:
            return ran.code
        manifest = commit(out, settings)
    print_summary(f"clipbeam classify -> {args.output}", [
        ("labels", ", ".join(config.labels)), ("templates", len(settings["templates"])),
        ("parts", ran.summary(len(manifest["parts"]))),
        ("images", manifest["rows"]), ("seconds", f"{watch.seconds:.1f}")])
    return 0
