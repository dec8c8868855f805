"""Hostile corpora (issue 12): no sample vanishes, no member fills memory, no manifest reads outside its home."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import imagefactory as imgs
from clipbeam.errors import UsageError
from clipbeam.transforms.corpus_plan import ManifestColumns, plan_parts
from clipbeam.transforms.corpus_read import ReadLimits, image_url, read_part
from clipbeam.transforms.manifest_table import read_manifest_table
from embedhelpers import embed, manifest, read_failures, read_rows, write_tar


def shard_with_sidecars(path, sidecars: dict[str, bytes]) -> None:
    members = []
    for key in ("a", "b", "c", "d"):
        members += [(f"{key}.jpg", imgs.jpeg(ord(key))), (f"{key}.txt", f"caption {key}".encode())]
        if key in sidecars:
            members.append((f"{key}.json", sidecars[key]))
    write_tar(str(path), members)


def records(path, limits: ReadLimits = ReadLimits()) -> dict[str, dict]:
    parts = plan_parts([str(path)])
    return {r["id"].rsplit("/", 1)[-1]: r for i, p in enumerate(parts) for r in read_part(i, p, None, None, limits)}


@pytest.mark.parametrize("bad", [b"1" * 5000, b"[" * 100_000, b"\xff\xfe not utf-8", b'{"n": 1' + b"0" * 30 + b"}"])
def test_bad_json_sidecar_marks_only_its_sample(tmp_path, bad):
    shard_with_sidecars(tmp_path / "s.tar", {"a": b'{"k": 1}', "b": bad, "c": b'{"k": 3}'})
    got = records(tmp_path / "s.tar")
    assert sorted(got) == ["a", "b", "c", "d"]
    assert all("stage" not in r for r in got.values())
    assert got["a"]["meta"] == {"k": 1} and got["c"]["meta"] == {"k": 3}
    meta_b = got["b"]["meta"]
    assert meta_b.get("json_raw") or isinstance(meta_b.get("n"), str)  # raw text kept, or int64 overflow as text


def test_embed_counts_every_sample_of_a_shard_with_a_hostile_sidecar(tmp_path):
    """The issue's reproduction: samples a-d, b.json holds a 5,000-digit integer."""
    shard_with_sidecars(tmp_path / "s.tar", {"b": b"1" * 5000, "c": b'{"deep": ' + b"[" * 50 + b"]" * 50 + b"}"})
    out = str(tmp_path / "emb")
    assert embed("--input", str(tmp_path / "s.tar"), "--output", out) == 0
    info = manifest(out)
    assert (info["samples"], info["rows"], info["failures"]) == (4, 4, 0)
    rows = {r["id"].rsplit("/", 1)[-1]: r for r in read_rows(out)}
    assert rows["b"]["json_raw"] == "1" * 5000


