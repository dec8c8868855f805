"""Reading and writing VQGAN checkpoints without taming or pytorch_lightning.

taming's .ckpt files are Lightning 1.0 checkpoints: a torch.save pickle whose
callback state is keyed by Lightning *classes*, so a plain `torch.load` fails
without pytorch_lightning installed, `weights_only=True` refuses them, and
`weights_only=False` would run any callable the pickle names. Here they are
read by a restricted unpickler: tensor-rebuild functions, storages and plain
containers are allowed, Lightning/taming/omegaconf globals become inert
stand-in classes that never run code, and every other global is refused.

Only the model weights are kept: `state_dict`, with `first_stage_model.`
stripped (Net2Net transformers), and `loss.*` (LPIPS, discriminator), the
optimizer and scheduler state dropped. .safetensors files (written by
`save_vqgan` / `clipbeam convert-vqgan`) load without any pickle at all.

A checkpoint's config is a taming YAML: given explicitly, found beside the
checkpoint (same name, .yaml), or embedded in a clipbeam .safetensors file.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import logging
import pickle
import struct
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipbeam.errors import FieldError, UsageError
from clipbeam.models.torch_files import refuse_torchscript
from clipbeam.models.vqgan import VQGANConfig, VQModel, build_vqgan, config_from_dict, config_from_yaml, config_to_yaml

LOG = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# name -> checkpoint file under clipbeam/assets (its YAML config beside it).
SHIPPED_VQGANS: dict[str, str] = {
    "shapes": "shapes-vqgan.safetensors",  # trained on the synthetic shapes corpus; see assets/MODELS.md
}

CONFIG_METADATA_KEY = "clipbeam.vqgan_config"
DROPPED_PREFIXES = ("loss.", "cond_stage_model.", "transformer.")
FIRST_STAGE_PREFIX = "first_stage_model."

# Modules whose classes a taming checkpoint may reference; their globals become inert stand-ins.
FOREIGN_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "taming", "omegaconf", "torchmetrics")

_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class InertStandIn:
    """Stands in for a foreign (Lightning, taming, omegaconf) class: takes any arguments, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertStandIn":
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    # Instances of foreign dict/list subclasses (Lightning's AttributeDict) are filled item by item.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_list", []).extend(values)


_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    """One distinct inert class per foreign global, so that classes used as dict keys stay distinct."""
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (InertStandIn,), {"__module__": f"clipbeam.inert.{module}"})
    return _STAND_INS[key]


