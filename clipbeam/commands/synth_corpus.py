"""clipbeam synth-corpus: write the synthetic shapes corpus ("a {color} {shape}") as webdataset tar shards.

64x64 images of one of 4 shapes in one of 6 colors on a light or dark gray
background, at a random position, size and rotation; see
clipbeam.models.shapes. The corpus is a pure function of --n, --seed and
--shard-size: the same arguments give byte-identical shards. Shards are drawn
by a Beam pipeline, one shard per element, and written atomically; corpus.json
is written last (folder format: clipbeam.layout.corpus). A rerun with the same
settings skips the shards that exist; other settings are refused (exit 2);
--overwrite redraws all, deleting only the shards this job wrote.
"""

from __future__ import annotations

import argparse
import logging

import apache_beam as beam

from clipbeam import __version__
from clipbeam.commands.argtypes import non_negative_int, positive_int
from clipbeam.commands.common import (
    Stopwatch,
    add_output_arguments,
    add_storage_arguments,
    beam_options,
    print_summary,
    run_pipeline,
    storage_options_from_args,
)
from clipbeam.layout import Mode, open_output
from clipbeam.layout.corpus import CORPUS
from clipbeam.models.shapes import COLORS, IMAGE_SIZE, SHAPES, class_prompts
from clipbeam.storage import join, list_names
from clipbeam.transforms.synth_shards import WriteShards, plan_shards

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser)
    parser.add_argument("--n", type=positive_int, required=True, help="number of samples")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="corpus seed (default %(default)s)")
    parser.add_argument("--shard-size", type=positive_int, default=1000,
                        help="samples per tar shard (default %(default)s)")
    add_storage_arguments(parser)


def _settings(args: argparse.Namespace) -> dict:
    return {"generator": "clipbeam.models.shapes", "n": args.n, "seed": args.seed, "shard_size": args.shard_size,
            "image_size": IMAGE_SIZE}


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    storage_options = storage_options_from_args(args)
    options = beam_options(beam_args)
    settings = _settings(args)
    shards = plan_shards(args.n, args.shard_size)
    clock = Stopwatch()
    with open_output(args.output, CORPUS, settings, Mode.from_flags(args.overwrite), storage_options) as out:
        out.claim([s.name for s in shards])
        existing = set(list_names(args.output, storage_options))
        pending = [s for s in shards if s.name not in existing]
        LOG.info("%d shards planned, %d already written, %d to draw", len(shards), len(shards) - len(pending),
                 len(pending))
        if pending:
            pipeline = beam.Pipeline(options=options)
            _ = pipeline | "Shards" >> beam.Create(pending) | "Draw" >> WriteShards(args.output, args.seed,
                                                                                     storage_options)
            code = run_pipeline(pipeline, "synth-corpus")
            if code:
                return code
        out.commit(dict(settings, clipbeam_version=__version__, shards=[s.name for s in shards],
                        files=[s.name for s in shards], colors=list(COLORS), shapes=list(SHAPES),
                        classes=class_prompts(), members=["png", "txt", "json"]))
    print_summary("clipbeam synth-corpus", [
        ("output", args.output),
        ("samples", args.n),
        ("shards", f"{len(shards)} ({len(pending)} drawn now)"),
        ("seed", args.seed),
        ("seconds", f"{clock.seconds:.1f}"),
    ])
    print(join(args.output, "{%05d..%05d}.tar" % (0, len(shards) - 1)))
    return 0
