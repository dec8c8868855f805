"""Bad samples and bad shards: each one embedded correctly or recorded, never lost."""

from __future__ import annotations

import os

import imagefactory as imgs
import numpy as np
from embedhelpers import embed, manifest, read_failures, read_rows, write_tar


def test_every_awkward_sample_is_accounted_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a naive extractor would write ../x.jpg
    ok = {
        "cmyk": ("jpg", imgs.cmyk_jpeg(1)),
        "sixteen": ("png", imgs.png16(2)),
        "palette": ("png", imgs.palette_png(3)),
        "alpha": ("png", imgs.rgba_png(4)),
        "animated": ("gif", imgs.animated_gif(5)),
        "rotated": ("jpg", imgs.exif_rotated_jpeg(6)),
        "plain": ("jpg", imgs.jpeg(7)),
        "nocaption": ("webp", imgs.encode(imgs.picture(8), "WEBP")),
    }
    bad = {
        "corrupt": ("jpg", b"\xff\xd8\xff\xe0" + os.urandom(200)),
        "truncated": ("jpg", imgs.truncated_jpeg(9)),
        "zero": ("jpg", b""),
        "notimage": ("png", b"this is a text file, not a picture\n" * 5),
        "bomb": ("png", imgs.bomb_png()),
    }
    members = []
    for key, (ext, data) in {**ok, **bad}.items():
        members.append((f"{key}.{ext}", data))
        if key != "nocaption":
            members.append((f"{key}.txt", f"caption of {key}".encode()))
    members += [
        ("emptycap.jpg", imgs.jpeg(10)), ("emptycap.txt", b"   \n"),
        ("latin1.jpg", imgs.jpeg(11)), ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1")),
        ("longcap.jpg", imgs.jpeg(12)), ("longcap.txt", ("a very long caption " * 200).encode()),
        ("../escape.jpg", imgs.jpeg(13)),
        ("/abs/path.jpg", imgs.jpeg(14)),
        ("orphan.txt", b"a caption without an image"),
    ]
    write_tar(str(tmp_path / "odd.tar"), members)
    out = str(tmp_path / "out")
    code = embed("--input", str(tmp_path / "odd.tar"), "--output", out)
    assert code == 3  # finished, some samples failed
    rows = {r["id"].split("/", 1)[1]: r for r in read_rows(out)}
    failures = {f["id"].split("/", 1)[1]: f for f in read_failures(out)}
    samples_in = len(ok) + len(bad) + 6
    assert len(rows) + len(failures) == samples_in
    assert set(ok) <= set(rows)
    assert {k: failures[k]["stage"] for k in bad} == {k: "decode" for k in bad}
    assert failures["bomb"]["error"].startswith("decompression bomb")
    assert "empty" in failures["zero"]["error"]
    assert failures["orphan"]["stage"] == "read" and "no image" in failures["orphan"]["error"]
    assert (rows["rotated"]["width"], rows["rotated"]["height"]) == (30, 60)
    assert rows["emptycap"]["caption"] is None and rows["emptycap"]["text_embedding"] is None
    assert rows["latin1"]["caption"].startswith("caf\ufffd")
    assert rows["latin1"]["caption_note"].startswith("caption is not valid UTF-8")
    assert rows["longcap"]["text_embedding"] is not None
    assert rows["nocaption"]["caption"] is None
    assert "../escape" in rows and "/abs/path" in rows
    assert not (tmp_path.parent / "escape.jpg").exists() and not os.path.exists("/abs/path.jpg")
    for row in rows.values():
        assert abs(np.linalg.norm(np.asarray(row["image_embedding"], np.float32)) - 1) < 2e-3
    info = manifest(out)
    assert info["samples"] == samples_in and info["failed_by_stage"] == {"decode": 5, "read": 1}


def test_unreadable_shards_fail_their_samples_and_the_run_goes_on(tmp_path):
    members = [(f"k{i:03d}.jpg", imgs.jpeg(i)) for i in range(8)]
    write_tar(str(tmp_path / "00000.tar"), members)
    write_tar(str(tmp_path / "00002.tar"), members)
    data = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    out = str(tmp_path / "out")
    # 00001.tar is a gap in the shard list
    assert embed("--input", f"{tmp_path}/{{00000..00002}}.tar", "--output", out) == 3
    info = manifest(out)
    parts = {p["source"].rsplit("/", 1)[1]: p for p in info["parts"]}
    assert parts["00000.tar"]["rows"] == 8 and parts["00000.tar"]["failures"] == 0
    assert parts["00001.tar"]["rows"] == 0 and parts["00001.tar"]["failures"] == 1
    truncated = parts["00002.tar"]
    assert 0 < truncated["rows"] < 8 and truncated["failures"] == 1
    errors = [f["error"] for f in read_failures(out)]
    assert any("FileNotFoundError" in e for e in errors)
    assert any("shard unreadable" in e for e in errors)
    assert info["samples"] == info["rows"] + info["failures"]