def _is_foreign(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in FOREIGN_MODULES)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell some Python 3 names the Python 2 way (__builtin__, copy_reg).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if _is_foreign(module):
            return _stand_in(module, name)
        raise RefusedGlobal(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load wraps `pickle_module.Unpickler` (adding storage handling) and calls
# `pickle_module.load` for legacy headers: both must be the restricted ones.
restricted_pickle = types.ModuleType("clipbeam_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.__dict__["UnpicklingError"] = pickle.UnpicklingError


@dataclass(frozen=True)
class VQGANSource:
    """Where a VQGAN's weights and config come from; picklable, so it travels to Beam workers."""

    checkpoint: str  # path or fsspec URL
    config: VQGANConfig
    config_origin: str  # a path/URL, or "embedded" for safetensors metadata
    name: str  # as the user gave it (a path or a shipped name)


def _fs(url: str, storage_options: dict | None):
    from clipbeam.storage import get_fs

    return get_fs(url, storage_options)


def is_safetensors(url: str) -> bool:
    return url.lower().endswith(".safetensors")


def load_raw_checkpoint(url: str, storage_options: dict | None = None) -> Any:
    """Unpickle a torch/Lightning checkpoint with the restricted unpickler.

    Raises UsageError when the pickle names any callable outside the allow-list
    (nothing it names is ever called) or the file is not a torch checkpoint.
    """
    fs, path = _fs(url, storage_options)
    local = "://" not in url or url.startswith("file://")
    try:
        if local and zipfile.is_zipfile(path):
            refuse_torchscript(path, url)  # torch.load would hand a TorchScript archive to torch.jit.load
            try:  # mmap: validating a 1 GB checkpoint's keys should not read 1 GB
                return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False,
                                  mmap=True)
            except RuntimeError:
                LOG.debug("mmap load of %s failed; reading it whole", url)
        with fs.open(path, "rb") as handle:
            data = io.BytesIO(handle.read())
        refuse_torchscript(data, url)
        return torch.load(data, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobal as exc:
        raise UsageError(
            f"refusing to load {url}: its pickle references {exc.qualname}, which is not a tensor, a plain "
            "container or a Lightning/taming class (loading it could run code)"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"cannot read VQGAN checkpoint {url}: {type(exc).__name__}: {exc}") from None


def extract_state_dict(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Model weights from a loaded checkpoint, plus counts of what was dropped.

    Accepts a Lightning checkpoint (uses its `state_dict`) or a bare state dict.
    Net2Net checkpoints keep only `first_stage_model.*`, with the prefix removed.
    """
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise ValueError("no state_dict in checkpoint")
    dropped: dict[str, int] = {}
    if any(str(k).startswith(FIRST_STAGE_PREFIX) for k in state):
        other = sum(1 for k in state if not str(k).startswith(FIRST_STAGE_PREFIX))
        if other:
            dropped["not first_stage_model."] = other
        state = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in DROPPED_PREFIXES if key.startswith(p)), None)
        if prefix:
            dropped[prefix + "*"] = dropped.get(prefix + "*", 0) + 1
        elif isinstance(value, torch.Tensor):
            out[key] = value
        else:
            dropped["non-tensor"] = dropped.get("non-tensor", 0) + 1
    if isinstance(checkpoint, dict) and checkpoint.get("optimizer_states"):
        dropped["optimizer_states"] = len(checkpoint["optimizer_states"])
    return out, dropped


def read_safetensors_header(url: str, storage_options: dict | None = None) -> tuple[dict[str, list[int]], dict]:
    """Tensor shapes and metadata of a .safetensors file, reading only its header."""
    fs, path = _fs(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error) as exc:
        raise UsageError(f"cannot read safetensors file {url}: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    return {k: list(v["shape"]) for k, v in header.items()}, metadata


def read_state_dict(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a .ckpt/.pt/.pth or .safetensors file (loss/optimizer dropped, prefixes stripped)."""
    if is_safetensors(url):
        import safetensors.torch

        fs, path = _fs(url, storage_options)
        try:
            if "://" not in url or url.startswith("file://"):
                state = safetensors.torch.load_file(path, device="cpu")
            else:
                with fs.open(path, "rb") as handle:
                    state = safetensors.torch.load(handle.read())
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise UsageError(f"cannot read safetensors file {url}: {exc}") from None
        return extract_state_dict(state)[0]
    try:
        return extract_state_dict(load_raw_checkpoint(url, storage_options))[0]
    except ValueError as exc:
        raise UsageError(f"cannot read VQGAN checkpoint {url}: {exc}") from None


def check_state_matches(config: VQGANConfig, shapes: dict[str, list[int]], checkpoint: str, origin: str) -> None:
    """Raise UsageError unless the checkpoint's keys and shapes are exactly those of the config's model."""
    expected = {k: list(v.shape) for k, v in build_vqgan(config, "meta").state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != list(shapes[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shapes differ (e.g. {k}: checkpoint {list(shapes[k])}, config {expected[k]})")
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    raise UsageError(f"VQGAN config {origin} does not match checkpoint {checkpoint}: {'; '.join(parts)}")


def state_shapes(url: str, storage_options: dict | None = None) -> dict[str, list[int]]:
    """Key -> shape of a checkpoint's model weights (safetensors: from the header only)."""
    if is_safetensors(url):
        return read_safetensors_header(url, storage_options)[0]
    return {k: list(v.shape) for k, v in read_state_dict(url, storage_options).items()}


def _config_candidates(url: str) -> list[str]:
    """The YAML names beside a checkpoint: same name, .yaml or .yml."""
    stem = url.rsplit(".", 1)[0] if "." in url.rsplit("/", 1)[-1] else url
    return [stem + ".yaml", stem + ".yml"]


def _read_text(url: str, storage_options: dict | None) -> str:
    from clipbeam.storage import decode_utf8

    fs, path = _fs(url, storage_options)
    with fs.open(path, "rb") as handle:
        return decode_utf8(handle.read(), url, "VQGAN config")


def _parse_config(text: str, origin: str) -> VQGANConfig:
    try:
        return config_from_yaml(text)
    except ValueError as exc:
        raise UsageError(f"{origin}: {exc}") from None


def find_config(checkpoint: str, storage_options: dict | None = None) -> tuple[VQGANConfig, str]:
    """The config for a checkpoint without an explicit one: beside it, or embedded in safetensors."""
    fs, _ = _fs(checkpoint, storage_options)
    for candidate in _config_candidates(checkpoint):
        if fs.exists(_fs(candidate, storage_options)[1]):
            return _parse_config(_read_text(candidate, storage_options), candidate), candidate
    parent = checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else "."
    if parent.rsplit("/", 1)[-1] == "checkpoints":
        configs = fs.glob(_fs(parent.rsplit("/", 1)[0] + "/configs/*-project.yaml", storage_options)[1])
        if len(configs) == 1:
            from clipbeam.storage import unstrip

            url = unstrip(fs, checkpoint, configs[0])
            return _parse_config(_read_text(url, storage_options), url), url
    if is_safetensors(checkpoint):
        _, metadata = read_safetensors_header(checkpoint, storage_options)
        if CONFIG_METADATA_KEY in metadata:
            try:
                return config_from_dict(json.loads(metadata[CONFIG_METADATA_KEY])), "embedded"
            except ValueError as exc:
                raise UsageError(f"{checkpoint}: embedded config: {exc}") from None
    raise FieldError(
        "vqgan_config", f"no config for VQGAN checkpoint {checkpoint}: put its YAML beside it as "
        f"{_config_candidates(checkpoint)[0].rsplit('/', 1)[-1]} or pass {{field}}"
    )


def resolve_vqgan(path_or_name: str, config: str | None = None, storage_options: dict | None = None,
                  verify: bool = True) -> VQGANSource:
    """Find a VQGAN's checkpoint and config and (by default) check that they match, key by key.

    `path_or_name` is a path/URL or a name in SHIPPED_VQGANS. Raises UsageError
    for a missing checkpoint, a missing or malformed config, or a mismatch.
    """
    if path_or_name in SHIPPED_VQGANS:
        checkpoint = str(ASSETS_DIR / SHIPPED_VQGANS[path_or_name])
    else:
        checkpoint = path_or_name
    try:
        fs, path = _fs(checkpoint, storage_options)
        ok = fs.isfile(path)
    except Exception as exc:
        raise UsageError(f"cannot open VQGAN checkpoint {checkpoint}: {exc}") from None
    if not ok:
        known = f" (shipped names: {', '.join(sorted(SHIPPED_VQGANS))})" if SHIPPED_VQGANS else ""
        raise UsageError(f"VQGAN checkpoint {path_or_name} does not exist{known}")
    if config is not None:
        try:
            text = _read_text(config, storage_options)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read VQGAN config {config}: {exc}") from None
        parsed, origin = _parse_config(text, config), config
    else:
        parsed, origin = find_config(checkpoint, storage_options)
    if verify:
        check_state_matches(parsed, state_shapes(checkpoint, storage_options), checkpoint, origin)
    return VQGANSource(checkpoint=checkpoint, config=parsed, config_origin=origin, name=path_or_name)


def load_vqgan(source: VQGANSource, device: str = "cpu", storage_options: dict | None = None) -> VQModel:
    """Build the model from the config and load the weights strictly; eval mode, no gradients on weights."""
    state = read_state_dict(source.checkpoint, storage_options)
    check_state_matches(source.config, {k: list(v.shape) for k, v in state.items()}, source.checkpoint,
                        source.config_origin)
    model = build_vqgan(source.config, "meta")  # no random init of weights that are replaced anyway
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def config_path_for(weights_url: str) -> str:
    """The YAML that `save_vqgan` writes beside a .safetensors file (and `find_config` finds)."""
    return _config_candidates(weights_url)[0]


def save_state_dict(state: dict[str, torch.Tensor], config: VQGANConfig, url: str,
                    storage_options: dict | None = None, write_config: bool = True) -> tuple[str, str]:
    """Write weights as .safetensors (config embedded in its metadata) and the YAML beside it.

    write_config=False keeps a YAML that is already there (the caller checked that it holds this config).
    """
    import safetensors.torch

    from clipbeam import __version__
    from clipbeam.storage import atomic_open

    if not is_safetensors(url):
        raise UsageError(f"VQGAN output {url} must end in .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(config.to_yaml_dict()),
        "clipbeam.version": __version__,
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    config_url = config_path_for(url)
    if write_config:
        with atomic_open(config_url, "wb", storage_options) as handle:
            handle.write(config_to_yaml(config).encode("utf-8"))
    with atomic_open(url, "wb", storage_options) as handle:
        handle.write(data)
    return url, config_url


def save_vqgan(model: VQModel, url: str, storage_options: dict | None = None) -> tuple[str, str]:
    """Save a VQModel where `clipbeam generate --vqgan URL` loads it: URL.safetensors + URL.yaml beside it.

    Returns (weights URL, config URL). For training commands and converters.
    """
    return save_state_dict(model.state_dict(), model.config, url, storage_options)
