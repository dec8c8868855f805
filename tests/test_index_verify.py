"""Shard checksums in index.json: same-size corruption is found by ShardedIndex.open(verify=True) and --verify."""

import json
import shutil

import numpy as np
import pytest
from synthetic_embeddings import clustered, write_embed_output

from clipbeam.cli import main
from clipbeam.index import IndexInputError, ShardedIndex
from clipbeam.index.checksum import sha256_file

DIM = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    vectors = clustered(1500, DIM, seed=7)
    write_embed_output(str(root / "emb"), vectors, parts=2, dtype=np.float32)
    out = root / "idx"
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(out), "--index-factory", "IVF8,Flat",
                 "--shards", "2", "--runner", "DirectRunner"]) == 0
    return out, vectors


def copy_index(out, copy):
    shutil.copytree(out, copy)
    return copy


def flip_byte(path, where=None):
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if where is None else where
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def test_index_json_records_every_checksum(built):
    out, _ = built
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["train"]["index_sha256"] == sha256_file(str(out / "trained.faiss"))
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256_file(str(out / shard["index"]))
        assert shard["ids_sha256"] == sha256_file(str(out / shard["ids"]))
    assert ShardedIndex.open(str(out), verify=True).ntotal == 1500


@pytest.mark.parametrize("name", ["shard-00001.faiss", "shard-00000.ids.parquet", "trained.faiss"])
def test_same_size_corruption_is_found(built, tmp_path, capsys, name):
    out, vectors = built
    copy = copy_index(out, tmp_path / "idx")
    size = (copy / name).stat().st_size
    flip_byte(copy / name)
    assert (copy / name).stat().st_size == size
    if name.endswith(".faiss") and name.startswith("shard"):
        # what the issue saw: the default open (sizes and counts only, no reading) does not notice
        ShardedIndex.open(str(copy)).search(vectors[:5], 3)
    with pytest.raises(IndexInputError, match=f"{name} is corrupt: its sha256"):
        ShardedIndex.open(str(copy), verify=True)
    capsys.readouterr()
    assert main(["index", "--verify", "--output", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipbeam index: error: ") and f"{name} is corrupt" in err[0]


def test_verify_cli(built, tmp_path, capsys):
    out, _ = built
    assert main(["index", "--verify", "--output", str(out)]) == 0
    assert "all 5 files match" in capsys.readouterr().out
    assert main(["index", "--verify", "--output", str(out), "--embeddings", str(out)]) == 2
    assert main(["index", "--output", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "drop --embeddings" in err[-2] and "--embeddings is required" in err[-1]
    assert not (tmp_path / "new").exists()
    assert main(["index", "--verify", "--output", str(tmp_path / "nothing")]) == 2


def test_index_without_checksums_cannot_be_verified(built, tmp_path):
    out, _ = built
    copy = copy_index(out, tmp_path / "idx")
    manifest = json.loads((copy / "index.json").read_text())
    for shard in manifest["shards"]:
        del shard["sha256"]
    (copy / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexInputError, match="records no checksum for shard-00000.faiss"):
        ShardedIndex.open(str(copy), verify=True)
    assert ShardedIndex.open(str(copy)).ntotal == 1500


def test_verify_on_s3(built, s3_server, capsys):
    import fsspec

    out, _ = built
    so = s3_server["storage_options"]
    remote = f"s3://{s3_server['bucket']}/idx"
    fs = fsspec.filesystem("s3", **so)
    fs.put(str(out), remote, recursive=True)
    assert ShardedIndex.open(remote, storage_options=so, verify=True).ntotal == 1500
    assert main(["index", "--verify", "--output", remote, "--storage-options", json.dumps(so)]) == 0
    data = bytearray(fs.cat(f"{remote}/shard-00000.faiss"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(f"{remote}/shard-00000.faiss", bytes(data))
    capsys.readouterr()
    assert main(["index", "--verify", "--output", remote, "--storage-options", json.dumps(so)]) == 2
    assert "shard-00000.faiss is corrupt" in capsys.readouterr().err


def test_an_id_table_is_hashed_as_it_is_written(tmp_path):
    """The shard's id-table checksum comes from the bytes on their way out (storage.HashingWriter),
    not from reading the file back; it is the file's own SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipbeam import storage

    url = str(tmp_path / "shard-00000.ids.parquet")
    table = pa.table({"faiss_id": pa.array(range(5000), pa.int64()), "id": [f"s{i}" for i in range(5000)]})
    with storage.atomic_open(url, "wb") as handle:
        hashing = storage.HashingWriter(handle)
        with pq.ParquetWriter(hashing, table.schema) as writer:
            writer.write_table(table.slice(0, 2500))
            writer.write_table(table.slice(2500))
    assert hashing.hexdigest() == storage.file_sha256(url)
    assert pq.read_table(url).equals(table)
