"""Convert a taming VQGAN .ckpt into .safetensors once, without pytorch_lightning.

The Lightning checkpoint is read by the restricted unpickler (no pickled code
runs), checked key by key against its YAML config, and only the model weights
are written: `loss.*`, optimizer and scheduler state are dropped and Net2Net
prefixes stripped. The YAML is written beside the output (OUT.yaml) and also
embedded in the safetensors metadata, so `clipbeam generate --vqgan
OUT.safetensors` needs nothing else. Not a Beam pipeline: one file, one process.
"""

from __future__ import annotations

import argparse

from clipbeam.commands.common import (
    Stopwatch,
    add_storage_arguments,
    print_summary,
    storage_options_from_args,
    unrecognized,
)
from clipbeam.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="taming .ckpt (or .pt, .safetensors) file or URL")
    parser.add_argument("out", metavar="OUT.safetensors", help="where to write the weights (OUT.yaml beside it)")
    parser.add_argument("--config", metavar="YAML", help="the checkpoint's taming config, if not beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_storage_arguments(parser)


def _config_beside_output(out: str, config, overwrite: bool, storage_options: dict) -> bool:
    """Whether the YAML beside the output already holds this config and can stay as it is.

    A downloaded taming checkpoint usually sits beside its own `model.yaml`,
    which is also the name the output's YAML gets: that file is reused. A YAML
    holding another config is replaced only with --overwrite.
    """
    from clipbeam.models.vqgan import config_from_yaml
    from clipbeam.models.vqgan_checkpoint import config_path_for
    from clipbeam.storage import get_fs

    url = config_path_for(out)
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return False
    try:
        with fs.open(path, "rb") as handle:
            same = config_from_yaml(handle.read().decode("utf-8")).to_yaml_dict() == config.to_yaml_dict()
    except (ValueError, UnicodeDecodeError):
        same = False
    if not same and not overwrite:
        raise UsageError(f"{url} exists and holds another config (pass --overwrite to replace it)")
    return same


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from clipbeam.models.vqgan_checkpoint import (
        check_state_matches,
        extract_state_dict,
        is_safetensors,
        load_raw_checkpoint,
        read_state_dict,
        resolve_vqgan,
        save_state_dict,
    )
    from clipbeam.storage import get_fs

    if beam_args:
        raise unrecognized(beam_args)
    clock = Stopwatch()
    storage_options = storage_options_from_args(args)
    if not is_safetensors(args.out):
        raise UsageError(f"output {args.out} must end in .safetensors")
    fs, out_path = get_fs(args.out, storage_options)
    if fs.exists(out_path) and not args.overwrite:
        raise UsageError(f"{args.out} exists (pass --overwrite to replace it)")
    source = resolve_vqgan(args.checkpoint, args.config, storage_options, verify=False)
    keep_config = _config_beside_output(args.out, source.config, args.overwrite, storage_options)
    if is_safetensors(source.checkpoint):
        state, dropped = read_state_dict(source.checkpoint, storage_options), {}
    else:
        try:
            state, dropped = extract_state_dict(load_raw_checkpoint(source.checkpoint, storage_options))
        except ValueError as exc:
            raise UsageError(f"cannot read VQGAN checkpoint {source.checkpoint}: {exc}") from None
    check_state_matches(source.config, {k: list(v.shape) for k, v in state.items()}, source.checkpoint,
                        source.config_origin)
    weights_url, config_url = save_state_dict(state, source.config, args.out, storage_options,
                                              write_config=not keep_config)
    parameters = sum(v.numel() for v in state.values())
    print_summary("clipbeam convert-vqgan", [
        ("checkpoint", source.checkpoint),
        ("config", source.config_origin),
        ("kind", "GumbelVQ" if source.config.gumbel else "VQModel"),
        ("kept", f"{len(state)} tensors, {parameters / 1e6:.2f}M parameters"),
        ("dropped", ", ".join(f"{k} ({v})" for k, v in dropped.items()) or "nothing"),
        ("weights", f"{weights_url} ({fs.size(out_path) / 1e6:.1f} MB)"),
        ("config kept" if keep_config else "config written", config_url),
        ("seconds", f"{clock.seconds:.1f}"),
    ])
    return 0
