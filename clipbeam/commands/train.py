"""clipbeam train {clip,vqgan}: train a small CLIP (contrastive) or VQGAN (reconstruction) on a corpus.

Reads any corpus `clipbeam embed` reads (webdataset shards, manifest tables,
image folders; any fsspec URL). One process, CPU or GPU; not a Beam pipeline:
training is one sequential loop. Writes into --output: checkpoints/last.pt
(rerunning the same command resumes from it; --overwrite starts over),
history.csv and loss.png (updated at every checkpoint), the trained model
(clip: MODEL.pt + MODEL.json, loadable with `--model MODEL --pretrained
OUT/MODEL.pt`; vqgan: vqgan.safetensors + vqgan.yaml, loadable with
`--vqgan OUT/vqgan.safetensors`), and train.json last. The folder format is
clipbeam.layout.training: a rerun with other settings is refused (exit 2),
--overwrite deletes only what earlier runs wrote, and a run that fails midway
exits 1 (rerun to resume).
"""

from __future__ import annotations

import argparse
import logging

from clipbeam import __version__
from clipbeam.commands.argtypes import at_least, non_negative_float, non_negative_int, positive_float, positive_int
from clipbeam.commands.common import (
    Stopwatch,
    add_storage_arguments,
    print_summary,
    report_unfinished,
    storage_options_from_args,
    unrecognized,
)
from clipbeam.corpus.plan import FORMATS, ManifestColumns
from clipbeam.errors import UsageError
from clipbeam.layout import Mode, open_output
from clipbeam.layout.training import TRAINING
from clipbeam.storage import get_fs

LOG = logging.getLogger(__name__)
FLAGS = {"inputs": "--corpus"}  # library field -> this command's flag, where they differ (argtypes.flag_message)


