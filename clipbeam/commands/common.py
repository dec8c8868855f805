"""Options and helpers that every pipeline shares.

Beam's own options pass through unchanged; the only default we change is the
runner (the DirectRunner, because Beam's default first tries to download the
Prism runner binary).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import TYPE_CHECKING

from clipbeam.errors import UsageError, first_line
from clipbeam.models.clip import ClipSpec
from clipbeam.storage import absolute_url, parse_storage_options

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

LOG = logging.getLogger(__name__)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help='fsspec filesystem options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}\'',
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, type=absolute_url, help="output folder (any fsspec URL)")
    parser.add_argument(
        "--overwrite", action="store_true", help="redo everything instead of resuming into an existing output"
    )


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "ViT-B-32",
                        default_pretrained: str = "none") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, help="open_clip architecture (default %(default)s)")
    group.add_argument(
        "--pretrained",
        default=default_pretrained,
        help="pretrained tag (downloads), checkpoint path or URL, or 'none' for seeded random weights",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for --pretrained none (default 0)")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    group.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))


ACCELERATOR_FLAGS = ("install-nvidia-driver", "use_nvidia_mps")


def add_accelerator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accelerator",
        default=None,
        metavar="HINT",
        help='GPU for the inference steps only, as a Beam resource hint, e.g. '
             '"type:nvidia-l4;count:1;install-nvidia-driver" (Dataflow reads it; other runners may ignore it)',
    )


def check_accelerator(value: str | None) -> None:
    """Reject a malformed accelerator hint before any work starts (Beam passes it through unchecked)."""
    if value is None:
        return
    fields = [f.strip() for f in value.split(";") if f.strip()]
    keys = {}
    for item in fields:
        key, sep, val = item.partition(":")
        if not sep:
            if item not in ACCELERATOR_FLAGS:
                raise UsageError(f"--accelerator: unknown flag {item!r} (known: {', '.join(ACCELERATOR_FLAGS)})")
            continue
        keys[key] = val
    if not keys.get("type"):
        raise UsageError(f"--accelerator {value!r} names no type (e.g. type:nvidia-l4;count:1;install-nvidia-driver)")
    count = keys.get("count", "1")
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"--accelerator: count must be a positive integer, not {count!r}")


LOCAL_RUNNERS = ("directrunner", "direct", "bundlebaseddirectrunner", "switchingdirectrunner", "prismrunner",
                 "prism")


def runner_is_local(beam_args: list[str]) -> bool:
    """Whether the pipeline's workers run on this machine (a Direct/Prism runner, or a LOOPBACK environment),
    so that what this process downloads or checks is what they will see."""
    values: dict[str, str] = {}
    for i, arg in enumerate(beam_args):
        for flag in ("--runner", "--environment_type"):
            if arg == flag and i + 1 < len(beam_args):
                values[flag] = beam_args[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    runner = values.get("--runner", "DirectRunner").lower()
    return runner in LOCAL_RUNNERS or values.get("--environment_type", "").upper() == "LOOPBACK"


def clip_spec_from_args(args: argparse.Namespace) -> ClipSpec:
    return ClipSpec(
        model=args.model, pretrained=args.pretrained, seed=args.seed, device=args.device, precision=args.precision
    )


def storage_options_from_args(args: argparse.Namespace) -> dict:
    return parse_storage_options(getattr(args, "storage_options", None))


def _all_option_classes(cls=None):
    if cls is None:  # Beam is imported when a pipeline is built, not by every command (index may need none)
        from apache_beam.options.pipeline_options import PipelineOptions

        cls = PipelineOptions
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_option_classes(sub)


def beam_option_parser() -> argparse.ArgumentParser:
    """An argparse parser that knows every flag of every Beam options class."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen = set()
    for cls in _all_option_classes():
        if cls in seen:
            continue
        seen.add(cls)
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # the same flag defined by two classes
    return parser


