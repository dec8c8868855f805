"""`clipbeam classify`: zero-shot labels from stored embeddings match open_clip computed directly."""

import json
import os

import apache_beam as beam
import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from synthetic_embeddings import clustered, unreadable_pages, write_embed_output

from clipbeam.cli import main
from clipbeam.layout import UnitLedger
from clipbeam.layout.embeddings.input_parts import embeddings_parts
from clipbeam.layout.embeddings.read import resolve_embeddings
from clipbeam.models.clip import register_configs
from clipbeam.transforms.classify_parts import ClassifyConfig, ClassifyParts

LABELS = ["cat", "dog", "person", "red square", "blue circle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
SEED = 7


def direct_text_features(labels, templates):
    register_configs()
    torch.manual_seed(SEED)
    model, _, _ = open_clip.create_model_and_transforms("clipbeam-tiny", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("clipbeam-tiny")
    out = []
    with torch.no_grad():
        for label in labels:
            f = model.encode_text(tokenizer([t.format(label) for t in templates])).float()
            f = f / f.norm(dim=-1, keepdim=True)
            m = f.mean(dim=0)
            out.append((m / m.norm()).numpy())
    return np.stack(out)


def test_top1_equals_open_clip_argmax(tmp_path):
    classes = direct_text_features(LABELS, TEMPLATES)
    rng = np.random.default_rng(0)
    # images near each label's text vector, plus unrelated ones
    near = classes[rng.integers(0, len(LABELS), 300)] + 0.05 * rng.standard_normal((300, 64)).astype(np.float32)
    images = np.concatenate([near, clustered(200, 64, seed=2)])
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    ids = write_embed_output(str(tmp_path / "emb"), images, parts=3, dtype=np.float32, seed=SEED)
    out = tmp_path / "labels"
    args = ["classify", "--embeddings", str(tmp_path / "emb"), "--labels", ",".join(LABELS), "--output", str(out),
            "--top-k", "3", "--runner", "DirectRunner"]
    for t in TEMPLATES:
        args += ["--template", t]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 500 and len(manifest["parts"]) == 3 and manifest["labels"] == LABELS
    table = pq.read_table([str(out / p["path"]) for p in manifest["parts"]])
    assert table.column_names == ["id", "label", "score", "top_labels", "top_scores"]
    assert table.column("id").to_pylist() == ids
    expected = np.argmax(images @ classes.T, axis=1)
    assert table.column("label").to_pylist() == [LABELS[i] for i in expected]
    top_scores = np.array(table.column("top_scores").to_pylist())
    assert np.all(np.diff(top_scores, axis=1) <= 0) and np.all(top_scores.sum(axis=1) <= 1 + 1e-5)
    logits = 100 * images @ classes.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(table.column("score").to_numpy(), probs.max(1), rtol=1e-3, atol=1e-5)
    kept = [(out / p["path"]).stat().st_mtime_ns for p in manifest["parts"]]
    assert main(args) == 0  # finished output, same settings: nothing to redo
    assert [(out / p["path"]).stat().st_mtime_ns for p in manifest["parts"]] == kept
    assert json.loads((out / "manifest.json").read_text())["rows"] == 500


def test_bad_labels_exit_2(tmp_path):
    write_embed_output(str(tmp_path / "emb"), clustered(30, 64), parts=1)
    base = ["classify", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "o")]
    assert main(base + ["--labels", "cat"]) == 2
    assert main(base + ["--labels", "cat,dog", "--template", "no placeholder"]) == 2
    assert main(base + ["--labels-file", str(tmp_path / "missing.txt")]) == 2
    assert main(base + ["--labels", "cat,dog", "--model", "ViT-S-32"]) == 2  # 384-d model, 64-d embeddings
    assert not (tmp_path / "o").exists()


def classify_args(emb, out, labels, *extra):
    return ["classify", "--embeddings", str(emb), "--labels", labels, "--output", str(out), *extra]


def test_worker_failure_exits_1_and_a_rerun_resumes(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "labels"
    write_embed_output(str(emb), clustered(90, 64), parts=3)
    with unreadable_pages(str(emb / "embeddings" / "part-00001.parquet")):
        assert main(classify_args(emb, out, "cat,dog")) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not (out / "labels" / "part-00001.parquet").exists()
    finished = {n: (out / "labels" / n).stat().st_mtime_ns for n in os.listdir(out / "labels")}
    assert main(classify_args(emb, out, "cat,dog")) == 0
    assert {n: (out / "labels" / n).stat().st_mtime_ns for n in finished} == finished  # kept, not redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 90 and [p["path"] for p in manifest["parts"]] == [
        f"labels/part-{i:05d}.parquet" for i in range(3)]


def test_rerun_with_other_labels_or_templates_refuses_or_redoes_all(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "labels"
    write_embed_output(str(emb), clustered(90, 64), parts=3)
    with unreadable_pages(str(emb / "embeddings" / "part-00001.parquet")):
        assert main(classify_args(emb, out, "cat,dog")) == 1  # stopped partway
    capsys.readouterr()
    assert main(classify_args(emb, out, "red,blue")) == 2
    assert main(classify_args(emb, out, "cat,dog", "--template", "a drawing of a {}.")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("other settings" in line and "--overwrite" in line for line in err)
    assert "labels: ['cat', 'dog'] -> ['red', 'blue']" in err[0]
    assert not (out / "manifest.json").exists()
    assert main(classify_args(emb, out, "red,blue", "--overwrite")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    table = pq.read_table([str(out / p["path"]) for p in manifest["parts"]])
    assert len(table) == 90 and set(table.column("label").to_pylist()) <= {"red", "blue"}
    assert manifest["labels"] == ["red", "blue"]


def test_classify_parts_transform(tmp_path):
    """ClassifyParts alone: one labels part per embeddings part, named by its embed part number, marked done."""
    emb = tmp_path / "emb"
    classes = np.eye(8, dtype=np.float32)[:3]
    vectors = classes[np.arange(40) % 3] + 0.01
    write_embed_output(str(emb), vectors / np.linalg.norm(vectors, axis=1, keepdims=True), parts=2,
                       dtype=np.float32)
    inputs = resolve_embeddings(str(emb))
    parts = embeddings_parts(inputs)
    ledger = UnitLedger(str(tmp_path / "out"))
    config = ClassifyConfig(str(tmp_path / "out"), {}, "image_embedding", 8, ("a", "b", "c"), classes, 2, 16, ledger)
    with BeamTestPipeline() as pipeline:
        done = (pipeline | beam.Create(parts) | ClassifyParts(config)
                | beam.Map(lambda r: (r.path, r.rows, r.skipped, r.rows_in)))
        assert_that(done, equal_to([(f"labels/part-0000{i}.parquet", 20, 0, 20) for i in range(2)]))
    table = pq.read_table(tmp_path / "out" / "labels" / "part-00001.parquet")
    assert table.column("label").to_pylist() == ["abc"[i % 3] for i in range(20, 40)]
    assert [len(t) for t in table.column("top_labels").to_pylist()] == [2] * 20
    assert sorted(ledger.done()) == ["part-00000", "part-00001"]


def test_multiprocess_runner(tmp_path):
    emb, out = tmp_path / "emb", tmp_path / "labels"
    write_embed_output(str(emb), clustered(60, 64), parts=3)
    assert main(classify_args(emb, out, "cat,dog", "--direct_num_workers", "2",
                              "--direct_running_mode", "multi_processing")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 60 and sorted(os.listdir(out / "_done")) == [f"part-0000{i}.json" for i in range(3)]
