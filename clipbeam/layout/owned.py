"""The names a job owns in its output folder, and deleting them without ever leaving that folder.

Run records, manifests and markers are files anyone who can write the folder
can edit, so a name read from them is deleted only when its text stays inside
the folder (`inside`: relative, no '..', no URL) and, on a local disk, when
no folder on its way down from the real output folder is a symbolic link. A
name that is itself a link loses the link, never what it points to; a folder
is removed without following the links inside it. Object stores have no
links: there the text check is the whole rule.
"""

from __future__ import annotations

import logging
import os
import posixpath

from clipbeam.errors import FieldError
from clipbeam.storage import get_fs, is_temporary, join, list_names, local_path

LOG = logging.getLogger(__name__)


def inside(name: object) -> bool:
    """Whether a name read from a run record, manifest or marker stays inside the output folder:
    relative, no '..' out of it, no URL. Only such names may be deleted as the job's own; the files
    listing them can be edited by anyone who can write the folder."""
    if not isinstance(name, str) or not name or "://" in name or name.startswith("/"):
        return False
    normal = posixpath.normpath(name)
    return normal not in (".", "..") and not normal.startswith("../")


def real_root(root: str) -> str:
    """The output folder with its own links resolved (local disks); URLs unchanged."""
    path = local_path(root)
    return os.path.realpath(path) if path is not None else root


def link_on_the_way(root: str, name: str) -> str | None:
    """The first folder of `name` (relative to the output folder) that is a symbolic link, or None.

    Only folders count (what the name is reached through), not the name itself. Always None
    on object stores."""
    base = local_path(root)
    if base is None:
        return None
    current = os.path.realpath(base)
    parts = posixpath.normpath(name).split("/")
    for depth, part in enumerate(parts[:-1], start=1):
        current = os.path.join(current, part)
        if os.path.islink(current):
            return "/".join(parts[:depth])
    return None


def refuse_links(root: str, names: list[str]) -> None:
    """UsageError when a job is about to write a name through a link (it would write, and later
    delete, outside the output folder)."""
    for name in names:
        link = link_on_the_way(root, name)
        if link is not None:
            raise FieldError("output", f"{join(root, link)} is a symbolic link; clipbeam writes and deletes only "
                                       "inside the real output folder: remove the link, or choose another {field}")


def remove_owned(root: str, name: str, storage_options: dict | None, recursive: bool = False) -> bool:
    """Delete `root/name` if it is there, never through a link; True when something went.

    Refused (with a warning, returns False): a name outside the folder, a name reached through
    a link, and a folder where a file was expected (a directory listed among the job's files)."""
    if not inside(name):
        LOG.warning("not deleting %r: it is not a name inside %s", name, root)
        return False
    link = link_on_the_way(root, name)
    if link is not None:
        LOG.warning("not deleting %s: %s is a symbolic link out of the output folder", name, join(root, link))
        return False
    fs, path = get_fs(join(real_root(root), name), storage_options)
    is_link = local_path(root) is not None and os.path.islink(path)
    if not is_link and not fs.exists(path):
        return False
    if not recursive and not is_link and fs.isdir(path):
        LOG.warning("not deleting %s: a folder where the job lists a file", join(root, name))
        return False
    try:
        fs.rm(path, recursive=recursive and not is_link)  # fsspec's local rm unlinks a link, never its target
    except FileNotFoundError:  # removed meanwhile by someone else: the outcome is the same
        return False
    return True


def remove_owned_temporaries(root: str, folder: str, storage_options: dict | None) -> None:
    """Delete the hidden `.NAME.tmp-*` files atomic writes leave in `root/folder`, never through a link."""
    if link_on_the_way(root, posixpath.join(folder, "x")) is not None:
        return
    for entry in list_names(join(root, folder), storage_options):
        if is_temporary(entry):
            remove_owned(root, posixpath.join(folder, entry), storage_options)
