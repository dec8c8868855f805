"""The one gate every torch (.pt/.ckpt/.pth) file passes before a loader sees it.

`torch.load` hands any zip archive that holds `constants.pkl` to
`torch.jit.load`, and TorchScript runs the archive's own code (its
`__setstate__` methods) while loading: a file named `.ckpt` can write files
or run commands. clipbeam never needs a TorchScript archive, so an archive
with `constants.pkl` or a `code/` folder is refused here, before torch is
asked to read it. Plain pickles are then read with `weights_only=True` and an
explicit list of safe globals (this module), or with the restricted unpickler
(`vqgan_checkpoint`, for Lightning checkpoints).
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any, Iterable

from clipbeam.errors import UsageError, first_line


def torchscript_entries(names: Iterable[str]) -> list[str]:
    """The archive entries that only a TorchScript archive has (`constants.pkl`, `code/...`).

    torch archives keep everything under one top folder (`NAME/data.pkl`), so
    both the bare and the prefixed spellings count.
    """
    found = []
    for name in names:
        inner = name.split("/", 1)[1] if "/" in name else name
        if "constants.pkl" in (name, inner) or name.startswith("code/") or inner.startswith("code/"):
            found.append(name)
    return found


def refuse_torchscript(source: str | IO[bytes], url: str) -> None:
    """Raise UsageError when `source` (a local path or a seekable binary file) is a TorchScript archive.

    The archive is listed with torch's own zip reader, the one `torch.load`
    uses to decide whether to dispatch to TorchScript, so the check and the
    loader cannot disagree about what the file holds. Files that do not start
    like a zip (legacy torch pickles) pass: torch never hands those to TorchScript.
    """
    import torch

    handle = open(source, "rb") if isinstance(source, str) else source
    position = handle.tell()
    try:
        if handle.read(4) != b"PK\x03\x04":  # torch.serialization._is_zipfile's test
            return
        handle.seek(position)
        entries = torchscript_entries(torch._C.PyTorchFileReader(handle).get_all_records())
    except (OSError, RuntimeError) as exc:
        first = first_line(exc, 200)
        raise UsageError(f"cannot read {url}: not a readable torch archive ({first})") from None
    finally:
        if isinstance(source, str):
            handle.close()
        else:
            handle.seek(position)
    if entries:
        raise UsageError(f"refusing to load {url}: it is a TorchScript archive ({entries[0]}), and loading one "
                         "runs the code inside it; save the weights with torch.save(state_dict) instead")


def load_weights_only(url: str, storage_options: dict | None, what: str = "checkpoint") -> Any:
    """Read a torch file with `weights_only=True`: tensors and plain containers only.

    A TorchScript archive, a pickle that names anything else, or a file that is
    not a torch file at all is a UsageError (one line); nothing in it runs.
    """
    import torch

    from clipbeam.storage import read_bytes

    data = io.BytesIO(read_bytes(url, storage_options))
    refuse_torchscript(data, url)
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc, 200)
        raise UsageError(f"refusing to load {what} {url}: it holds more than weights ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = first_line(exc, 200)
        raise UsageError(f"cannot read {what} {url}: {exc.__class__.__name__}: {first}") from None
