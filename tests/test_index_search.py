"""`clipbeam search` with vectors and with text encoded by the model named in the manifest."""

import json

import numpy as np
from synthetic_embeddings import clustered, write_embed_output

from clipbeam.cli import main
from clipbeam.models.clip import ClipSpec, encode_texts, load_clip


def test_search_vectors_and_text(tmp_path, capsys):
    clip = load_clip(ClipSpec("clipbeam-tiny", "none", seed=3, device="cpu"))
    prompts = ["a red square", "a blue circle"]
    vectors = np.concatenate([clustered(400, 64, seed=1), encode_texts(clip, prompts)])
    ids = write_embed_output(str(tmp_path / "emb"), vectors, parts=2, dtype=np.float32, seed=3)
    out = tmp_path / "idx"
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(out), "--shards", "2"]) == 0
    capsys.readouterr()
    np.save(tmp_path / "q.npy", vectors[10])
    assert main(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy"), "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in lines] == [1, 2, 3]
    assert lines[0]["id"] == ids[10] and lines[0]["caption"] == "caption 10" and lines[0]["faiss_id"] == 10
    assert main(["search", "--index", str(out), "--text", prompts[1], "-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"# {prompts[1]}" and text[1].split("\t")[2] == ids[401]
