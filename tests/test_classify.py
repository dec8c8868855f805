"""`clipbeam classify`: zero-shot labels from stored embeddings match open_clip computed directly."""

import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch

from clipbeam.cli import main
from clipbeam.models.clip import register_configs
from synthetic_embeddings import clustered, write_embed_output

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
    assert main(args) == 2  # finished output, no --overwrite


def test_bad_labels_exit_2(tmp_path):
    write_embed_output(str(tmp_path / "emb"), clustered(30, 64), parts=1)
    base = ["classify", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "o")]
    assert main(base + ["--labels", "cat"]) == 2
    assert main(base + ["--labels", "cat,dog", "--template", "no placeholder"]) == 2
    assert main(base + ["--labels-file", str(tmp_path / "missing.txt")]) == 2
    assert main(base + ["--labels", "cat,dog", "--model", "ViT-S-32"]) == 2  # 384-d model, 64-d embeddings
    assert not (tmp_path / "o").exists()
