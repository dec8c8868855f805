"""Issue 22 item 6: every record the output lifecycle reads is validated.

A malformed done-marker means "unit not done" (discarded, the unit redone); a lease, run record or
heartbeat that no clipbeam run wrote is one line naming what to remove, exit 2; `--overwrite`
always recovers. Each record the hostile review broke, on a real embed output.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import imagefactory as imgs
import pytest
import webdataset as wds
from embedhelpers import embed, manifest

SHARDS = 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(input args, a finished embed output) to copy per case."""
    root = tmp_path_factory.mktemp("records")
    inputs = []
    for shard in range(SHARDS):
        path = str(root / f"{shard:05d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(3):
                sink.write({"__key__": f"{shard}{i:04d}", "jpg": imgs.jpeg(shard * 10 + i), "txt": f"c {i}"})
        inputs += ["--input", path]
    out = str(root / "out")
    assert embed(*inputs, "--output", out) == 0
    return inputs, out


@pytest.fixture
def copy(finished, tmp_path):
    inputs, out = finished
    mine = str(tmp_path / "out")
    shutil.copytree(out, mine)
    return inputs, mine


def _edit(path: str, change) -> None:
    with open(path) as handle:
        value = json.load(handle)
    with open(path, "w") as handle:
        json.dump(change(value), handle)


def _without(key):
    def change(marker):
        marker.pop(key)
        return marker
    return change


MARKER_CASES = {
    "files null": lambda m: dict(m, files=None),
    "files 5": lambda m: dict(m, files=5),
    "part x": lambda m: dict(m, part="x"),
    "no source": _without("source"),
    "rows x": lambda m: dict(m, rows="x"),
    "not an object": lambda m: [m],
}


@pytest.mark.parametrize("case", sorted(MARKER_CASES))
def test_a_malformed_marker_means_its_unit_is_redone(copy, case):
    inputs, out = copy
    marker = os.path.join(out, "_parts", "part-00001.json")
    _edit(marker, MARKER_CASES[case])
    before = os.stat(os.path.join(out, "embeddings", "part-00000.parquet")).st_mtime_ns
    assert embed(*inputs, "--output", out) == 0
    assert manifest(out)["rows"] == 6 and [p["part"] for p in manifest(out)["parts"]] == [0, 1]
    assert os.stat(os.path.join(out, "embeddings", "part-00000.parquet")).st_mtime_ns == before
    _edit(marker, MARKER_CASES[case])
    assert embed(*inputs, "--output", out, "--overwrite") == 0
    assert manifest(out)["rows"] == 6


def _lease(out: str, **fields) -> None:
    value = {"owner": "other:1:x", "host": "another-host", "pid": 1, "started": time.time(),
             "heartbeat": time.time(), **fields}
    with open(os.path.join(out, "_lease.json"), "w") as handle:
        json.dump(value, handle)


def _lease_folder(out: str) -> None:
    os.makedirs(os.path.join(out, "_lease.json", "inner"))


def _record_folder(out: str) -> None:
    os.remove(os.path.join(out, "_job.json"))
    os.makedirs(os.path.join(out, "_job.json"))


EXIT_2_CASES = {
    "lease is a folder": (_lease_folder, "_lease.json"),
    "heartbeat is a string": (lambda out: _lease(out, heartbeat="soon"), "_lease.json"),
    "heartbeat ten years ahead": (lambda out: _lease(out, heartbeat=time.time() + 315_360_000), "_lease.json"),
    "run record is a folder": (_record_folder, "_job.json"),
    "run record owns a number": (lambda out: _edit(os.path.join(out, "_job.json"), lambda r: dict(r, owned=5)),
                                 "_job.json"),
    "run record is a list": (lambda out: _edit(os.path.join(out, "_job.json"), lambda r: [r]), "_job.json"),
}


@pytest.mark.parametrize("case", sorted(EXIT_2_CASES))
def test_a_bad_lease_or_run_record_is_one_line_and_overwrite_recovers(copy, case, capsys):
    inputs, out = copy
    spoil, name = EXIT_2_CASES[case]
    spoil(out)
    capsys.readouterr()
    assert embed(*inputs, "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "remove" in err, err
    assert "Traceback" not in err
    assert embed(*inputs, "--output", out, "--overwrite") == 0
    assert manifest(out)["rows"] == 6 and os.path.isfile(os.path.join(out, "_job.json"))
    assert not os.path.exists(os.path.join(out, "_lease.json"))


def test_a_folder_listed_as_owned_is_neither_deleted_nor_fatal(copy):
    inputs, out = copy
    os.makedirs(os.path.join(out, "mine", "photos"))
    with open(os.path.join(out, "mine", "photos", "a.txt"), "w") as handle:
        handle.write("keep")
    _edit(os.path.join(out, "_job.json"), lambda r: dict(r, owned=[*r["owned"], "mine", "mine/photos"]))
    assert embed(*inputs, "--output", out) == 0
    assert embed(*inputs, "--output", out, "--overwrite") == 0
    assert os.path.isfile(os.path.join(out, "mine", "photos", "a.txt"))


def test_overwrite_removes_a_torn_marker_of_a_unit_no_run_will_redo(copy):
    inputs, out = copy
    torn = os.path.join(out, "_parts", "part-00009.json")
    with open(torn, "w") as handle:
        handle.write('{"part": 9, "sour')
    assert embed(*inputs, "--output", out, "--overwrite") == 0
    assert not os.path.exists(torn)
    assert sorted(os.listdir(os.path.join(out, "_parts"))) == ["part-00000.json", "part-00001.json"]