def test_member_over_the_cap_fails_before_it_is_read(tmp_path):
    shard_with_sidecars(tmp_path / "s.tar", {"b": b'{"pad": "' + b"x" * 5000 + b'"}'})
    got = records(tmp_path / "s.tar", ReadLimits(max_member_bytes=4000))
    assert sorted(got) == ["a", "b", "c", "d"]
    assert got["b"]["stage"] == "read" and "over --max-member-bytes 4000" in got["b"]["error"]
    assert all("stage" not in got[k] for k in "acd")


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse members")
def test_gnu_sparse_members_keep_memory_flat(tmp_path):
    """A 10 KB GNU sparse tar whose members expand to 400 MB each: read failures, memory flat."""
    src = tmp_path / "src"
    src.mkdir()
    for key in ("a", "b", "c"):
        with open(src / f"{key}.jpg", "wb") as handle:
            handle.truncate(400 * 1024 * 1024)
    (src / "d.jpg").write_bytes(imgs.jpeg(4))
    shard = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(src),
                    "a.jpg", "b.jpg", "c.jpg", "d.jpg"], check=True)
    for key in ("a", "b", "c"):
        os.remove(src / f"{key}.jpg")
    assert shard.stat().st_size < 100_000
    tracemalloc.start()
    try:
        got = records(shard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(got) == ["a", "b", "c", "d"]
    assert all("over --max-member-bytes" in got[k]["error"] for k in "abc")
    assert "stage" not in got["d"]
    assert peak < 32 * 1024 * 1024, peak


def write_rows(path, rows: list[dict], kind: str) -> str:
    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        with open(path, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_duplicate_ids_are_read_failures_and_the_run_finishes(tmp_path, kind):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(imgs.jpeg(i))
        rows.append({"uid": ["x", "y", "x", "z", "y"][i], "image": f"img/{i}.jpg", "caption": f"c{i}"})
    table = write_rows(tmp_path / f"rows.{kind}", rows, kind)
    out = str(tmp_path / "emb")
    args = ["--input", table, "--output", out, "--id-column", "uid", "--rows-per-part", "2"]
    assert embed(*args) == 3
    info = manifest(out)
    assert (info["samples"], info["rows"], info["failures"]) == (5, 3, 2)
    assert sorted(r["id"] for r in read_rows(out)) == ["x", "y", "z"]
    errors = sorted(f["error"] for f in read_failures(out))
    assert errors == ["duplicate id x, first at row 0 of rows", "duplicate id y, first at row 1 of rows"]
    assert embed(*args) == 3  # a rerun finishes too (nothing to redo)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_manifest_parts_read_their_rows_as_a_stream(tmp_path, kind):
    rows = [{"n": i, "image": f"{i}.jpg", "pad": "p" * 200} for i in range(20_000)]
    table = write_rows(tmp_path / f"rows.{kind}", rows, kind)
    tracemalloc.start()
    try:
        part = read_manifest_table(table, None, 19_900, 20_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert part.column("n").to_pylist() == list(range(19_900, 20_000))
    assert read_manifest_table(table, None, 3, 5).column("n").to_pylist() == [3, 4]
    assert peak < 8 * 1024 * 1024, peak


def test_remote_manifest_may_not_name_local_files():
    assert image_url("img/a.jpg", "s3://b/m/rows.parquet") == "s3://b/m/img/a.jpg"
    assert image_url("s3://b/other/a.jpg", "s3://b/m/rows.parquet") == "s3://b/other/a.jpg"
    assert image_url("/data/a.jpg", "/data/rows.parquet") == "/data/a.jpg"
    for hostile in ("/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest"):
        with pytest.raises(ValueError, match="--allow-any-path"):
            image_url(hostile, "s3://b/m/rows.parquet")
        assert image_url(hostile, "s3://b/m/rows.parquet", allow_any_path=True) == hostile


def test_remote_manifest_naming_local_files_gives_read_failures(tmp_path, s3_server):
    import s3fs

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(imgs.jpeg(1))
    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    local = write_rows(tmp_path / "rows.parquet", [{"image": str(secret)}, {"image": f"file://{secret}"},
                                                   {"image": "ok.jpg"}], "parquet")
    base = f"s3://{s3_server['bucket']}/m"
    fs.put(local, f"{base}/rows.parquet")
    fs.pipe(f"{base}/ok.jpg", imgs.jpeg(2))
    parts = plan_parts([f"{base}/rows.parquet"], storage_options=so)
    got = list(read_part(0, parts[0], so))
    assert [("stage" in r) for r in got] == [True, True, False]
    assert all("--allow-any-path" in r["error"] for r in got[:2])
    allowed = list(read_part(0, parts[0], so, None, ReadLimits(allow_any_path=True)))
    assert not any("stage" in r for r in allowed)


def test_unreadable_manifests_and_missing_columns_are_usage_errors(tmp_path):
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    with pytest.raises(UsageError, match="cannot read manifest"):
        plan_parts([str(bad_parquet)])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('image,caption\n"a.jpg,one\nb.jpg,two,three,four\n')
    with pytest.raises(UsageError, match="cannot read manifest"):
        plan_parts([str(bad_csv)])
    good = write_rows(tmp_path / "ok.parquet", [{"image": "a.jpg"}], "parquet")
    with pytest.raises(UsageError, match="--image-column 'jpg' is not a column"):
        plan_parts([good], columns=ManifestColumns(image="jpg"))


@pytest.mark.parametrize("case", ["corrupt-parquet", "malformed-csv", "missing-image-column"])
def test_unreadable_manifest_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    if case == "corrupt-parquet":
        table = tmp_path / "rows.parquet"
        table.write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
        extra, message = [], "cannot read manifest"
    elif case == "malformed-csv":
        table = tmp_path / "rows.csv"
        table.write_text('image,caption\n"a.jpg,one\nb.jpg,two,three,four\n')
        extra, message = [], "cannot read manifest"
    else:
        table = tmp_path / "rows.parquet"
        write_rows(table, [{"image": "a.jpg", "caption": "x"}], "parquet")
        extra, message = ["--image-column", "jpg"], "--image-column 'jpg' is not a column"
    out = tmp_path / "emb"
    assert embed("--input", str(table), "--output", str(out), *extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()
