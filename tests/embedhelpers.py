"""Helpers for embed tests: run the CLI in-process and read its output back."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import pyarrow.parquet as pq

from clipbeam.cli import main

TINY = ["--model", "clipbeam-tiny", "--pretrained", "none", "--seed", "0", "--batch-size", "8", "--no-progress"]


def embed(*args: str) -> int:
    return main(["embed", *args, *TINY] if "--model" not in args else ["embed", *args, "--no-progress"])


def read_rows(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "embeddings", "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def read_failures(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "failures", "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as handle:
        return json.load(handle)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """A tar written with the standard library, members in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
