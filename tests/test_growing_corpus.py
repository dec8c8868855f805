"""A daily job over a growing corpus: embed, index --append, classify and export touch only the new parts."""

from __future__ import annotations

import json
import os

import imagefactory as imgs
import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from embedhelpers import embed, read_rows

from clipbeam.cli import main
from clipbeam.index import ShardedIndex


def _shard(folder, name: str, seed: int) -> None:
    with wds.TarWriter(os.path.join(folder, f"{name}.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": imgs.jpeg(seed * 10 + i), "txt": f"caption {name} {i}"})


def _stamps(folder) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def _daily(corpus, root, capsys) -> dict[str, str]:
    """One day's job, the same commands every day (index --append builds the index on the first); their stderr."""
    emb, idx = root / "emb", root / "idx"
    err = {}
    assert embed("--input", f"{corpus}/*.tar", "--output", str(emb)) == 0
    assert main(["index", "--embeddings", str(emb), "--output", str(idx), "--index-factory", "Flat", "--append"]) == 0
    assert main(["classify", "--embeddings", str(emb), "--labels", "cat,dog,square", "--output",
                 str(root / "labels")]) == 0
    err["classify"] = capsys.readouterr().err
    assert main(["export", "--embeddings", str(emb), "--output", str(root / "cr")]) == 0
    err["export"] = capsys.readouterr().err
    return err


def test_second_day_processes_exactly_the_two_new_parts(tmp_path, capsys):
    corpus = tmp_path / "shards"
    corpus.mkdir()
    _shard(corpus, "01", 1)
    _shard(corpus, "03", 3)
    _daily(corpus, tmp_path, capsys)
    labels_before, img_before = _stamps(tmp_path / "labels" / "labels"), _stamps(tmp_path / "cr" / "img_emb")
    shard_before = (tmp_path / "idx" / "shard-00000.faiss").read_bytes()

    _shard(corpus, "00", 0)
    _shard(corpus, "02", 2)
    err = _daily(corpus, tmp_path, capsys)

    # index --append: one new shard holding exactly the rows of the two new embeddings parts
    index = ShardedIndex.open(str(tmp_path / "idx"))
    assert index.ntotal == 12 and len(index.manifest["shards"]) == 2
    assert (tmp_path / "idx" / "shard-00000.faiss").read_bytes() == shard_before
    new_ids = pq.read_table(tmp_path / "idx" / "shard-00001.ids.parquet").column("id").to_pylist()
    rows = {r["id"]: r for r in read_rows(str(tmp_path / "emb"))}
    assert sorted(rows[i]["source"].rsplit("/", 1)[-1] for i in new_ids) == ["00.tar"] * 3 + ["02.tar"] * 3
    # classify: parts 0 and 1 kept as they were, parts 2 and 3 labelled now
    assert "2 done already, 2 run now" in err["classify"]
    labels_after = _stamps(tmp_path / "labels" / "labels")
    assert sorted(labels_after) == [f"part-{n:05d}.parquet" for n in range(4)]
    assert {n: labels_after[n] for n in labels_before} == labels_before
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["rows"] == 12 and len(manifest["parts"]) == 4
    # export: the same, and the four partitions line up with the four embeddings parts
    assert "2 done already, 2 run now" in err["export"]
    img_after = _stamps(tmp_path / "cr" / "img_emb")
    assert sorted(img_after) == [f"img_emb_{n:05d}.npy" for n in range(4)]
    assert {n: img_after[n] for n in img_before} == img_before
    for n in range(4):
        part = pq.read_table(tmp_path / "emb" / "embeddings" / f"part-{n:05d}.parquet")
        exported = np.load(tmp_path / "cr" / "img_emb" / f"img_emb_{n:05d}.npy")
        np.testing.assert_allclose(exported, np.array(part.column("image_embedding").to_pylist()), atol=2e-3)
