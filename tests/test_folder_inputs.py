"""Issue 22, folder inputs: non-regular files (item 8) and symbolic links out of the input (item 3)."""

from __future__ import annotations

import os

import imagefactory as imgs
import pytest
from embedhelpers import embed, manifest, read_failures, read_rows


def _folder(tmp_path) -> str:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"a{i}.jpg").write_bytes(imgs.jpeg(i))
        (folder / f"a{i}.txt").write_text(f"caption {i}")
    return str(folder)


@pytest.mark.timeout(300)
def test_a_fifo_in_a_folder_input_is_a_read_failure_not_a_hang(tmp_path):
    folder = _folder(tmp_path)
    os.mkfifo(os.path.join(folder, "b.jpg"))
    (tmp_path / "photos" / "c.jpg").write_bytes(imgs.jpeg(7))
    os.mkfifo(os.path.join(folder, "c.txt"))  # a caption that never ends
    out = str(tmp_path / "out")
    assert embed("--input", folder, "--output", out) == 3
    failures = {row["id"].rsplit("/", 1)[-1]: row for row in read_failures(out)}
    assert sorted(failures) == ["b.jpg", "c.jpg"]
    assert all("not a regular file" in row["error"] and row["stage"] == "read" for row in failures.values())
    assert manifest(out)["rows"] == 2 and not os.path.exists(os.path.join(out, "_lease.json"))
    assert len(read_rows(out)) == 2


def test_sidecars_with_many_keys_fold_over_the_cap_into_json_raw(tmp_path, capsys):
    """Item 9: 2 sidecars of 20,000 keys gave a 40,010-column part (quadratic key merge, 17.7 s)."""
    import json

    import pyarrow.parquet as pq
    import webdataset as wds

    shard = str(tmp_path / "00000.tar")
    with wds.TarWriter(shard) as sink:
        for n in range(2):
            fields = {f"k{n}_{i:05d}": i for i in range(20_000)}
            sink.write({"__key__": f"s{n}", "jpg": imgs.jpeg(n), "json": json.dumps({"a": n, **fields}).encode()})
    out = str(tmp_path / "out")
    assert embed("--input", shard, "--output", out) == 0
    table = pq.read_table(os.path.join(out, "embeddings", "part-00000.parquet"))
    meta = [c for c in table.column_names if c not in (
        "id", "source", "caption", "image_embedding", "text_embedding", "width", "height", "sha256",
        "source_offset", "source_size", "json_raw")]
    assert len(meta) == 256 and meta[0] == "a" and "json_raw" in table.column_names
    rows = table.to_pylist()
    folded = json.loads(rows[1]["json_raw"])
    assert rows[1]["a"] == 1 and folded["k1_19999"] == 19999 and len(folded) + sum(
        rows[1][c] is not None for c in meta) == 20_001
    assert manifest(out)["metadata_folded"] == 40_001 - 256
    assert "over --max-metadata-columns" in capsys.readouterr().err


def test_parts_merged_from_fragments_keep_the_cap():
    import json

    import pyarrow as pa

    from clipbeam.layout.embeddings.metadata import cap_metadata_columns
    from clipbeam.layout.embeddings.schema import embedding_table

    def rows(keys, raw=None):
        meta = {k: 1 for k in keys} | ({"json_raw": raw} if raw else {})
        return [{"id": "x", "source": "s", "caption": None, "image_embedding": [0.0, 1.0],
                 "text_embedding": None, "width": 1, "height": 1, "sha256": "0", "meta": meta}]

    first = embedding_table(rows(["a", "b", "c"]), 2, "float32", {}, 2)
    second = embedding_table(rows(["d", "e"], raw="not json {"), 2, "float32", {}, 2)
    assert json.loads(first.column("json_raw")[0].as_py()) == {"c": 1}
    merged = pa.concat_tables([first, second], promote_options="permissive")
    capped, folded = cap_metadata_columns(merged, 2)
    assert folded == 2 and [c for c in capped.column_names if c in "abcde"] == ["a", "b"]
    assert [json.loads(v) for v in capped.column("json_raw").to_pylist()] == [
        {"c": 1}, {"json_raw": "not json {", "d": 1, "e": 1}]


def test_folder_inputs_read_no_symbolic_link_out_of_the_folder(tmp_path):
    """Item 3: a caption sidecar linked to a file outside the input became a caption."""
    folder = _folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    os.remove(os.path.join(folder, "a1.txt"))
    os.symlink(secret, os.path.join(folder, "a1.txt"))
    os.symlink(os.path.join(folder, "a0.jpg"), os.path.join(folder, "same.jpg"))  # a link inside stays readable
    out = str(tmp_path / "out")
    assert embed("--input", folder, "--output", out) == 3
    failures = read_failures(out)
    assert [row["id"].rsplit("/", 1)[-1] for row in failures] == ["a1.jpg"]
    assert "symbolic link out of the input folder" in failures[0]["error"]
    assert all("root:x" not in (row["caption"] or "") for row in read_rows(out)) and len(read_rows(out)) == 2
