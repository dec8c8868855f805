"""`clipbeam export --format clip-retrieval`: files read back row-aligned, as clip-retrieval's readers do."""

import json
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from synthetic_embeddings import clustered, unreadable_pages, write_embed_output

from clipbeam.cli import main
from clipbeam.layout.embeddings.input_parts import embeddings_parts
from clipbeam.layout.embeddings.read import resolve_embeddings
from clipbeam.transforms.export_parts import ExportConfig, ExportParts, Partition


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


def test_missing_captions_keep_text_emb_aligned_with_zero_vectors(tmp_path):
    images, texts = clustered(100, 16), clustered(100, 16, seed=5)
    captions = [None if i % 10 == 0 else f"c{i}" for i in range(100)]
    write_embed_output(str(tmp_path / "emb"), images, parts=2, text=texts, captions=captions)
    out = tmp_path / "cr"
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(out)]) == 0
    names = sorted(os.listdir(out / "text_emb"))
    assert names == ["text_emb_00000.npy", "text_emb_00001.npy"]
    text = np.concatenate([np.load(out / "text_emb" / n) for n in names])
    meta = pq.read_table([str(out / "metadata" / n.replace("text_emb", "metadata").replace(".npy", ".parquet"))
                          for n in names])
    has_text = np.array(meta.column("has_text").to_pylist())
    assert meta.schema.field("has_text").type == "bool" and len(text) == len(meta) == 100
    assert list(has_text) == [c is not None for c in captions]
    assert not text[~has_text].any()
    np.testing.assert_allclose(text[has_text], texts.astype(np.float16)[has_text], atol=2e-3)
    assert json.loads((out / "export.json").read_text())["text"] is True


def test_text_missing_drop_skips_text_emb(tmp_path):
    images = clustered(100, 16)
    captions = [None if i % 10 == 0 else f"c{i}" for i in range(100)]
    write_embed_output(str(tmp_path / "emb"), images, parts=2, text=clustered(100, 16, seed=5), captions=captions)
    out = tmp_path / "cr"
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(out), "--text-missing", "drop"]) == 0
    assert not (out / "text_emb").exists() and len(os.listdir(out / "img_emb")) == 2
    assert json.loads((out / "export.json").read_text())["text"] is False
    (out / "text_emb").mkdir()
    (out / "text_emb" / "notes.txt").write_text("mine")  # not the export's: a rerun must leave it
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(out), "--text-missing", "drop"]) == 0
    assert os.listdir(out / "text_emb") == ["notes.txt"]


def test_export_empty_input_exit_2(tmp_path):
    write_embed_output(str(tmp_path / "emb"), clustered(10, 16)[:0], parts=1)
    assert main(["export", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "cr")]) == 2
    assert not (tmp_path / "cr").exists()


def export_args(emb, out, *extra):
    return ["export", "--embeddings", str(emb), "--format", "clip-retrieval", "--output", str(out), *extra]


def read_img_emb(out):
    return np.concatenate([np.load(out / "img_emb" / n) for n in sorted(os.listdir(out / "img_emb"))])


def test_worker_failure_exits_1_and_a_rerun_resumes(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "cr"
    images = clustered(90, 16)
    write_embed_output(str(emb), images, parts=3, dtype=np.float32)
    with unreadable_pages(str(emb / "embeddings" / "part-00002.parquet")):
        assert main(export_args(emb, out)) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "export.json").exists() and not (out / "img_emb" / "img_emb_00002.npy").exists()
    finished = {n: (out / "img_emb" / n).stat().st_mtime_ns for n in os.listdir(out / "img_emb")}
    assert main(export_args(emb, out)) == 0
    assert {n: (out / "img_emb" / n).stat().st_mtime_ns for n in finished} == finished  # kept, not redone
    np.testing.assert_allclose(read_img_emb(out), images, atol=2e-3)
    assert json.loads((out / "export.json").read_text())["rows"] == 90


