"""Byte offsets recorded by embed, and fetch_image reading one sample back (locally and on S3)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import imagefactory as imgs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from embedhelpers import embed, manifest, read_rows, write_tar

from clipbeam.corpus.fetch import ImageUnavailable, fetch_image


def _shard(path, n: int, seed: int) -> dict[str, bytes]:
    """A tar shard with image, caption and JSON members; returns key -> image bytes."""
    images = {f"s{seed}k{i:03d}": (imgs.png if i % 2 else imgs.jpeg)(seed * 100 + i) for i in range(n)}
    members = []
    for key, data in images.items():
        ext = "png" if data[:4] == b"\x89PNG" else "jpg"
        members += [(f"{key}.txt", f"caption {key}".encode()), (f"{key}.{ext}", data),
                    (f"{key}.json", json.dumps({"k": key}).encode())]
    write_tar(str(path), members)
    return images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    images = {**_shard(root / "00000.tar", 5, 0), **_shard(root / "00001.tar", 4, 1)}
    out = str(root / "emb")
    assert embed("--input", str(root / "*.tar"), "--output", out, "--no-text") == 0
    return root, images, out


def test_embed_records_offsets_and_fetch_reads_them_back(corpus):
    root, images, out = corpus
    rows = read_rows(out)
    assert len(rows) == len(images) and manifest(out)["format_version"] >= 2  # 2 added the offsets
    for row in rows:
        key = row["id"].rsplit("/", 1)[1]
        assert row["source_offset"] > 0 and row["source_size"] == len(images[key])
        data = fetch_image(row)
        assert data == images[key] and hashlib.sha256(data).hexdigest() == row["sha256"]


def test_offsets_reach_the_index_id_tables(corpus, tmp_path):
    from clipbeam.cli import main
    from clipbeam.index import ShardedIndex

    _, images, out = corpus
    assert main(["index", "--embeddings", out, "--output", str(tmp_path / "idx")]) == 0
    index = ShardedIndex.open(str(tmp_path / "idx"))
    rows = index.lookup(range(index.ntotal))
    assert {"caption", "source", "source_offset", "source_size"} <= set(rows[0])
    assert sorted(fetch_image(row) for row in rows) == sorted(images.values())


def test_fetch_on_s3_is_one_range_read(corpus, s3_server):
    root, images, out = corpus
    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    bucket = s3_server["bucket"]
    for name in ("00000.tar", "00001.tar"):
        fs.put(str(root / name), f"{bucket}/c/{name}")
    for row in read_rows(out):
        row["source"] = f"s3://{bucket}/c/" + row["source"].rsplit("/", 1)[1]
        assert fetch_image(row, so) == images[row["id"].rsplit("/", 1)[1]]


def test_folder_and_manifest_rows_read_their_own_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(imgs.png(7))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "b.jpg").write_bytes(imgs.jpeg(8))
    pq.write_table(pa.table({"image": ["pics/b.jpg"], "caption": ["b"]}),
                   str(tmp_path / "rows.parquet"))
    assert embed("--input", str(folder), "--output", str(tmp_path / "e1")) == 0
    assert embed("--input", str(tmp_path / "rows.parquet"), "--image-column", "image", "--caption-column",
                 "caption", "--output", str(tmp_path / "e2")) == 0
    (folder_row,), (manifest_row,) = read_rows(str(tmp_path / "e1")), read_rows(str(tmp_path / "e2"))
    assert folder_row["source_offset"] is None and manifest_row["source_size"] is None
    assert fetch_image(folder_row) == imgs.png(7)
    assert fetch_image(manifest_row) == imgs.jpeg(8)


def test_what_cannot_be_fetched_says_why(tmp_path):
    shard = tmp_path / "x.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        data = imgs.png(1)
        info = tarfile.TarInfo("k.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert embed("--input", str(shard), "--output", str(tmp_path / "e")) == 0
    (row,) = read_rows(str(tmp_path / "e"))
    assert row["source_offset"] is None and row["source_size"] is None
    with pytest.raises(ImageUnavailable, match="compressed shard"):
        fetch_image(row)
    with pytest.raises(ImageUnavailable, match="inside the manifest table"):
        fetch_image({"source": str(tmp_path / "rows.parquet"), "source_offset": None, "source_size": None})
    with pytest.raises(ImageUnavailable, match="no longer exists"):
        fetch_image({"source": str(tmp_path / "gone.png")})
    with pytest.raises(ImageUnavailable, match="changed since"):
        fetch_image({"source": str(shard), "source_offset": 10, "source_size": 10**6})
