"""`clipbeam embed` and `clipbeam generate` themselves on one GPU host (issue 20, parts 2 and 3).

benchmarks/embed_gpu.py measures the data plane and the model without Beam.
This script runs the commands a user runs, as subprocesses:

- embed: the same 256 px JPEG webdataset shards (written by embed_gpu's
  write_shards), ViT-B-32 fp16, batch 256, `--device cuda`, on the DirectRunner
  in multi-processing mode with one SDK process per --procs, each with its own
  model copy, for each --decode-device. Reports images/s over the whole command
  and over the pipeline alone (the summary's seconds), mean and max GPU
  utilisation (nvidia-smi every 200 ms), and host CPU utilisation. Then embeds
  the first shard again on the CPU in fp32 and compares the vectors of the
  same ids (cosine >= 0.999 required).
- generate: `clipbeam generate` at --gen-size, cutn 32, ViT-B-32 with the
  taming f16_16384 VQGAN layout (seeded random weights, written here as
  .safetensors + .yaml), a batch of --gen-prompts prompts, --gen-steps steps:
  iterations/s inside the render loops (the renders table's seconds) and over
  the whole command; the bare loop beside it is
  benchmarks/generate_speed.py, which gpu_check.sh runs in the same session.

Without CUDA it runs on the CPU at whatever size it is given (the smoke run):

    python benchmarks/gpu_pipeline_check.py --n 64 --shard-size 32 --batch-size 16 --procs 2 \
        --gen-size 32 --gen-steps 2 --gen-prompts 2 --gen-model ViT-S-32 --out /tmp/check.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_gpu import GpuUtilisation, write_shards  # noqa: E402  (a sibling script, not a package)
from generate_speed import F16_16384  # noqa: E402

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a purple circle",
           "an orange square", "a cyan triangle", "a white star")


def log(message: str) -> None:
    print(message, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def timed_command(argv: list[str]) -> dict:
    """Run one clipbeam command; wall seconds, GPU and host CPU utilisation while it ran."""
    busy0, total0 = cpu_seconds()
    start = time.perf_counter()
    with GpuUtilisation() as gpu:
        done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    busy1, total1 = cpu_seconds()
    if done.returncode not in (0, 3):
        log(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"{argv[3]} exited {done.returncode}")
    host = 100.0 * (busy1 - busy0) / max(1, total1 - total0)
    return {"seconds": seconds, "gpu": gpu.summary(), "host_cpu": f"{host:.0f}%"}


def clipbeam(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipbeam", *args]


def embed_argv(shards: str, output: str, args, device: str, decode: str, precision: str) -> list[str]:
    return clipbeam("embed", "--input", shards, "--output", output, "--overwrite", "--no-progress",
                    "--model", args.model, "--pretrained", "none", "--device", device, "--precision", precision,
                    "--batch-size", str(args.batch_size), "--decode-device", decode,
                    "--model-copies", str(args.model_copies),
                    "--runner", "DirectRunner", "--direct_num_workers", str(args.procs),
                    "--direct_running_mode", "multi_processing")


def read_vectors(output: str) -> dict[str, "object"]:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(output, "embeddings"), columns=["id", "image_embedding"])
    vectors = np.asarray(table.column("image_embedding").to_pylist(), dtype=np.float32)
    return dict(zip(table.column("id").to_pylist(), vectors, strict=True))


def min_cosine(ours: dict, reference: dict) -> tuple[float, int]:
    import numpy as np

    shared = sorted(set(ours) & set(reference))
    if not shared:
        raise SystemExit("the CPU reference and the GPU run share no ids")
    a = np.stack([ours[i] for i in shared])
    b = np.stack([reference[i] for i in shared])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), len(shared)


def embed_rows(root: str, args, device: str) -> list[tuple]:
    paths = write_shards(root, args.n, args.shard_size, os.cpu_count() or 1)
    shards = os.path.join(root, f"{{00000..{len(paths) - 1:05d}}}.tar")
    precision = "fp16" if device == "cuda" else "fp32"
    reference = os.path.join(root, "cpu-reference")
    log(f"embedding shard 0 on the CPU for the comparison ({args.shard_size} images)")
    timed_command(embed_argv(paths[0], reference, args, "cpu", "cpu", "fp32"))
    expected = read_vectors(reference)
    rows = []
    for decode in args.decode_devices.split(","):
        output = os.path.join(root, f"out-{decode}")
        log(f"clipbeam embed --device {device} --decode-device {decode}: {args.n} images")
        run = timed_command(embed_argv(shards, output, args, device, decode, precision))
        with open(os.path.join(output, "manifest.json")) as handle:
            manifest = json.load(handle)
        embedded = manifest["rows"]
        cosine, compared = min_cosine(read_vectors(output), expected)
        rows.append((f"embed, {decode} decode", embedded, run["seconds"], embedded / run["seconds"],
                     run["gpu"], run["host_cpu"], f"min cos {cosine:.5f} over {compared}"))
        if cosine < 0.999:
            log(f"FAIL: vectors differ from the CPU pipeline's (min cosine {cosine:.5f} < 0.999)")
    return rows


def write_vqgan(root: str) -> str:
    import torch

    from clipbeam.models.vqgan import build_vqgan, config_from_dict
    from clipbeam.models.vqgan_checkpoint import save_vqgan

    torch.manual_seed(0)
    model = build_vqgan(config_from_dict(F16_16384))
    with torch.no_grad():
        model.codebook.normal_()
    path = os.path.join(root, "f16_16384.safetensors")
    save_vqgan(model, path)
    return path


def generate_row(root: str, args, device: str) -> tuple:
    prompts = os.path.join(root, "prompts.txt")
    with open(prompts, "w") as handle:
        handle.write("\n".join((PROMPTS * 4)[: args.gen_prompts]) + "\n")
    precision = "fp16" if device == "cuda" else "fp32"
    argv = clipbeam("generate", "--prompts", prompts, "--vqgan", write_vqgan(root), "--output",
                    os.path.join(root, "renders"), "--overwrite", "--model", args.gen_model, "--pretrained", "none",
                    "--device", device, "--precision", precision, "--steps", str(args.gen_steps),
                    "--size", str(args.gen_size), str(args.gen_size), "--cutn", "32", "--runner", "DirectRunner")
    log(f"clipbeam generate: {args.gen_prompts} prompts x {args.gen_steps} steps at {args.gen_size}px")
    run = timed_command(argv)
    import pyarrow.parquet as pq

    renders = pq.read_table(os.path.join(root, "renders", "renders.parquet"), columns=["steps", "seconds"])
    iterations = sum(renders.column("steps").to_pylist())
    loop_seconds = sum(renders.column("seconds").to_pylist())
    return (f"generate {args.gen_size}px", iterations, run["seconds"], iterations / loop_seconds,
            run["gpu"], run["host_cpu"], f"it/s inside the loops ({loop_seconds:.1f} s of renders); "
                                         f"{iterations / run['seconds']:.2f} it/s over the whole command")


def print_table(rows: list[tuple], header: str, out: str | None) -> None:
    lines = [header, f"{'what':<22}{'items':>8}{'seconds':>9}{'items/s':>10}  {'GPU util mean/max':<20}"
                     f"{'host CPU':>9}  note"]
    for what, items, seconds, rate, gpu, host, note in rows:
        lines.append(f"{what:<22}{items:>8}{seconds:>9.1f}{rate:>10.2f}  {gpu:<20}{host:>9}  {note}")
    text = "\n".join(lines)
    log(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n", type=int, default=25_600, help="images in the shards")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="SDK worker processes")
    parser.add_argument("--model-copies", type=int, default=1, help="embed's --model-copies")
    parser.add_argument("--decode-devices", default="cpu,cuda", help="comma-separated: cpu, cuda")
    parser.add_argument("--gen-size", type=int, default=256)
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-model", default="ViT-B-32")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: embed, generate")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        args.decode_devices = "cpu"
        log("no CUDA: a CPU smoke run")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        if "embed" not in args.skip:
            rows += embed_rows(root, args, device)
        if "generate" not in args.skip:
            rows.append(generate_row(root, args, device))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print_table(rows, f"clipbeam commands on {name}, {os.cpu_count()} host cores, {args.procs} SDK processes, "
                      f"{args.model} batch {args.batch_size}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