def test_rerun_with_other_settings_refuses_or_redoes_all(tmp_path, capsys):
    first, other, out = tmp_path / "a", tmp_path / "b", tmp_path / "cr"
    write_embed_output(str(first), clustered(90, 16, seed=1), parts=3, dtype=np.float32)
    images = clustered(90, 16, seed=2)
    write_embed_output(str(other), images, parts=3, dtype=np.float32)
    with unreadable_pages(str(first / "embeddings" / "part-00001.parquet")):
        assert main(export_args(first, out)) == 1  # stopped partway
    capsys.readouterr()
    assert main(export_args(other, out)) == 2
    assert main(export_args(first, out, "--text-missing", "drop")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("other settings" in line and "--overwrite" in line for line in err)
    assert "embeddings" in err[0] and "text_missing: 'zero' -> 'drop'" in err[1]
    assert main(export_args(other, out, "--overwrite")) == 0
    np.testing.assert_allclose(read_img_emb(out), images, atol=2e-3)
    assert json.loads((out / "export.json").read_text())["embeddings"] == str(other)


def test_export_parts_transform(tmp_path):
    """ExportParts alone: one aligned partition per embeddings part, named by its embed part number."""
    emb, out = tmp_path / "emb", tmp_path / "cr"
    images, texts = clustered(30, 8), clustered(30, 8, seed=3)
    write_embed_output(str(emb), images, parts=2, text=texts, captions=[None] + [f"c{i}" for i in range(1, 30)])
    parts = embeddings_parts(resolve_embeddings(str(emb)))[1:]  # part 1 alone: partition 1, not 0
    config = ExportConfig(str(out), {}, 8, 5, 4, True, "drop", None)
    with BeamTestPipeline() as pipeline:
        assert_that(pipeline | beam.Create(parts) | ExportParts(config),
                    equal_to([Partition(1, 15, True, parts[0].file.url, 15)]))
    assert sorted(os.listdir(out / "img_emb")) == ["img_emb_00001.npy"]
    np.testing.assert_allclose(np.load(out / "text_emb" / "text_emb_00001.npy"), texts[15:], atol=2e-3)
    meta = pq.read_table(out / "metadata" / "metadata_00001.parquet")
    assert meta.column_names[:3] == ["image_path", "caption", "has_text"] and all(meta.column("has_text").to_pylist())


def test_export_to_s3_resumes_there(tmp_path, s3_server):
    import s3fs

    storage_options = s3_server["storage_options"]
    emb, out = tmp_path / "emb", f"s3://{s3_server['bucket']}/cr"
    images = clustered(60, 8)
    write_embed_output(str(emb), images, parts=2, dtype=np.float32)
    args = export_args(emb, out, "--storage-options", json.dumps(storage_options))
    assert main(args) == 0
    fs = s3fs.S3FileSystem(**storage_options)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/img_emb")) == ["img_emb_00000.npy", "img_emb_00001.npy"]
    with fs.open(f"{out}/img_emb/img_emb_00001.npy") as handle:
        np.testing.assert_allclose(np.load(handle), images[30:], atol=2e-3)
    assert not fs.exists(f"{out}/_lease.json")
    assert main(args) == 0  # a rerun finds both parts done there
    assert json.loads(fs.cat(f"{out}/export.json"))["rows"] == 60


def test_an_export_of_version_1_is_replaced_with_overwrite_only(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "cr"
    write_embed_output(str(emb), clustered(40, 8), parts=2)
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        os.makedirs(out / kind)
        for n in range(3):
            (out / kind / f"{kind}_{n:05d}.{ext}").write_bytes(b"old")
    (out / "export.json").write_text(json.dumps({"format": "clip-retrieval", "rows": 3, "partitions": [
        {"partition": f"{n:05d}", "rows": 1, "text": True, "source": "x"} for n in range(3)]}))
    (out / "notes.txt").write_text("mine")
    assert main(export_args(emb, out)) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "img_emb" / "img_emb_00002.npy").exists()
    assert main(export_args(emb, out, "--overwrite")) == 0
    assert sorted(os.listdir(out / "img_emb")) == ["img_emb_00000.npy", "img_emb_00001.npy"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "export.json").read_text())["version"] == 2
