"""`clipbeam export --format clip-retrieval`: files read back row-aligned, as clip-retrieval's readers do."""

import json
import os

import numpy as np
import pyarrow.parquet as pq

from clipbeam.cli import main
from synthetic_embeddings import clustered, write_embed_output


def test_export_row_aligned(tmp_path):
    images, texts = clustered(700, 32, seed=1), clustered(700, 32, seed=2)
    ids = write_embed_output(str(tmp_path / "emb"), images, parts=3, text=texts, dtype=np.float32)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    manifest["parts"].append({"path": "embeddings/part-00003.parquet", "rows": 0, "failures": 2, "source": "x"})
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "cr"
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--format", "clip-retrieval",
                 "--output", str(out), "--runner", "DirectRunner"]) == 0
    img = sorted(os.listdir(out / "img_emb"))
    assert img == ["img_emb_00000.npy", "img_emb_00001.npy", "img_emb_00002.npy"]
    assert sorted(os.listdir(out / "text_emb")) == [n.replace("img", "text") for n in img]
    arrays = [np.load(out / "img_emb" / n) for n in img]
    assert all(a.dtype == np.float16 and a.ndim == 2 and a.flags.c_contiguous and len(a) for a in arrays)
    np.testing.assert_allclose(np.concatenate(arrays), images, atol=2e-3)
    text = np.concatenate([np.load(out / "text_emb" / n.replace("img", "text")) for n in img])
    np.testing.assert_allclose(text, texts, atol=2e-3)
    meta = [pq.read_table(out / "metadata" / n.replace("img_emb", "metadata").replace(".npy", ".parquet"))
            for n in img]
    assert [len(m) for m in meta] == [len(a) for a in arrays]
    rows = [r for m in meta for r in m.to_pylist()]
    assert meta[0].column_names[:2] == ["image_path", "caption"]
    assert [r["id"] for r in rows] == ids and [r["image_path"] for r in rows] == ids
    assert rows[5]["caption"] == "caption 5" and rows[5]["label"] == "l5" and "image_embedding" not in rows[5]
    with open(out / "img_emb" / img[0], "rb") as handle:
        assert np.lib.format.read_magic(handle) == (1, 0)
    assert json.loads((out / "export.json").read_text())["rows"] == 700
    assert not (out / "_work").exists()


def test_export_without_full_text_skips_text_emb(tmp_path):
    images = clustered(100, 16)
    captions = [None if i % 10 == 0 else f"c{i}" for i in range(100)]
    write_embed_output(str(tmp_path / "emb"), images, parts=2, text=clustered(100, 16, seed=5), captions=captions)
    out = tmp_path / "cr"
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(out)]) == 0
    assert not (out / "text_emb").exists() and len(os.listdir(out / "img_emb")) == 2


def test_export_empty_input_exit_2(tmp_path):
    write_embed_output(str(tmp_path / "emb"), clustered(10, 16)[:0], parts=1)
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "cr")]) == 2
    assert not (tmp_path / "cr").exists()
