"""clipbeam synth-corpus: write the synthetic shapes corpus ("a {color} {shape}") as webdataset tar shards.

64x64 images of one of 4 shapes in one of 6 colors on a light or dark gray
background, at a random position, size and rotation; see
clipbeam.models.shapes. The corpus is a pure function of --n, --seed and
--shard-size: the same arguments give byte-identical shards. Shards are drawn
by a Beam pipeline, one shard per element, and written atomically; corpus.json
is written last. A rerun skips the shards that exist; --overwrite redraws all.
"""

from __future__ import annotations

import argparse
import logging

import apache_beam as beam

from clipbeam import __version__
from clipbeam.errors import UsageError
from clipbeam.models.shapes import COLORS, IMAGE_SIZE, SHAPES, class_prompts
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    storage_options_from_args,
)
from clipbeam.storage import check_writable, get_fs, join, read_json, write_json
from clipbeam.transforms.synth_shards import ShardSpec, plan_shards, write_shard

LOG = logging.getLogger(__name__)

CORPUS_FILE = "corpus.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser)
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default %(default)s)")
    add_storage_arguments(parser)


def _settings(args: argparse.Namespace) -> dict:
    return {"generator": "clipbeam.models.shapes", "n": args.n, "seed": args.seed, "shard_size": args.shard_size,
            "image_size": IMAGE_SIZE}


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, seed: int, storage_options: dict) -> None:
        self.output = output
        self.seed = seed
        self.storage_options = storage_options

    def process(self, spec: ShardSpec):
        url = write_shard(self.output, spec, self.seed, self.storage_options)
        LOG.info("wrote %s (%d samples)", url, spec.stop - spec.start)
        yield spec.index


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.n <= 0:
        raise UsageError("--n must be positive")
    if args.shard_size <= 0:
        raise UsageError("--shard-size must be positive")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    storage_options = storage_options_from_args(args)
    options = beam_options(beam_args)
    settings = _settings(args)
    fs, root = get_fs(args.output, storage_options)
    record_url = join(args.output, CORPUS_FILE)
    if not args.overwrite and fs.exists(join(root, CORPUS_FILE)):
        previous = read_json(record_url, storage_options)
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise UsageError(f"{args.output} holds another corpus ({what}); pass --overwrite or another --output")
    check_writable(args.output, storage_options)

    shards = plan_shards(args.n, args.shard_size)
    if args.overwrite:
        for path in fs.glob(join(root, "*.tar")) + fs.glob(join(root, CORPUS_FILE)):
            fs.rm(path)
    existing = {p.rsplit("/", 1)[-1] for p in fs.glob(join(root, "*.tar"))}
    pending = [s for s in shards if s.name not in existing]
    LOG.info("%d shards planned, %d already written, %d to draw", len(shards), len(shards) - len(pending),
             len(pending))
    clock = Stopwatch()
    if pending:
        with beam.Pipeline(options=options) as pipeline:
            _ = (
                pipeline
                | "Shards" >> beam.Create(pending)
                | "Spread" >> beam.Reshuffle()
                | "Draw" >> beam.ParDo(_WriteShard(args.output, args.seed, storage_options))
            )
    record = dict(settings, clipbeam_version=__version__, shards=[s.name for s in shards],
                  colors=list(COLORS), shapes=list(SHAPES), classes=class_prompts(),
                  members=["png", "txt", "json"])
    write_json(record_url, record, storage_options)
    print_summary("clipbeam synth-corpus", [
        ("output", args.output),
        ("samples", args.n),
        ("shards", f"{len(shards)} ({len(pending)} drawn now)"),
        ("seed", args.seed),
        ("seconds", f"{clock.seconds:.1f}"),
    ])
    print(join(args.output, "{%05d..%05d}.tar" % (0, len(shards) - 1)))
    return 0
