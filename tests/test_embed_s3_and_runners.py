"""embed against a real S3 API on loopback, on Beam's multi-process and portable runners,
and with the model shared across processes (--model-copies)."""

from __future__ import annotations

import json

import imagefactory as imgs
import pytest
import s3fs
import webdataset as wds
from embedhelpers import embed, read_rows


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for shard in range(3):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(7):
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": imgs.jpeg(shard * 10 + i), "txt": f"c {i}"})
    return root


def test_s3_round_trip(local_shards, s3_server, tmp_path):
    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    bucket = s3_server["bucket"]
    for shard in range(3):
        fs.put(str(local_shards / f"{shard:05d}.tar"), f"{bucket}/corpus/{shard:05d}.tar")
    code = embed("--input", f"s3://{bucket}/corpus/{{00000..00002}}.tar", "--output", f"s3://{bucket}/emb",
                 "--storage-options", json.dumps(so))
    assert code == 0
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/emb/embeddings"))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    with fs.open(f"{bucket}/emb/manifest.json") as handle:
        info = json.load(handle)
    assert info["rows"] == 21 and info["parts"][0]["source"].startswith("s3://")
    # the same corpus read locally gives the same rows (ids come from shard names and keys)
    local = str(tmp_path / "local")
    assert embed("--input", f"{local_shards}/*.tar", "--output", local) == 0
    local_rows = {r["id"]: r["image_embedding"] for r in read_rows(local)}
    import pyarrow.parquet as pq

    s3_rows = {}
    for name in names:
        with fs.open(f"{bucket}/emb/embeddings/{name}") as handle:
            for row in pq.read_table(handle).to_pylist():
                s3_rows[row["id"]] = row["image_embedding"]
    assert s3_rows == local_rows


@pytest.mark.parametrize("runner_args", [
    ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"],
    ["--model-copies", "2"],
], ids=["multi_processing", "portable", "shared_model_copies"])
def test_other_runners_give_the_same_output(local_shards, tmp_path, runner_args):
    direct, other = str(tmp_path / "direct"), str(tmp_path / "other")
    assert embed("--input", f"{local_shards}/*.tar", "--output", direct) == 0
    assert embed("--input", f"{local_shards}/*.tar", "--output", other, *runner_args) == 0
    assert read_rows(other) == read_rows(direct)