def _common(parser: argparse.ArgumentParser, batch_size: int, lr: float, weight_decay: float) -> None:
    data = parser.add_argument_group("corpus")
    data.add_argument("--corpus", action="append", required=True, metavar="URL",
                      help="tar shards, manifest tables or image folders, as for embed; repeat for several")
    data.add_argument("--format", default="auto", choices=FORMATS, help="corpus format (default: by suffix)")
    data.add_argument("--image-column", default=None, help="manifest column with image paths/URLs or bytes")
    data.add_argument("--caption-column", default=None, help="manifest column with captions")
    data.add_argument("--shuffle-buffer", type=positive_int, default=4096, help="records in the shuffle buffer")
    add_storage_arguments(parser)
    parser.add_argument("--output", required=True, help="output folder (any fsspec URL)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming from the output")
    loop = parser.add_argument_group("loop")
    length = loop.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps in all (default: --epochs)")
    length.add_argument("--epochs", type=positive_float, help="passes over the corpus (default 1)")
    loop.add_argument("--batch-size", type=at_least(2), default=batch_size,
                      help="samples per step (default %(default)s)")
    loop.add_argument("--lr", type=positive_float, default=lr, help="peak AdamW learning rate (default %(default)s)")
    loop.add_argument("--weight-decay", type=non_negative_float, default=weight_decay, help="(default %(default)s)")
    loop.add_argument("--warmup", type=non_negative_int, default=50, help="linear warm-up steps (default %(default)s)")
    loop.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")
    loop.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    loop.add_argument("--threads", type=non_negative_int, default=0,
                      help="CPU threads for torch (default 0: torch's choice; 1 is fastest on a busy machine)")
    loop.add_argument("--log-every", type=positive_int, default=20, help="steps between progress lines (default 20)")
    loop.add_argument("--save-every", type=positive_int, default=200, help="steps between checkpoints (default 200)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="{clip,vqgan}", parser_class=type(parser))
    sub.required = True
    clip = sub.add_parser("clip", help="contrastive training of an open_clip model")
    _common(clip, batch_size=128, lr=1e-3, weight_decay=0.1)
    clip.add_argument("--model", default="shapes-clip", help="open_clip architecture (default %(default)s)")
    clip.add_argument("--pretrained", default="none",
                      help="starting weights: none (seeded random), a checkpoint path, or a pretrained tag")
    clip.add_argument("--export-precision", default="fp32", choices=("fp32", "fp16"),
                      help="weight type in the written checkpoint (default fp32; fp16 halves the file)")
    clip.add_argument("--augment", default="crop", choices=("crop", "loop", "none"),
                      help="training images: crop (random resized crops, scale 0.9-1), loop (the generation loop's "
                           "cutouts: flips, affine and perspective warps, shrinking over gray), none "
                           "(default %(default)s)")
    vqgan = sub.add_parser("vqgan", help="train a taming-compatible VQGAN")
    _common(vqgan, batch_size=32, lr=1e-3, weight_decay=0.0)
    vqgan.add_argument("--config", default="shapes-vqgan", metavar="YAML_OR_NAME",
                       help="taming YAML of the model, or a preset name (default %(default)s)")
    vqgan.add_argument("--crop", type=positive_int, default=None,
                       help="train on random CROPxCROP windows (default: the config's resolution)")
    vqgan.add_argument("--restart-dead-codes", type=non_negative_int, default=20, metavar="N",
                       help="every N steps, re-seed codes no input used (0: never; default %(default)s)")
    vqgan.add_argument("--autoencoder-steps", type=non_negative_int, default=0, metavar="N",
                       help="first N steps without quantization, then seed the codebook from encoder outputs")
    vqgan.add_argument("--codebook-weight", type=non_negative_float, default=0.75,
                       help="extra weight of the codebook term on top of taming's 0.25 (default %(default)s)")
    vqgan.add_argument("--l2-weight", type=non_negative_float, default=0.0,
                       help="weight of a squared-error term beside the L1 loss; it makes small models learn "
                            "colors sooner (default %(default)s)")


def _vqgan_config(value: str, storage_options: dict):
    from clipbeam.models.train_vqgan import PRESETS, preset_config
    from clipbeam.models.vqgan import config_from_yaml

    if value in PRESETS:
        return preset_config(value)
    fs, path = get_fs(value, storage_options)
    if not fs.isfile(path):
        raise UsageError(f"--config {value} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    with fs.open(path, "rb") as handle:
        text = handle.read().decode("utf-8")
    try:
        return config_from_yaml(text)
    except ValueError as exc:
        raise UsageError(f"--config {value}: {exc}") from None


def _clip_task(args: argparse.Namespace, storage_options: dict, device: str, settings: dict):
    """(task factory, files it exports) for `train clip`, after checking the model."""
    from clipbeam.models.clip import ClipSpec, validate_spec

    spec = ClipSpec(args.model, args.pretrained, seed=args.seed, device=device, precision="fp32")
    validate_spec(spec, storage_options)
    settings.update(model=args.model, pretrained=args.pretrained, augment=args.augment)

    def build(start_step: int):
        from clipbeam.models.train_clip import ClipTask

        return ClipTask(spec, augment=args.augment, export_precision=args.export_precision,
                        storage_options=storage_options, settings=settings)

    return build, [f"{args.model}.pt", f"{args.model}.json"]


def _vqgan_task(args: argparse.Namespace, storage_options: dict, device: str, settings: dict):
    """(task factory, files it exports) for `train vqgan`, after checking the config and crop."""
    from clipbeam.models.train_vqgan import WEIGHTS_NAME

    config = _vqgan_config(args.config, storage_options)
    if config.gumbel:
        raise UsageError("--config: training a GumbelVQ is not supported; use a VQModel config")
    crop = args.crop or int(config.ddconfig["resolution"])
    if crop % config.factor or crop > int(config.ddconfig["resolution"]) or crop <= 0:
        raise UsageError(f"--crop must be a positive multiple of {config.factor}, at most the config's "
                         f"resolution {config.ddconfig['resolution']}")
    settings.update(config=config.to_yaml_dict(), crop=crop, autoencoder_steps=args.autoencoder_steps)

    def build(start_step: int):
        from clipbeam.models.train_vqgan import VQGANTask

        return VQGANTask(config, device, crop=crop, restart_every=args.restart_dead_codes,
                         codebook_weight=args.codebook_weight, autoencoder_steps=args.autoencoder_steps,
                         l2_weight=args.l2_weight, start_step=start_step, settings=settings)

    return build, [WEIGHTS_NAME, WEIGHTS_NAME.rsplit(".", 1)[0] + ".yaml"]


def _total_steps(args: argparse.Namespace, source) -> int:
    if args.steps is not None:
        return args.steps
    usable = source.count()
    per_epoch = usable // args.batch_size
    if per_epoch == 0:
        raise UsageError(f"the corpus has {usable} usable samples, fewer than --batch-size {args.batch_size}")
    total_steps = max(1, round((args.epochs or 1.0) * per_epoch))
    LOG.info("%d usable samples: %d steps per epoch, %d steps in all", usable, per_epoch, total_steps)
    return total_steps


def _resume_step(args: argparse.Namespace, loop) -> int:
    """The step the output's checkpoint reached (0 without one or with --overwrite).

    Read before the output is opened: a last.pt that holds more than weights
    is refused (one line, exit 2) with nothing in the folder touched.
    """
    from clipbeam.models import train_common

    if args.overwrite or not train_common.checkpoint_exists(args.output, loop.storage_options):
        return 0
    return train_common.read_checkpoint_step(args.output, loop.storage_options)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    import torch

    from clipbeam.corpus.train_data import CorpusSamples
    from clipbeam.models import train_common
    from clipbeam.models.clip import resolve_device

    if beam_args:
        raise unrecognized(beam_args)
    storage_options = storage_options_from_args(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"kind": args.kind, "corpus": sorted(args.corpus), "format": args.format,
                "batch_size": args.batch_size, "seed": args.seed}
    task_for = _clip_task if args.kind == "clip" else _vqgan_task
    build, exported = task_for(args, storage_options, device, settings)
    source = CorpusSamples(args.corpus, args.format, storage_options, need_caption=args.kind == "clip",
                           shuffle_buffer=args.shuffle_buffer,
                           columns=ManifestColumns(args.image_column, args.caption_column))
    total_steps = _total_steps(args, source)
    loop = train_common.LoopConfig(
        output=args.output, total_steps=total_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        weight_decay=args.weight_decay, warmup_steps=min(args.warmup, max(0, total_steps - 1)),
        log_every=args.log_every, save_every=args.save_every, storage_options=storage_options)
    clock = Stopwatch()
    start = _resume_step(args, loop)
    with open_output(args.output, TRAINING, settings, Mode.from_flags(args.overwrite), storage_options) as out:
        out.claim([train_common.CHECKPOINT, train_common.HISTORY, train_common.PLOT, *exported])
        try:
            summary = train_common.run_training(build(start), source, loop, device)
        except Exception as exc:  # one line on stderr; the checkpoint stays to resume from
            return report_unfinished("train", exc)
        if source.skipped:
            LOG.warning("records skipped: %s", ", ".join(f"{k}: {v}" for k, v in source.skipped.items()))
        out.commit(dict(summary, settings=settings, lr=args.lr, weight_decay=args.weight_decay,
                        warmup=loop.warmup_steps, total_steps=total_steps, device=device,
                        clipbeam_version=__version__, skipped=dict(source.skipped)))
    _print_summary(args, summary, clock)
    return 0


def _print_summary(args: argparse.Namespace, summary: dict, clock: Stopwatch) -> None:
    final = summary["final"]
    print_summary(f"clipbeam train {args.kind}", [
        ("output", args.output),
        ("steps", summary["steps"]),
        ("final loss", f"{final.get('loss', float('nan')):.4f}"),
        ("decode failures", summary["decode_failures"]),
        ("seconds (this run)", f"{clock.seconds:.1f}"),
        ("wrote", ", ".join(summary["written"])),
    ])
    for url in summary["written"]:
        print(url)
