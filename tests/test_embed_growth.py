"""embed over a growing corpus, and the shared output lifecycle as embed uses it:
part numbers by source, --prune, the lease, foreign folders, --overwrite, a complete fingerprint."""

from __future__ import annotations

import json
import logging
import os
import time

import imagefactory as imgs
import pytest
import webdataset as wds
from embedhelpers import embed, manifest, read_rows

from clipbeam.layout import LEASE_FILE, Lease, OutputFolder


def _shard(folder, name: str, seed: int) -> str:
    path = os.path.join(folder, f"{name}.tar")
    with wds.TarWriter(path) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": imgs.jpeg(seed * 10 + i), "txt": f"caption {name} {i}"})
    return path


def _bytes(out: str) -> dict[str, bytes]:
    found = {}
    for folder in ("embeddings", "failures"):
        base = os.path.join(out, folder)
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            with open(os.path.join(base, name), "rb") as handle:
                found[f"{folder}/{name}"] = handle.read()
    return found


def _tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    return str(folder)


def test_a_grown_input_embeds_only_the_new_shards(corpus, tmp_path, capsys):
    out = str(tmp_path / "emb")
    _shard(corpus, "01", 1)
    _shard(corpus, "03", 3)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    before, rows_before = _bytes(out), read_rows(out)
    _shard(corpus, "00", 0)
    _shard(corpus, "02", 2)
    capsys.readouterr()
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    err = capsys.readouterr().err
    assert "2 parts done already, 2 to run" in err
    after = _bytes(out)
    assert all(after[name] == data for name, data in before.items())  # old parts untouched, byte for byte
    parts = {p["source"].rsplit("/", 1)[-1]: p["part"] for p in manifest(out)["parts"]}
    assert parts == {"01.tar": 0, "03.tar": 1, "00.tar": 2, "02.tar": 3}
    rows_after = {r["id"]: r for r in read_rows(out)}
    assert len(rows_after) == 12
    for row in rows_before:  # ids stable: the same rows under the same ids
        assert rows_after[row["id"]]["sha256"] == row["sha256"]
        assert rows_after[row["id"]]["image_embedding"] == row["image_embedding"]
    assert manifest(out)["format_version"] == 3


def test_a_source_no_longer_in_the_input_is_kept_until_pruned(corpus, tmp_path, capsys):
    out = str(tmp_path / "emb")
    for name, seed in (("00", 0), ("01", 1), ("02", 2)):
        _shard(corpus, name, seed)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    os.remove(os.path.join(corpus, "01.tar"))
    capsys.readouterr()
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    err = capsys.readouterr().err
    assert "1 parts kept (--prune drops them)" in err and "2 parts done already, 0 to run" in err
    kept = [p for p in manifest(out)["parts"] if not p["in_input"]]
    assert [p["part"] for p in kept] == [1] and len(read_rows(out)) == 9
    assert embed("--input", f"{corpus}/*.tar", "--output", out, "--prune") == 0
    assert "1 parts dropped (--prune)" in capsys.readouterr().err
    assert [p["part"] for p in manifest(out)["parts"]] == [0, 2]
    assert sorted(os.listdir(os.path.join(out, "embeddings"))) == ["part-00000.parquet", "part-00002.parquet"]
    assert not os.path.exists(os.path.join(out, "_parts", "part-00001.json"))
    # a shard that comes back gets a new number; the others keep theirs
    _shard(corpus, "01", 1)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    assert {p["source"].rsplit("/", 1)[-1]: p["part"] for p in manifest(out)["parts"]} == {
        "00.tar": 0, "02.tar": 2, "01.tar": 3}


