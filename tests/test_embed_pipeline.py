"""clipbeam embed end to end on the DirectRunner: values, contract, accounting."""

from __future__ import annotations

import io
import json
import os

import imagefactory as imgs
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from embedhelpers import embed, manifest, read_rows, write_tar
from PIL import Image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two shards written with webdataset's TarWriter and one with tarfile."""
    root = tmp_path_factory.mktemp("corpus")
    samples = {}
    for shard in range(2):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(12):
                key = f"{shard:05d}{i:04d}"
                data = imgs.jpeg(shard * 100 + i)
                caption = f"a picture number {i} of shard {shard}" if i % 4 else None
                record = {"__key__": key, "jpg": data, "json": {"url": f"http://example.com/{key}.jpg", "n": i}}
                if caption:
                    record["txt"] = caption
                sink.write(record)
                samples[f"{shard:05d}/{key}"] = (data, caption)
    members = []
    for i in range(5):
        data = imgs.png(500 + i)
        members += [(f"x{i:03d}.png", data), (f"x{i:03d}.txt", f"caption {i}".encode())]
        samples[f"00002/x{i:03d}"] = (data, f"caption {i}")
    write_tar(str(root / "00002.tar"), members)
    return root, samples


def open_clip_reference(samples):
    """Embeddings computed with open_clip directly, on the same bytes."""
    import open_clip

    from clipbeam.models.clip import register_configs

    register_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("clipbeam-tiny", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("clipbeam-tiny")
    out = {}
    with torch.no_grad():
        for sample_id, (data, caption) in samples.items():
            image = Image.open(io.BytesIO(data)).convert("RGB")
            vec = model.encode_image(preprocess(image)[None])[0]
            text = model.encode_text(tokenizer([caption]))[0] if caption else None
            out[sample_id] = (
                (vec / vec.norm()).numpy(),
                None if text is None else (text / text.norm()).numpy(),
            )
    return out


def test_embeddings_equal_open_clip(corpus, tmp_path):
    root, samples = corpus
    out = str(tmp_path / "out")
    code = embed("--input", f"{root}/{{00000..00002}}.tar", "--output", out, "--dtype", "float32")
    assert code == 0
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(samples)
    reference = open_clip_reference(samples)
    for row in rows:
        image_ref, text_ref = reference[row["id"]]
        image = np.asarray(row["image_embedding"], dtype=np.float32)
        assert abs(np.linalg.norm(image) - 1) < 1e-4
        assert float(image @ image_ref) >= 0.9999
        if text_ref is None:
            assert row["text_embedding"] is None and row["caption"] is None
        else:
            assert float(np.asarray(row["text_embedding"]) @ text_ref) >= 0.9999
    # contract: schema, metadata, manifest
    table = pq.read_table(os.path.join(out, "embeddings", "part-00000.parquet"))
    assert table.schema.metadata[b"clipbeam.dim"] == b"64"
    assert str(table.schema.field("image_embedding").type) == "list<element: float>"
    assert {"url", "n", "sha256", "width", "height", "source"} <= set(table.column_names)
    info = manifest(out)
    assert info["dim"] == 64 and info["samples"] == 29 and info["rows"] == 29 and info["failures"] == 0
    assert [p["rows"] for p in info["parts"]] == [12, 12, 5]
    assert info["model"] == "clipbeam-tiny" and info["weights"] == "random(seed=0)"
    assert not os.path.exists(os.path.join(out, "failures"))


def test_float16_output_and_no_text(corpus, tmp_path):
    root, _ = corpus
    out = str(tmp_path / "out16")
    assert embed("--input", f"{root}/00000.tar", "--output", out, "--no-text") == 0
    table = pq.read_table(os.path.join(out, "embeddings", "part-00000.parquet"))
    assert str(table.schema.field("image_embedding").type) == "list<element: halffloat>"
    assert table.column("text_embedding").null_count == table.num_rows
    assert manifest(out)["dtype"] == "float16"


def test_ids_do_not_depend_on_listing_order(corpus, tmp_path):
    root, _ = corpus
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert embed("--input", f"{root}/00001.tar", "--input", f"{root}/00000.tar", "--output", a) == 0
    assert embed("--input", f"{root}/0000[01].tar", "--output", b) == 0
    rows_a = {r["id"]: r["image_embedding"] for r in read_rows(a)}
    rows_b = {r["id"]: r["image_embedding"] for r in read_rows(b)}
    assert rows_a == rows_b
    assert manifest(a)["parts"][0]["source"].endswith("00000.tar")


def test_manifest_tables_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"img{i}.jpg").write_bytes(imgs.jpeg(900 + i))
        if i % 2 == 0:
            (images / f"img{i}.txt").write_text(f"folder caption {i}")
    # Parquet with raw bytes and an id column, cut into parts of 4 rows
    table = pa.table({
        "uid": [f"u{i}" for i in range(10)],
        "jpg": [imgs.jpeg(i) for i in range(10)],
        "caption": [f"bytes caption {i}" for i in range(10)],
        "score": [float(i) for i in range(10)],
    })
    pq.write_table(table, tmp_path / "bytes.parquet", row_group_size=3)
    # CSV with paths relative to the manifest
    pacsv.write_csv(pa.table({"path": [f"images/img{i}.jpg" for i in range(6)],
                              "text": [f"csv {i}" for i in range(6)]}), tmp_path / "paths.csv")
    (tmp_path / "rows.jsonl").write_text("\n".join(
        json.dumps({"image": f"images/img{i}.jpg", "caption": f"json {i}"}) for i in range(3)))
    out = str(tmp_path / "out")
    code = embed("--input", str(tmp_path / "bytes.parquet"), "--id-column", "uid", "--image-column", "jpg",
                 "--rows-per-part", "4", "--output", out)
    assert code == 0
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"u{i}" for i in range(10))
    assert {r["score"] for r in rows} == {float(i) for i in range(10)}
    assert [p["rows"] for p in manifest(out)["parts"]] == [4, 4, 2]

    out2 = str(tmp_path / "out2")
    assert embed("--input", str(tmp_path / "paths.csv"), "--input", str(tmp_path / "rows.jsonl"),
                 "--input", str(images), "--output", out2) == 0
    rows = {r["id"]: r for r in read_rows(out2)}
    assert len(rows) == 6 + 3 + 6
    assert rows["paths/0"]["caption"] == "csv 0" and rows["rows/2"]["caption"] == "json 2"
    assert rows["images/img0.jpg"]["caption"] == "folder caption 0"
    assert rows["images/img1.jpg"]["caption"] is None
    # the same bytes give the same vector whichever way they were read
    assert np.allclose(rows["paths/3"]["image_embedding"], rows["images/img3.jpg"]["image_embedding"])
