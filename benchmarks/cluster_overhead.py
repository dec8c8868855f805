"""What a portable-runner cluster costs over the DirectRunner, on the same embed job.

Writes a synthetic webdataset corpus (N small JPEGs in S shards), then runs the
same `clipbeam embed` command twice, each as its own process: on the
DirectRunner, and on the loopback cluster of tests/cluster.py (Beam's job
service + an external worker pool whose workers install the staged clipbeam
wheel). Prints wall seconds and images/s of each and the ratio. The cluster's
start-up (servers, wheel build) is measured apart and not counted in the job.

    .venv/bin/python benchmarks/cluster_overhead.py --n 2000 --model ViT-S-32
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cluster import LoopbackCluster  # noqa: E402  (the harness lives with the tests)


def write_corpus(folder: Path, n: int, shards: int, size: int = 96) -> None:
    """N smooth random JPEGs, spread over `shards` tar files."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size]
    per_shard = -(-n // shards)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                slope = rng.uniform(-2, 2, (2, 3))
                pixels = rng.uniform(0, 255, 3) + x[..., None] * slope[0] + y[..., None] * slope[1]
                buf = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": f"picture {i}"})


def run_embed(args: list[str], cwd: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "clipbeam", "embed", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"embed failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default %(default)s)")
    parser.add_argument("--shards", type=int, default=8, help="tar shards = embed parts (default %(default)s)")
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model, random weights (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cluster-overhead-") as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", opts.n, opts.shards)
        common = ["--input", str(root / "corpus" / "*.tar"), "--model", opts.model, "--pretrained", "none",
                  "--batch-size", str(opts.batch_size), "--no-progress"]
        direct = run_embed([*common, "--output", str(root / "direct"), "--runner", "DirectRunner"], root)
        start = time.monotonic()
        with LoopbackCluster(root / "cluster", pools=1) as cluster:
            startup = time.monotonic() - start
            remote = run_embed([*common, "--output", str(root / "cluster-out"), *cluster.beam_args(0)], root)

    rows = [("DirectRunner", direct), ("loopback cluster", remote)]
    print(f"clipbeam embed, {opts.n} images in {opts.shards} shards, {opts.model} --pretrained none, "
          f"batch {opts.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'runner':<18} {'wall s':>8} {'images/s':>9} {'vs direct':>10}")
    for name, seconds in rows:
        print(f"{name:<18} {seconds:>8.1f} {opts.n / seconds:>9.1f} {seconds / direct:>9.2f}x")
    print(f"(cluster start-up, not counted above: {startup:.1f} s)")


if __name__ == "__main__":
    main()
