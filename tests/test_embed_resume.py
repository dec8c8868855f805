"""Resume, --overwrite, atomic outputs, and bad arguments."""

from __future__ import annotations

import os

import imagefactory as imgs
import pytest
import webdataset as wds
from embedhelpers import embed, manifest, read_rows

from clipbeam.cli import main


@pytest.fixture
def shards(tmp_path):
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar")) as sink:
            for i in range(6):
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": imgs.jpeg(shard * 10 + i), "txt": f"c {i}"})
    return f"{tmp_path}/{{00000..00002}}.tar"


def _mtimes(out):
    folder = os.path.join(out, "embeddings")
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_rerun_redoes_only_a_deleted_part(shards, tmp_path):
    out = str(tmp_path / "out")
    assert embed("--input", shards, "--output", out) == 0
    before = _mtimes(out)
    rows_before = read_rows(out)
    os.remove(os.path.join(out, "embeddings", "part-00001.parquet"))
    assert embed("--input", shards, "--output", out) == 0
    after = _mtimes(out)
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    assert after["part-00001.parquet"] != before["part-00001.parquet"]
    assert read_rows(out) == rows_before  # nothing lost, nothing duplicated
    # a rerun with everything done touches no part
    assert embed("--input", shards, "--output", out) == 0
    assert _mtimes(out) == after
    # --overwrite redoes everything
    assert embed("--input", shards, "--output", out, "--overwrite") == 0
    assert all(_mtimes(out)[name] != after[name] for name in after)


def test_interrupted_run_leaves_no_manifest_and_resumes(shards, tmp_path):
    out = str(tmp_path / "out")
    assert embed("--input", shards, "--output", out) == 0
    # simulate a run killed after part 0: manifest gone, part 2 half-written
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "_parts", "part-00002.json"))
    with open(os.path.join(out, "embeddings", ".part-00002.parquet.tmp-dead"), "wb") as handle:
        handle.write(b"PAR1 half written")
    assert embed("--input", shards, "--output", out) == 0
    assert manifest(out)["rows"] == 18
    assert sorted(os.listdir(os.path.join(out, "embeddings"))) == [f"part-0000{i}.parquet" for i in range(3)]


def test_rerun_with_other_settings_is_refused(shards, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert embed("--input", shards, "--output", out) == 0
    capsys.readouterr()
    assert embed("--input", shards, "--output", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


@pytest.mark.parametrize("case", ["missing", "model", "checkpoint", "output", "json", "beam", "batch", "glob"])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(case, shards, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["embed", "--input", shards, "--output", str(out), "--model", "clipbeam-tiny", "--pretrained", "none"]
    if case == "missing":
        args[2] = str(tmp_path / "nothing-*.tar")
    elif case == "model":
        args[args.index("clipbeam-tiny")] = "ViT-Nope-99"
    elif case == "checkpoint":
        bad = tmp_path / "broken.pt"
        bad.write_bytes(b"not a checkpoint")
        args[args.index("none")] = str(bad)
    elif case == "output":
        blocker = tmp_path / "afile"
        blocker.write_text("x")
        out = blocker / "out"
        args[args.index("--output") + 1] = str(out)
    elif case == "json":
        args += ["--storage-options", "{not json"]
    elif case == "beam":
        args += ["--direct_num_wrkers", "2"]
    elif case == "batch":
        args += ["--batch-size", "0"]
    elif case == "glob":  # `--input corpus/*.tar` unquoted: the shell leaves the other shards as extra words
        first, *rest = sorted(str(p) for p in tmp_path.glob("*.tar"))
        args[2:3] = [first, *rest]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("clipbeam embed: error:")
    if case == "glob":
        assert "00001.tar" in err[0] and "quote it" in err[0]
    assert not out.exists()


def test_argparse_errors_are_one_line_too(capsys):
    assert main(["embed", "--output", "x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
