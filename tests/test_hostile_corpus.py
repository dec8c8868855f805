"""Hostile corpora (issue 12): no sample vanishes, no member fills memory, no manifest reads outside its home."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tracemalloc

import imagefactory as imgs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedhelpers import embed, manifest, read_failures, read_rows, write_tar

from clipbeam.corpus.manifest_table import read_manifest_table
from clipbeam.corpus.plan import ManifestColumns, plan_parts
from clipbeam.corpus.read import ReadLimits, image_url, read_part
from clipbeam.errors import UsageError


def shard_with_sidecars(path, sidecars: dict[str, bytes]) -> None:
    members = []
    for key in ("a", "b", "c", "d"):
        members += [(f"{key}.jpg", imgs.jpeg(ord(key))), (f"{key}.txt", f"caption {key}".encode())]
        if key in sidecars:
            members.append((f"{key}.json", sidecars[key]))
    write_tar(str(path), members)


def records(path, limits: ReadLimits | None = None) -> dict[str, dict]:
    parts = plan_parts([str(path)])
    found = (r for i, p in enumerate(parts) for r in read_part(i, p, None, None, limits or ReadLimits()))
    return {r["id"].rsplit("/", 1)[-1]: r for r in found}


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


# Reads one part in a fresh process and prints its rows' "n" values and its peak memory (Arrow's pool,
# which only grows within a process, plus Python's), so that nothing read before counts.
_READ_ONE_PART = """
import json, sys, tracemalloc
import pyarrow as pa
from clipbeam.corpus.manifest_table import read_manifest_table
url, start, stop, byte_range = json.loads(sys.argv[1])
pool = pa.default_memory_pool()
before = pool.max_memory()
tracemalloc.start()
table = read_manifest_table(url, None, start, stop, tuple(byte_range) if byte_range else None)
peak = tracemalloc.get_traced_memory()[1] + pool.max_memory() - before
print(json.dumps([table.column("n").to_pylist(), peak]))
"""


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_a_manifest_part_reads_only_its_rows(tmp_path, kind):
    """A 100-row part of a 20k-row, 20 MB manifest (Parquet: one row group) holds far less than the file."""
    import sys

    rows = [{"n": i, "image": f"{i}.jpg", "pad": (str(i) * 200)[:1000]} for i in range(20_000)]
    table = write_rows(tmp_path / f"rows.{kind}", rows, kind)
    parts = plan_parts([table], rows_per_part=100)
    assert [(p.start, p.stop) for p in parts[:2]] == [(0, 100), (100, 200)] and len(parts) == 200
    assert (parts[-1].byte_range is None) == (kind == "parquet")
    for part in (parts[0], parts[117], parts[-1]):
        argv = json.dumps([part.url, part.start, part.stop, part.byte_range])
        done = subprocess.run([sys.executable, "-c", _READ_ONE_PART, argv], check=True, capture_output=True,
                              text=True)
        numbers, peak = json.loads(done.stdout)
        assert numbers == list(range(part.start, part.stop))
        assert peak < 16 * 1024 * 1024, peak  # reading the whole file or row group holds 29-52 MB


def test_csv_records_may_span_lines_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'image,caption\r\n\r\na.jpg,"two\nlines"\r\nb.jpg,"say ""hi"",\n"\n\nc.jpg,plain\n'
                     b"d.jpg,last")
    parts = plan_parts([str(path)], rows_per_part=2)
    got = [read_manifest_table(str(path), None, p.start, p.stop, p.byte_range).to_pylist() for p in parts]
    assert got == [[{"image": "a.jpg", "caption": "two\nlines"}, {"image": "b.jpg", "caption": 'say "hi",\n'}],
                   [{"image": "c.jpg", "caption": "plain"}, {"image": "d.jpg", "caption": "last"}]]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"image": "a.jpg"}\n\n  \n{"image": "b.jpg"}\n{"image": "c.jpg"}\n')
    parts = plan_parts([str(jsonl)], rows_per_part=2)
    got = [read_manifest_table(str(jsonl), None, p.start, p.stop, p.byte_range).column("image").to_pylist()
           for p in parts]
    assert got == [["a.jpg", "b.jpg"], ["c.jpg"]]


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
    with pytest.raises(UsageError, match="image_column 'jpg' is not a column"):
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


def test_compressed_tar_bomb_member_is_skipped_unread(tmp_path):
    """A .tar.gz whose member inflates to 64 MB of zeros (a few KB on disk) fails before it is read."""
    import io as _io
    import tarfile

    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 64 * 1024 * 1024
        tar.addfile(info, _io.BytesIO(bytes(info.size)))
        ok = imgs.jpeg(2)
        info = tarfile.TarInfo("b.jpg")
        info.size = len(ok)
        tar.addfile(info, _io.BytesIO(ok))
    assert shard.stat().st_size < 1024 * 1024
    tracemalloc.start()
    try:
        got = records(shard, ReadLimits(max_member_bytes=1024 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "over --max-member-bytes" in got["a"]["error"] and "stage" not in got["b"]
    assert peak < 8 * 1024 * 1024, peak


def test_jsonl_rows_may_add_fields_as_they_go(tmp_path):
    """JSON lines whose later rows add a field (pyarrow's streaming reader refuses them; parts do not)."""
    (tmp_path / "a.jpg").write_bytes(imgs.jpeg(1))
    rows = [{"image": "a.jpg", "caption": f"c{i}"} for i in range(9)] + [{"image": "a.jpg", "extra": 5, "uid": "x"}]
    jsonl = write_rows(tmp_path / "rows.jsonl", rows, "jsonl")
    parts = plan_parts([jsonl], rows_per_part=4, columns=ManifestColumns(id="uid"))
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    got = [r for i, p in enumerate(parts) for r in read_part(i, p, None, ManifestColumns(id="uid"))]
    assert len(got) == 10 and not any("stage" in r for r in got)
    assert got[-1]["id"] == "x" and got[-1]["meta"]["extra"] == 5