def unknown_beam_args(beam_args: list[str]) -> list[str]:
    """The pass-through arguments that no Beam options class takes: flags (typos, ours misspelt) and
    stray words, such as the file names a shell expands an unquoted glob into (Beam would only log
    "Discarding unparseable args" and run on the first file)."""
    _, unknown = beam_option_parser().parse_known_args(beam_args)
    return list(unknown)


def unrecognized(arguments: list[str]) -> UsageError:
    """The one-line error for arguments no option takes, with a hint where they look like glob matches."""
    shown = " ".join(arguments[:5]) + (" ..." if len(arguments) > 5 else "")
    hint = ("; if your shell expanded a glob into these, quote it (--input 'corpus/*.tar')"
            if any(not a.startswith("-") and ("/" in a or "." in a) for a in arguments) else "")
    return UsageError(f"unrecognized arguments: {shown}{hint}")


def beam_options(beam_args: list[str], **overrides) -> PipelineOptions:
    """PipelineOptions from the pass-through arguments, DirectRunner by default."""
    from apache_beam.options.pipeline_options import PipelineOptions

    unknown = unknown_beam_args(beam_args)
    if unknown:
        raise unrecognized(unknown)
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = ["--runner", "DirectRunner"] + args
    return PipelineOptions(args, **overrides)


EXIT_UNFINISHED = 1


def run_pipeline(pipeline, command: str, watch: contextlib.AbstractContextManager | None = None,
                 results: list | None = None) -> int:
    """Run a built Beam pipeline to the end; 0, or EXIT_UNFINISHED after one line on stderr.

    A worker failure (a lost worker, a full disk, a lease taken over) is not a
    bad argument and not a bug to show as a traceback: every job exits 1 and
    says that rerunning the same command resumes. `watch` (e.g. a progress
    display) runs while the pipeline does; the finished PipelineResult goes on
    `results` when given (for its metrics).
    """
    try:
        with watch or contextlib.nullcontext():
            result = pipeline.run()
            result.wait_until_finish()
        if results is not None:
            results.append(result)
    except Exception as exc:
        return report_unfinished(command, exc)
    return 0


def report_unfinished(command: str, exc: Exception) -> int:
    """One line on stderr for a run that stopped midway (no traceback); returns EXIT_UNFINISHED.

    For jobs that are not Beam pipelines (train) as well as for run_pipeline.
    """
    LOG.error("%s failed: %s", command, exc, exc_info=LOG.isEnabledFor(logging.DEBUG))
    first = first_line(exc)
    sys.stderr.write(f"clipbeam {command}: the run did not finish ({exc.__class__.__name__}: {first}); "
                     "rerun the same command to resume\n")
    return EXIT_UNFINISHED


class Stopwatch:
    """Wall seconds since creation."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


def print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    """A short aligned summary on stderr (stdout stays free for machine output)."""
    width = max(len(k) for k, _ in rows)
    sys.stderr.write(f"{title}\n")
    for key, value in rows:
        sys.stderr.write(f"  {key.ljust(width)}  {value}\n")


def add_exclude_arguments(parser: argparse.ArgumentParser) -> None:
    """`--exclude DEDUP [--threshold T]`: the jobs that read embeddings (index, export) leave out what a
    dedup output removes."""
    from clipbeam.commands.argtypes import unit_interval

    parser.add_argument("--exclude", default=None, type=absolute_url, metavar="DEDUP",
                        help="a clipbeam dedup output of these embeddings: leave out the samples it removes")
    parser.add_argument("--threshold", type=unit_interval, default=None,
                        help="with --exclude: the dedup threshold whose removed samples are left out "
                             "(default: the output's only threshold)")


def excluded_samples(args: argparse.Namespace, inputs, storage_options: dict):
    """The layout.dedup.ExcludedSamples of --exclude (none without it); --threshold alone is refused."""
    from clipbeam.layout.dedup import ExcludedSamples, removed_samples

    if args.threshold is not None and not args.exclude:
        raise UsageError("--threshold chooses the duplicates of --exclude; give --exclude DEDUP too")
    if not args.exclude:
        return ExcludedSamples(None, frozenset())
    return removed_samples(args.exclude, args.threshold, inputs, storage_options)
