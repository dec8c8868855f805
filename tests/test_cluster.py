"""Every pipeline on a Beam cluster on loopback (tests/cluster.py) gives the DirectRunner's output.

The cluster's servers and workers run in an environment without clipbeam, in
a working directory outside the repository, and jobs are submitted by a
separate `python -m clipbeam` process from yet another directory: what the
workers run comes from the staged wheel, and nothing comes from the
submitting process's memory or working directory.

Adding a pipeline is one entry in CASES: the command and its arguments (minus
--output and the runner flags).
"""

from __future__ import annotations

import base64
import glob
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import imagefactory as imgs
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import webdataset as wds
from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
from cluster import LoopbackCluster
from PIL import Image

from clipbeam.cli import COMMANDS, main

TINY = ["--model", "clipbeam-tiny", "--pretrained", "none", "--seed", "0"]
REPO = Path(__file__).resolve().parents[1]
SUBMIT_TIMEOUT = 300


def write_shards(folder: Path, shards: int, per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": imgs.jpeg(shard * 100 + i), "txt": f"caption {i}"})
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny corpus, its embeddings (DirectRunner) and a tiny VQGAN checkpoint."""
    root = tmp_path_factory.mktemp("inputs")
    shards = write_shards(root / "shards", shards=3, per_shard=5)
    embeddings = root / "embeddings"
    assert main(["embed", "--input", f"{shards}/*.tar", "--output", str(embeddings), *TINY,
                 "--batch-size", "8", "--no-progress"]) == 0
    from vqganhelpers import save_tiny_vqgan

    return {"shards": str(shards), "embeddings": str(embeddings), "vqgan": str(save_tiny_vqgan(root / "vqgan"))}


CASES = {
    "embed": lambda i: ["embed", "--input", f"{i['shards']}/*.tar", *TINY, "--batch-size", "8", "--no-progress"],
    "index": lambda i: ["index", "--embeddings", i["embeddings"]],
    "classify": lambda i: ["classify", "--embeddings", i["embeddings"], "--labels", "cat,dog,red square"],
    "generate": lambda i: ["generate", "--prompt", "a red square", "--seeds", "0,1", "--vqgan", i["vqgan"],
                           "--steps", "2", "--cutn", "4", "--size", "32", "32", *TINY],
}


def command_module(command: str):
    """The command's module spec, or None while that pipeline is not in the checkout."""
    module = {name: module for name, module, _ in COMMANDS}[command]
    return importlib.util.find_spec(module)


# -- comparing two output folders ----------------------------------------------
def volatile(key: str) -> bool:
    """Timings differ between any two runs (seconds, queries_per_second, an index shard's stages, ...)."""
    return "second" in key or key == "stages"


def normalise(value):
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def snapshot(folder: str) -> dict[str, object]:
    """Every file under an output folder, as comparable content."""
    files = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                       + glob.glob(os.path.join(folder, "**", ".*"), recursive=True)):
        if os.path.isdir(path):
            continue
        rel = os.path.relpath(path, folder)
        if path.endswith(".json"):
            with open(path) as handle:
                files[rel] = normalise(json.load(handle))
        elif path.endswith(".parquet"):
            table = pq.read_table(path)
            table = table.drop_columns([c for c in table.column_names if volatile(c)])
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            files[rel] = {"schema": str(table.schema.remove_metadata()), "metadata": meta,
                          "rows": normalise(table.to_pylist())}
        elif path.endswith(".png"):
            with Image.open(path) as image:
                files[rel] = {"info": normalise({k: str(v) for k, v in image.info.items()}),
                              "pixels": np.asarray(image.convert("RGB")).astype(np.int16).tolist()}
        else:
            with open(path, "rb") as handle:
                files[rel] = base64.b64encode(handle.read()).decode()
    return files


def assert_same(a, b, where: str = "") -> None:
    """Equal, except that floats may differ by rounding (float16 embeddings: one unit in the last place)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} != {b!r}"
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {str(a)[:200]} != {str(b)[:200]}"


def submit(args: list[str], cwd: Path, timeout: float = SUBMIT_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m clipbeam ...` as its own process, from `cwd`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "clipbeam", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def client_dir(tmp_path: Path) -> Path:
    """A working directory for the submitting process: not the repo, not the cluster's."""
    folder = tmp_path / "client"
    folder.mkdir()
    return folder