def test_a_second_run_into_a_leased_output_is_refused(corpus, tmp_path, capsys):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    os.makedirs(out)
    other = Lease(out, None).acquire()  # another run is writing here
    try:
        capsys.readouterr()
        assert embed("--input", f"{corpus}/*.tar", "--output", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "being written by another run" in err[0]
        assert _tree(out) == {LEASE_FILE}
    finally:
        other.release()
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0


def test_a_stale_lease_is_taken_over(corpus, tmp_path, caplog):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    os.makedirs(out)
    with open(os.path.join(out, LEASE_FILE), "w") as handle:
        json.dump({"owner": "gone-host:1:abc", "host": "gone-host", "pid": 1, "started": 0, "heartbeat": 0}, handle)
    with caplog.at_level(logging.WARNING, logger="clipbeam"):
        assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    assert "taking over the stale lease of gone-host:1:abc" in caplog.text
    assert not os.path.exists(os.path.join(out, LEASE_FILE)) and manifest(out)["rows"] == 3


def test_a_run_whose_lease_was_taken_over_stops_before_its_manifest(corpus, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    commit = OutputFolder.commit

    def taken_over_then_commit(self, manifest_fields):  # another run takes the lease just before the commit
        with open(os.path.join(out, LEASE_FILE), "w") as handle:
            json.dump({"owner": "other-host:7:def", "host": "other-host", "pid": 7, "started": 0,
                       "heartbeat": time.time()}, handle)
        return commit(self, manifest_fields)

    monkeypatch.setattr(OutputFolder, "commit", taken_over_then_commit)
    capsys.readouterr()
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the plan line; no traceback
    assert "LeaseLost" in last and "rerun the same command to resume" in last, last
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, LEASE_FILE)) as handle:
        assert json.load(handle)["owner"] == "other-host:7:def"  # the other run's lease is left alone


def test_a_foreign_non_empty_folder_is_refused_untouched(corpus, tmp_path, capsys):
    _shard(corpus, "00", 0)
    capsys.readouterr()
    for flags in ([], ["--overwrite"]):
        assert embed("--input", f"{corpus}/*.tar", "--output", corpus, *flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no clipbeam.embeddings output" in err[0]
        assert _tree(corpus) == {"00.tar"}


def test_overwrite_deletes_only_the_names_embed_owns(corpus, tmp_path):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    _shard(corpus, "01", 1)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    mine = {"notes.txt": b"mine", "embeddings/README.txt": b"mine too", "failures/keep.csv": b"a,b"}
    for name, data in mine.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "wb") as handle:
            handle.write(data)
    os.remove(os.path.join(corpus, "01.tar"))
    assert embed("--input", f"{corpus}/*.tar", "--output", out, "--overwrite") == 0
    tree = _tree(out)
    assert set(mine) <= tree
    assert "embeddings/part-00001.parquet" not in tree  # the old part of 01.tar was the job's: it went
    assert [p["source"].rsplit("/", 1)[-1] for p in manifest(out)["parts"]] == ["00.tar"]


@pytest.mark.parametrize("flags, key", [
    (["--max-pixels", "1000000"], "max_pixels"),
    (["--rows-per-part", "5"], "rows_per_part"),
    (["--format", "webdataset"], "format"),
    (["--caption-column", "alt"], "caption_column"),
    (["--image-column", "png"], "image_column"),
    (["--id-column", "uid"], "id_column"),
    (["--no-text"], "embed_text"),
])
def test_resume_with_any_result_changing_setting_is_refused(flags, key, corpus, tmp_path, capsys):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    capsys.readouterr()
    assert embed("--input", f"{corpus}/*.tar", "--output", out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and key in err[0]
    assert os.path.exists(os.path.join(out, "manifest.json"))  # refused before touching anything


def test_an_output_of_an_older_version_is_refused_on_resume_and_cleared_by_overwrite(corpus, tmp_path, capsys):
    out = str(tmp_path / "emb")
    _shard(corpus, "00", 0)
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 0
    # what format 2 left: _run.json instead of _job.json, parts named only in the manifest's entries
    os.remove(os.path.join(out, "_job.json"))
    with open(os.path.join(out, "_run.json"), "w") as handle:
        json.dump({"model": "clipbeam-tiny"}, handle)
    old = manifest(out)
    del old["files"]
    old["format_version"] = 2
    with open(os.path.join(out, "manifest.json"), "w") as handle:
        json.dump(old, handle)
    with open(os.path.join(out, "notes.txt"), "w") as handle:
        handle.write("mine")
    capsys.readouterr()
    assert embed("--input", f"{corpus}/*.tar", "--output", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older clipbeam" in err[0] and "--overwrite" in err[0]
    assert embed("--input", f"{corpus}/*.tar", "--output", out, "--overwrite") == 0
    assert "_run.json" not in _tree(out) and "notes.txt" in _tree(out)
    assert manifest(out)["format_version"] == 3
