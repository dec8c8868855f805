"""Issue 22 item 7: a lost part is redone under its own number, and an index notices parts that changed.

The review's sequence: a finished embed output loses `embeddings/part-00001.parquet` and
`manifest.json` (a crash plus a lost file), and embed runs again; then `index --append` on the old
index, and `index --verify`.
"""

from __future__ import annotations

import os

import imagefactory as imgs
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from embedhelpers import embed, manifest

from clipbeam.cli import main

INDEX = ["--index-factory", "Flat", "--runner", "DirectRunner"]


@pytest.fixture
def corpus(tmp_path):
    """Three shards of 4 samples; shard 1 has one sample that fails to decode."""
    inputs = []
    for shard in range(3):
        path = str(tmp_path / f"{shard:05d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(4):
                image = b"not an image" if (shard, i) == (1, 3) else imgs.jpeg(shard * 10 + i)
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": image, "txt": f"c {i}"})
        inputs += ["--input", path]
    return inputs


def _lose_part_one(out: str) -> None:
    os.remove(os.path.join(out, "embeddings", "part-00001.parquet"))
    os.remove(os.path.join(out, "manifest.json"))


def test_a_lost_part_is_redone_under_its_own_number(corpus, tmp_path):
    out = str(tmp_path / "emb")
    assert embed(*corpus, "--output", out) == 3
    first = manifest(out)
    _lose_part_one(out)
    assert embed(*corpus, "--output", out) == 3
    again = manifest(out)
    assert [(p["part"], p["source"]) for p in again["parts"]] == [(p["part"], p["source"]) for p in first["parts"]]
    assert sorted(os.listdir(os.path.join(out, "embeddings"))) == [f"part-0000{i}.parquet" for i in range(3)]
    assert pq.read_table(os.path.join(out, "failures")).num_rows == again["failures"] == 1
    # the map survives a second loss before any manifest is written again
    _lose_part_one(out)
    os.remove(os.path.join(out, "_parts", "part-00001.json"))
    assert embed(*corpus, "--output", out) == 3
    assert [p["part"] for p in manifest(out)["parts"]] == [0, 1, 2]


def test_index_append_and_verify_notice_a_part_that_changed(corpus, tmp_path, capsys):
    emb, idx = str(tmp_path / "emb"), str(tmp_path / "idx")
    assert embed(*corpus, "--output", emb) == 3
    assert main(["index", "--embeddings", emb, "--output", idx, *INDEX]) == 0
    _lose_part_one(emb)
    assert embed(*corpus, "--output", emb) == 3
    assert main(["index", "--embeddings", emb, "--output", idx, "--append", *INDEX]) == 0  # nothing new
    assert main(["index", "--output", idx, "--verify"]) == 0
    os.remove(os.path.join(emb, "embeddings", "part-00002.parquet"))
    capsys.readouterr()
    assert main(["index", "--output", idx, "--verify"]) == 2
    assert "part-00002.parquet is missing" in capsys.readouterr().err
    # what the old resume did: part 1's source came back as a new part, listed in the manifest
    assert embed(*corpus, "--output", emb) == 3
    os.rename(os.path.join(emb, "embeddings", "part-00001.parquet"), os.path.join(emb, "embeddings",
                                                                                  "part-00004.parquet"))
    with open(os.path.join(emb, "manifest.json")) as handle:
        text = handle.read().replace("embeddings/part-00001.parquet", "embeddings/part-00004.parquet")
    with open(os.path.join(emb, "manifest.json"), "w") as handle:
        handle.write(text)
    capsys.readouterr()
    assert main(["index", "--embeddings", emb, "--output", idx, "--append", *INDEX]) == 2
    err = capsys.readouterr().err.strip()
    assert "part-00001.parquet was indexed with 3 rows and now is gone" in err, err
    assert "\n" not in err