# -- the tests --------------------------------------------------------------------
def test_worker_environment_lacks_clipbeam(cluster):
    """The premise of the staging tests: only a staged package can give the workers clipbeam."""
    probe = subprocess.run([cluster.python, "-c", "import apache_beam, torch, open_clip, pyarrow; import clipbeam"],
                           cwd=cluster.cwd, env=cluster.env(), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'clipbeam'" in probe.stderr, probe.stderr[-2000:]


def test_job_without_the_staged_package_fails(cluster, inputs, tmp_path):
    result = submit([*CASES["embed"](inputs), "--output", str(tmp_path / "out"), *cluster.beam_args(0, stage=False)],
                    client_dir(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No module named 'clipbeam'" in result.stderr + cluster.logs(tail=100_000)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("command", list(CASES))
def test_cluster_output_equals_direct_runner(cluster, inputs, tmp_path, command):
    assert command_module(command) is not None, f"clipbeam {command} is missing"
    args = CASES[command](inputs)
    direct, remote = str(tmp_path / "direct"), str(tmp_path / "cluster")
    assert main([*args, "--output", direct, "--runner", "DirectRunner"]) in (0, 3)
    pool = list(CASES).index(command) % len(cluster.workers)  # both pools get work
    staged_before = len(cluster.worker_dirs())
    result = submit([*args, "--output", remote, *cluster.beam_args(pool)], client_dir(tmp_path))
    assert result.returncode in (0, 3), result.stderr[-3000:] + cluster.logs()
    # the job ran on workers that installed the staged wheel
    new = cluster.worker_dirs()[staged_before:]
    assert new and all((d / "site" / "clipbeam" / "__init__.py").exists() for d in new), new
    assert_same(snapshot(remote), snapshot(direct), command)


def cancel_running_jobs(cluster: LoopbackCluster) -> list[str]:
    """Cancel the job service's non-terminal jobs through the job API.

    Beam's local job service does not notice a lost worker: the job waits on
    it for ever (neither failing nor retrying). On a real cluster the runner's
    failure detector does this (Dataflow retries the work item, Flink restarts
    from its restart strategy); here the test plays that part."""
    terminal = {beam_job_api_pb2.JobState.DONE, beam_job_api_pb2.JobState.FAILED,
                beam_job_api_pb2.JobState.CANCELLED, beam_job_api_pb2.JobState.UPDATED,
                beam_job_api_pb2.JobState.DRAINED}
    cancelled = []
    with grpc.insecure_channel(cluster.job_endpoint) as channel:
        stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
        for job in stub.GetJobs(beam_job_api_pb2.GetJobsRequest()).job_info:
            if job.state not in terminal:
                stub.Cancel(beam_job_api_pb2.CancelJobRequest(job_id=job.job_id))
                cancelled.append(job.job_id)
    return cancelled


def test_killed_pool_then_rerun_completes_only_the_missing_parts(cluster, s3_server, tmp_path):
    """Kill a worker pool while the parts are being written; the rerun (on the
    other pool) skips the finished parts, redoes the rest, and the result is
    the DirectRunner's: nothing lost, nothing twice, no stray files."""
    parts = 12
    shards = write_shards(tmp_path / "shards", shards=parts, per_shard=3)
    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    out = f"{s3_server['bucket']}/emb"
    args = ["embed", "--input", f"{shards}/*.tar", *TINY, "--batch-size", "8", "--no-progress",
            "--storage-options", json.dumps(so), "--output", f"s3://{out}"]
    client = client_dir(tmp_path)

    def markers() -> list[str]:
        try:
            return [p for p in fs.ls(f"{out}/_parts", refresh=True, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    log = tmp_path / "submit.log"
    with open(log, "w") as sink:  # a file, not a pipe that nobody reads while the job runs
        job = subprocess.Popen([sys.executable, "-m", "clipbeam", *args, *cluster.beam_args(0)], cwd=client,
                               env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + SUBMIT_TIMEOUT
        while not markers():
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no part was written"
            time.sleep(0.02)
        cluster.kill_pool(0)
        time.sleep(2)  # let the job service notice, if it does
        cancel_running_jobs(cluster)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        cluster.restart_pool(0)
    stderr = log.read_text()
    assert job.returncode == 1, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    assert not fs.exists(f"{out}/manifest.json")
    fs.invalidate_cache()
    done = sorted(p.rsplit("/", 1)[1] for p in markers())
    assert 0 < len(done) < parts, f"the kill landed outside the write stage: {len(done)} of {parts} parts done"
    kept = {name: fs.info(f"{out}/embeddings/{name.replace('.json', '.parquet')}")["LastModified"] for name in done}

    rerun = submit([*args, *cluster.beam_args(1)], client)
    assert rerun.returncode == 0, rerun.stderr[-3000:] + cluster.logs()
    assert f"{parts} ({len(done)} skipped as done)" in rerun.stderr
    fs.invalidate_cache()
    # the parts finished before the kill were not written again
    parquet = {name: f"{out}/embeddings/{name.replace('.json', '.parquet')}" for name in done}
    assert {name: fs.info(path)["LastModified"] for name, path in parquet.items()} == kept
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{out}/embeddings", detail=False))
    assert names == [f"part-{i:05d}.parquet" for i in range(parts)]  # no temp files left by the killed worker

    direct = str(tmp_path / "direct")
    assert main([*args[:-2], "--output", direct, "--runner", "DirectRunner"]) == 0
    rows = []
    for name in names:
        with fs.open(f"{out}/embeddings/{name}") as handle:
            rows.extend(pq.read_table(io.BytesIO(handle.read())).to_pylist())
    expected = []
    for name in names:
        expected.extend(pq.read_table(os.path.join(direct, "embeddings", name)).to_pylist())
    assert len({r["id"] for r in rows}) == len(rows) == parts * 3
    assert_same(rows, expected, "rows")
