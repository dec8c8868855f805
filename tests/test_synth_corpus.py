"""clipbeam synth-corpus: deterministic webdataset shards of "a {color} {shape}" that embed reads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import tarfile

import numpy as np
import pytest
from embedhelpers import embed, manifest, read_failures, read_rows
from PIL import Image

from clipbeam.cli import main
from clipbeam.models import shapes


def synth(out: str, *extra: str) -> int:
    return main(["synth-corpus", "--output", out, *extra])


def digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth") / "corpus")
    assert synth(out, "--n", "50", "--seed", "7", "--shard-size", "20") == 0
    return out


def test_layout_and_sample_format(corpus):
    assert sorted(os.listdir(corpus)) == ["00000.tar", "00001.tar", "00002.tar", "_job.json", "corpus.json"]
    record = json.load(open(os.path.join(corpus, "corpus.json")))
    assert record["n"] == 50 and record["seed"] == 7 and record["shards"][-1] == "00002.tar"
    assert len(record["classes"]) == 24
    items = members(os.path.join(corpus, "00000.tar"))
    assert len(items) == 60
    names = [name for name, _ in items]
    assert names[:3] == ["00000000.png", "00000000.txt", "00000000.json"]
    png, txt, meta = items[0][1], items[1][1].decode(), json.loads(items[2][1])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert txt == f"a {meta['color']} {meta['shape']}"
    assert meta["color"] in shapes.COLORS and meta["shape"] in shapes.SHAPES
    assert meta["seed"] == shapes.sample_seed(7, 0) and meta["index"] == 0
    assert 0.25 <= meta["size"] <= 0.75
    # the JSON's seed alone redraws the exact pixels
    again = shapes.render(shapes.draw_params(meta["seed"]))
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_pixels_match_the_caption(corpus):
    """The shape's pixels carry the caption's color; the background is gray."""
    for name, data in members(os.path.join(corpus, "00001.tar")):
        if not name.endswith(".json"):
            continue
        meta = json.loads(data)
        sample = shapes.draw_params(meta["seed"])
        pixels = np.asarray(shapes.render(sample)).astype(int)
        corner = pixels[:3, :3].reshape(-1, 3)
        assert np.abs(corner - corner.mean(axis=1, keepdims=True)).max() < 25  # gray, mild noise
        centre = pixels[int(sample.cy * 64), int(sample.cx * 64)]
        assert np.abs(centre - np.array(shapes.COLORS[meta["color"]])).max() < 45, meta


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, corpus):
    again = str(tmp_path / "again")
    assert synth(again, "--n", "50", "--seed", "7", "--shard-size", "20") == 0
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert digest(os.path.join(again, name)) == digest(os.path.join(corpus, name))
    other = str(tmp_path / "other")
    assert synth(other, "--n", "20", "--seed", "8", "--shard-size", "20") == 0
    assert digest(os.path.join(other, "00000.tar")) != digest(os.path.join(corpus, "00000.tar"))
    # sharding does not change samples: sample 25 is the same in shards of 20 and of 50
    whole = str(tmp_path / "whole")
    assert synth(whole, "--n", "50", "--seed", "7", "--shard-size", "50") == 0
    by_name = dict(members(os.path.join(whole, "00000.tar")))
    assert by_name["00000025.png"] == dict(members(os.path.join(corpus, "00001.tar")))["00000025.png"]


def test_rerun_resumes_and_refuses_another_corpus(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert synth(out, "--n", "30", "--seed", "1", "--shard-size", "10") == 0
    os.remove(os.path.join(out, "00001.tar"))
    before = os.path.getmtime(os.path.join(out, "00000.tar"))
    assert synth(out, "--n", "30", "--seed", "1", "--shard-size", "10") == 0
    assert os.path.exists(os.path.join(out, "00001.tar"))
    assert os.path.getmtime(os.path.join(out, "00000.tar")) == before
    capsys.readouterr()
    assert synth(out, "--n", "30", "--seed", "2", "--shard-size", "10") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (seed: 1 -> 2)" in err[0], err
    assert synth(out, "--n", "20", "--seed", "2", "--shard-size", "10", "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "_job.json", "corpus.json"]


def test_overwrite_deletes_only_the_shards_it_wrote(tmp_path):
    out = tmp_path / "c"
    assert synth(str(out), "--n", "30", "--seed", "1", "--shard-size", "10") == 0
    (out / "mine.tar").write_bytes(b"a tar the user keeps here")
    (out / "notes.txt").write_text("notes")
    assert synth(str(out), "--n", "10", "--seed", "3", "--shard-size", "10", "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "_job.json", "corpus.json", "mine.tar", "notes.txt"]
    assert (out / "mine.tar").read_bytes() == b"a tar the user keeps here"


def test_refuses_a_folder_that_holds_something_else(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"someone else's shard")
    capsys.readouterr()
    assert synth(str(out), "--n", "10", "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no clipbeam.synth-corpus output" in err[0], err
    assert (out / "00000.tar").read_bytes() == b"someone else's shard" and os.listdir(out) == ["00000.tar"]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG while the block lasts (a full disk or quota, for this process)."""
    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_signal)


def test_a_failed_write_exits_1_and_a_rerun_finishes(tmp_path, capsys):
    out = tmp_path / "c"
    capsys.readouterr()
    with file_size_limit(60_000):  # a 20-sample shard is larger: its write fails inside the pipeline
        assert synth(str(out), "--n", "45", "--seed", "1", "--shard-size", "20") == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "corpus.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert "00000.tar" not in written
    assert synth(str(out), "--n", "45", "--seed", "1", "--shard-size", "20") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written  # kept, not redrawn


@pytest.mark.parametrize("args", [["--n", "0"], ["--n", "5", "--shard-size", "0"], ["--n", "5", "--seed", "-1"]])
def test_bad_arguments_write_nothing(tmp_path, args):
    out = str(tmp_path / "bad")
    assert synth(out, *args) == 2
    assert not os.path.exists(out)


def test_heldout_set_is_balanced_and_apart_from_the_corpus():
    items = shapes.heldout_set(2, seed=7)
    assert len(items) == 48
    labels = [s.label for _, s in items]
    assert sorted(labels) == sorted(list(range(24)) * 2)
    assert {s.seed for _, s in items}.isdisjoint({shapes.sample_seed(7, i) for i in range(1000)})
    again = shapes.heldout_set(2, seed=7)
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(items, again, strict=True))


def test_embed_reads_the_corpus(tmp_path, corpus):
    out = str(tmp_path / "emb")
    assert embed("--input", os.path.join(corpus, "{00000..00002}.tar"), "--output", out) == 0
    rows = read_rows(out)
    assert len(rows) == 50 and not read_failures(out)
    assert manifest(out)["dim"] == 64
    by_id = {row["id"]: row for row in rows}
    row = by_id["00001/00000025"]
    assert row["caption"] == f"a {row['color']} {row['shape']}"
    assert row["width"] == row["height"] == 64
    assert len(row["image_embedding"]) == 64 and row["text_embedding"] is not None
