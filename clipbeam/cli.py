"""The `clipbeam` command: one sub-command per job.

Each job lives in its own module under clipbeam.commands and exposes
`add_arguments(parser)` and `run(args, beam_args) -> int`. Modules are imported
only when their command runs, so `clipbeam --help` stays fast. Arguments that
argparse does not know are handed to Beam unchanged (`--runner`,
`--direct_num_workers`, `--project`, ...).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipbeam import __version__
from clipbeam.errors import LeaseLost, UsageError

COMMANDS: list[tuple[str, str, str]] = [
    ("embed", "clipbeam.commands.embed", "image-text corpora -> CLIP embeddings in Parquet"),
    ("index", "clipbeam.commands.index_build", "embeddings -> sharded FAISS index with measured recall"),
    ("search", "clipbeam.commands.search", "query a sharded index with text, an image or vectors"),
    ("serve", "clipbeam.commands.serve", "search an index from a browser or over HTTP"),
    ("classify", "clipbeam.commands.classify", "zero-shot labels from stored image embeddings"),
    ("export", "clipbeam.commands.export", "embeddings -> clip-retrieval / autofaiss layout"),
    ("dedup", "clipbeam.commands.dedup", "exact and near-duplicate groups over embeddings"),
    ("generate", "clipbeam.commands.generate", "render prompt lists with VQGAN+CLIP"),
    ("convert-vqgan", "clipbeam.commands.convert_vqgan", "taming .ckpt -> .safetensors, without pytorch_lightning"),
    ("synth-corpus", "clipbeam.commands.synth_corpus", "write a synthetic shapes corpus as webdataset shards"),
    ("train", "clipbeam.commands.train", "train a small CLIP or VQGAN on a corpus"),
]


# Warnings that Beam logs on every start-up and that say nothing about the job.
_NOISE = ("apitools not found", "Resource module is not available", "No pretrained weights loaded for model")


class _QuietNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="clipbeam", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"clipbeam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, _module, help_text in COMMANDS:
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    names = {name: module for name, module, _ in COMMANDS}
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is None or argv[first] not in names:
        if first is not None:
            top.error(f"unknown command {argv[first]!r} (choose from {', '.join(names)})")
        top.parse_args(argv)
        top.print_help()
        return 2
    top_args = top.parse_args(argv[:first])
    command = argv[first]
    logging.basicConfig(
        level=logging.DEBUG if top_args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Our own INFO lines are useful; Beam's and open_clip's are noise at INFO.
    logging.getLogger("clipbeam").setLevel(logging.DEBUG if top_args.verbose else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietNoise())
    module = importlib.import_module(names[command])
    parser = _OneLineParser(prog=f"clipbeam {command}", description=module.__doc__.splitlines()[0])
    module.add_arguments(parser)
    try:
        args, beam_args = parser.parse_known_args(argv[first + 1:])
    except SystemExit as exc:  # --help (0), or a bad argument already reported as one line (2)
        return int(exc.code or 0)
    try:
        return int(module.run(args, beam_args) or 0)
    except UsageError as exc:
        from clipbeam.commands.argtypes import flag_message

        sys.stderr.write(f"clipbeam {command}: error: {flag_message(exc, getattr(module, 'FLAGS', None))}\n")
        return 2
    except LeaseLost as exc:  # another run took the output over: this one stops before committing anything
        from clipbeam.commands.common import report_unfinished

        return report_unfinished(command, exc)
    except KeyboardInterrupt:
        sys.stderr.write(f"clipbeam {command}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
