"""The serve tests' index (the demo's chain, small) and a real `clipbeam serve` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx

from clipbeam.cli import main

# 480 shapes (about 20 per color and shape): enough for ten "a red circle" hits.
CORPUS_SIZE = 480
_BUILT: dict[str, str] = {}


def shapes_index(tmp_path_factory) -> dict[str, str]:
    """synth-corpus -> embed (shipped shapes-clip) -> index (2 shards), built once per test session."""
    if not _BUILT:
        root = tmp_path_factory.mktemp("serve-shapes")
        corpus, emb, index = (str(root / name) for name in ("corpus", "emb", "index"))
        assert main(["synth-corpus", "--output", corpus, "--n", str(CORPUS_SIZE), "--seed", "2026",
                     "--shard-size", str(CORPUS_SIZE // 4)]) == 0
        assert main(["embed", "--input", os.path.join(corpus, "*.tar"), "--output", emb, "--model", "shapes-clip",
                     "--pretrained", "shapes", "--batch-size", "64", "--dtype", "float32", "--no-progress"]) == 0
        assert main(["index", "--embeddings", emb, "--output", index, "--shards", "2"]) == 0
        _BUILT.update(corpus=corpus, emb=emb, index=index)
    return dict(_BUILT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(index: str, *extra: str, timeout: float = 120.0):
    """`clipbeam serve` in its own process on 127.0.0.1; yields its base URL, stops it afterwards."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "clipbeam", "serve", "--index", index, "--port", str(port),
                                *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"clipbeam serve exited with {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("clipbeam serve did not answer /healthz in time")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
