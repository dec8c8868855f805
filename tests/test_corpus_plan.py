"""Pure planning functions: brace expansion, labels, part cutting, ids."""

from __future__ import annotations

import imagefactory as imgs
import pytest

from clipbeam.corpus.plan import cut_ranges, pair_captions, plan_parts, unique_labels
from clipbeam.errors import UsageError
from clipbeam.models.images import DecodeError, decode_caption, decode_image
from clipbeam.storage import expand_braces


def test_brace_ranges_keep_padding_and_lists_expand():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_labels_are_short_and_unique():
    labels = unique_labels(["s3://b/x/00000.tar", "s3://b/y/00000.tar", "s3://b/y/00001.tar"])
    assert labels == {"s3://b/x/00000.tar": "x/00000", "s3://b/y/00000.tar": "y/00000",
                      "s3://b/y/00001.tar": "00001"}
    assert unique_labels(["/d/rows.parquet"]) == {"/d/rows.parquet": "rows"}


def test_cut_ranges():
    assert cut_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert cut_ranges(0, 4) == []
    with pytest.raises(UsageError):
        cut_ranges(3, 0)


def test_pair_captions_ignores_non_images():
    assert pair_captions(["b.png", "a.jpg", "a.txt", "notes.md", "c.txt"]) == [("a.jpg", "a.txt"), ("b.png", None)]


def test_plan_is_sorted_and_independent_of_input_order(tmp_path):
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    one = plan_parts([str(tmp_path / "b.tar"), str(tmp_path / "a.tar")])
    two = plan_parts([str(tmp_path / "*.tar")])
    assert one == two and [p.label for p in one] == ["a", "b"]
    assert one[0].fingerprint != one[1].fingerprint


def test_plan_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        plan_parts([str(tmp_path / "rows.parquet")])
    with pytest.raises(UsageError, match="none of the"):
        plan_parts([str(tmp_path / "{0..2}.tar")])
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="cannot tell the format"):
        plan_parts([str(tmp_path / "x.bin")])


def test_decode_pixel_cap_and_captions():
    data = imgs.jpeg(1, (100, 100))
    assert decode_image(data).size == (100, 100)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=5000)
    assert decode_caption(b"  hi \n") == ("hi", None)
    assert decode_caption(b"") == (None, None)
    text, note = decode_caption(b"\xff\xfe")
    assert text == "\ufffd\ufffd" and "UTF-8" in note


def test_alpha_is_composited_on_white():
    image = decode_image(imgs.rgba_png(3))
    assert image.mode == "RGB"
    assert image.getpixel((image.size[0] - 1, 0)) == (255, 255, 255)


def _bytes_read() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def test_planning_reads_a_text_manifest_once(tmp_path):
    """Row boundaries, parsing and ids come from one pass over the file (it used to be two)."""
    from clipbeam.corpus.manifest_table import inspect_manifest

    path = tmp_path / "rows.csv"
    path.write_text("image,caption,uid\n" + "".join(f"img{i}.jpg,\"a caption, {'word ' * 20}\",u{i}\n"
                                                     for i in range(60_000)))
    size = path.stat().st_size
    before = _bytes_read()
    info = inspect_manifest(str(path), None, 10_000, "uid")
    read = _bytes_read() - before
    assert info.rows == 60_000 and len(info.offsets) == 7 and info.ids[59_999].as_py() == "u59999"
    assert size <= read < 1.5 * size, (read, size)
