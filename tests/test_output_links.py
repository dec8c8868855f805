"""Issue 22 item 1: the output lifecycle never deletes through a symbolic link (local disks).

Each case of the hostile review: an owned folder replaced by a link, and a link `vl -> elsewhere`
whose `vl/secret.txt` is listed in the run record, an embed `_parts/` marker or an index `_done/`
marker, under `embed --overwrite`, `embed --prune` and `index --overwrite`.
"""

from __future__ import annotations

import json
import os

import imagefactory as imgs
import numpy as np
import pytest
import webdataset as wds
from embedhelpers import embed, manifest
from synthetic_embeddings import clustered, write_embed_output

from clipbeam.cli import main
from clipbeam.errors import UsageError
from clipbeam.layout import RUN_RECORD, Mode, OutputKind, UnitLedger, open_output

KIND = OutputKind("clipbeam.test", markers="_done")


@pytest.fixture
def elsewhere(tmp_path):
    """A folder outside every output, with files a hostile link points at."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for name in ("secret.txt", "part-00000.parquet", "part-00001.parquet"):
        (folder / name).write_text("keep me")
    return folder


def _kept(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _run(url, mode=Mode.RESUME, units=("u1",)):
    with open_output(url, KIND, {"s": 1}, mode) as out:
        for unit in units:
            name = f"data/{unit}.bin"
            out.claim([name])
            os.makedirs(os.path.dirname(out.path(name)), exist_ok=True)
            with open(out.path(name), "w") as handle:
                handle.write("x")
            out.mark_done(unit, {}, files=[name])
        out.commit({})


def _add_owned(out: str, name: str) -> None:
    path = os.path.join(out, RUN_RECORD)
    with open(path) as handle:
        record = json.load(handle)
    record["owned"].append(name)
    with open(path, "w") as handle:
        json.dump(record, handle)


def test_overwrite_never_deletes_through_a_linked_folder_named_in_the_run_record(tmp_path, elsewhere):
    out = str(tmp_path / "out")
    _run(out)
    os.symlink(elsewhere, os.path.join(out, "vl"))
    _add_owned(out, "vl/secret.txt")
    _run(out, Mode.CLEAR)
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]


def test_a_marker_naming_a_file_through_a_link_deletes_nothing_there(tmp_path, elsewhere):
    out = str(tmp_path / "out")
    _run(out)
    os.symlink(elsewhere, os.path.join(out, "vl"))
    with open(os.path.join(out, "_done", "evil.json"), "w") as handle:
        json.dump({"unit": "evil", "files": ["vl/secret.txt"]}, handle)
    UnitLedger(out).discard({"evil": {"files": ["vl/secret.txt"]}})  # what --prune and stale shards do
    _run(out, Mode.CLEAR)
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]


def test_an_owned_folder_replaced_by_a_link_loses_the_link_only(tmp_path, elsewhere):
    out = str(tmp_path / "out")
    _run(out, units=("part-00000", "part-00001"))
    data = os.path.join(out, "data")
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    os.rmdir(data)
    os.symlink(elsewhere, data)
    _add_owned(out, "data/part-00000.parquet")
    with pytest.raises(UsageError, match="symbolic link"):  # resume would write through it: refused
        _run(out, units=("u9",))
    _run(out, Mode.CLEAR)
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]
    assert not os.path.islink(data) and os.listdir(data) == ["u1.bin"]


def test_a_name_that_is_itself_a_link_loses_the_link_never_its_target(tmp_path, elsewhere):
    out = str(tmp_path / "out")
    _run(out)
    os.symlink(elsewhere / "secret.txt", os.path.join(out, "data", "mine.txt"))
    _add_owned(out, "data/mine.txt")
    os.symlink(elsewhere, os.path.join(out, "_done", "linked"))  # a link inside a folder removed whole
    _run(out, Mode.CLEAR)
    assert not os.path.lexists(os.path.join(out, "data", "mine.txt"))
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]


@pytest.fixture
def shards(tmp_path):
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": imgs.jpeg(shard * 10 + i), "txt": f"c {i}"})
    return [str(tmp_path / f"{shard:05d}.tar") for shard in range(2)]


def test_embed_overwrite_keeps_the_files_an_embeddings_link_points_to(shards, tmp_path, elsewhere):
    out = str(tmp_path / "out")
    assert embed("--input", shards[0], "--input", shards[1], "--output", out) == 0
    real = os.path.join(out, "embeddings")
    for name in os.listdir(real):
        os.remove(os.path.join(real, name))
    os.rmdir(real)
    os.symlink(elsewhere, real)
    assert embed("--input", shards[0], "--input", shards[1], "--output", out, "--overwrite") == 0
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]
    assert not os.path.islink(real) and manifest(out)["rows"] == 6


@pytest.mark.parametrize("flag", ["--overwrite", "--prune"])
def test_embed_overwrite_and_prune_never_delete_through_a_link_in_a_marker(shards, tmp_path, elsewhere, flag):
    out = str(tmp_path / "out")
    assert embed("--input", shards[0], "--input", shards[1], "--output", out) == 0
    os.symlink(elsewhere, os.path.join(out, "vl"))
    marker_path = os.path.join(out, "_parts", "part-00001.json")
    with open(marker_path) as handle:
        marker = json.load(handle)
    marker["files"].append("vl/secret.txt")
    with open(marker_path, "w") as handle:
        json.dump(marker, handle)
    _add_owned(out, "vl/part-00000.parquet")
    assert embed("--input", shards[0], "--output", out, flag) == 0
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]


def test_index_overwrite_never_deletes_through_a_link_in_a_marker(tmp_path, elsewhere):
    emb, idx = str(tmp_path / "emb"), str(tmp_path / "idx")
    write_embed_output(emb, clustered(300, 16, seed=1).astype(np.float32), parts=2)
    args = ["index", "--embeddings", emb, "--output", idx, "--index-factory", "Flat", "--runner", "DirectRunner"]
    assert main(args) == 0
    os.symlink(elsewhere, os.path.join(idx, "vl"))
    with open(os.path.join(idx, "_done", "shard-00000.json")) as handle:
        marker = json.load(handle)
    marker["files"].append("vl/secret.txt")
    with open(os.path.join(idx, "_done", "shard-00000.json"), "w") as handle:
        json.dump(marker, handle)
    _add_owned(idx, "vl/part-00001.parquet")
    assert main([*args, "--overwrite"]) == 0
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001.parquet", "secret.txt"]


@pytest.mark.parametrize("flag", ["--overwrite", None])
def test_embed_never_removes_fragments_through_a_linked_fragments_folder(shards, tmp_path, elsewhere, flag):
    """embed removes each part's `_fragments/part-N` folder whole once the part is written: never
    through a `_fragments` that is a link (the run then refuses, or unlinks it under --overwrite)."""
    out = str(tmp_path / "out")
    assert embed("--input", shards[0], "--output", out) == 0
    (elsewhere / "part-00001").mkdir()
    (elsewhere / "part-00001" / "keep.txt").write_text("keep me")
    os.symlink(elsewhere, os.path.join(out, "_fragments"))
    code = embed("--input", shards[0], "--input", shards[1], "--output", out, *([flag] if flag else []))
    assert (elsewhere / "part-00001" / "keep.txt").read_text() == "keep me"
    assert _kept(elsewhere) == ["part-00000.parquet", "part-00001", "part-00001.parquet", "secret.txt"]
    if flag:  # the link goes, a real folder follows
        assert code == 0 and manifest(out)["rows"] == 6
        assert not os.path.islink(os.path.join(out, "_fragments"))
    else:
        assert code == 2, "a resumed run refuses to write through the link"
