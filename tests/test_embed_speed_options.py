"""embed's speed options end to end on the DirectRunner: same vectors with every lever on or off,
the caption cache's hit rate in the summary, GPU-path decoding (torchvision's CPU decoder here),
and which options belong to the resume fingerprint."""

from __future__ import annotations

import os

import imagefactory as imgs
import numpy as np
import pytest
import webdataset as wds
from embedhelpers import embed, manifest, read_failures, read_rows

CAPTIONS = ["image", "a red circle", "a photo of a small dog on a sofa next to a window in the morning", None]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: JPEGs, PNGs, one JPEG cut short; captions repeat."""
    root = tmp_path_factory.mktemp("speed")
    for shard in range(2):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(10):
                record = {"__key__": f"k{shard}{i:03d}",
                          "jpg" if i % 3 else "png": imgs.jpeg(shard * 50 + i) if i % 3 else imgs.png(i)}
                if shard == 1 and i == 4:
                    record["jpg"] = imgs.jpeg(99)[:-20]  # the header reads, the pixels do not
                caption = CAPTIONS[i % len(CAPTIONS)]
                if caption:
                    record["txt"] = caption
                sink.write(record)
    return f"{root}/{{00000..00001}}.tar"


def vectors(out: str) -> dict[str, tuple]:
    return {r["id"]: (np.asarray(r["image_embedding"], np.float32),
                      None if r["text_embedding"] is None else np.asarray(r["text_embedding"], np.float32))
            for r in read_rows(out)}


def assert_same_vectors(a: dict, b: dict, threshold: float) -> None:
    assert sorted(a) == sorted(b)
    for key, (image, text) in a.items():
        assert float(image @ b[key][0]) >= threshold
        assert (text is None) == (b[key][1] is None)
        if text is not None:
            assert float(text @ b[key][1]) >= 0.9999


def test_every_lever_off_gives_the_same_vectors_and_the_summary_shows_cache_hits(shards, tmp_path, capsys):
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    assert embed("--input", shards, "--output", fast, "--dtype", "float32", "--decode-threads", "3") == 3
    summary = capsys.readouterr().err
    assert "caption cache hits" in summary
    hits_line = next(line for line in summary.splitlines() if "caption cache hits" in line)
    assert "of 15" in hits_line and " 0.0%" not in hits_line  # 16 captions, minus the truncated sample's
    assert embed("--input", shards, "--output", slow, "--dtype", "float32", "--decode-threads", "1",
                 "--caption-cache-mb", "0", "--full-text-context", "--exact-decode") == 3
    assert "caption cache hits" not in capsys.readouterr().err
    assert_same_vectors(vectors(fast), vectors(slow), 0.9999)
    assert [f["stage"] for f in read_failures(fast)] == ["decode"]
    assert manifest(fast)["rows"] == 19 and manifest(fast)["failures"] == 1


def test_decode_on_the_model_device_matches_cpu_decode(shards, tmp_path, capsys):
    cpu, device = str(tmp_path / "cpu"), str(tmp_path / "device")
    assert embed("--input", shards, "--output", cpu, "--dtype", "float32") == 3
    assert embed("--input", shards, "--output", device, "--dtype", "float32", "--decode-device", "cuda") == 3
    assert_same_vectors(vectors(cpu), vectors(device), 0.999)
    failures = read_failures(device)  # the JPEG cut short: left for the device, failed there and on CPU
    assert len(failures) == 1 and failures[0]["stage"] == "decode" and failures[0]["id"].endswith("k1004")
    assert "GPU decode fell back" in capsys.readouterr().err
    info = manifest(device)
    assert info["samples"] == info["rows"] + info["failures"] == 20


def test_speed_options_do_not_block_resume_but_exact_decode_does(shards, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert embed("--input", shards, "--output", out) == 3
    assert embed("--input", shards, "--output", out, "--decode-threads", "1", "--caption-cache-mb", "1",
                 "--full-text-context") == 3  # same fingerprint: resumes (all parts done)
    assert "2 parts done already" in capsys.readouterr().err
    assert embed("--input", shards, "--output", out, "--exact-decode") == 2
    assert "fast_decode" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--decode-threads", "-1"], "--decode-threads"),
    (["--caption-cache-mb", "-5"], "--caption-cache-mb"),
    (["--decode-device", "cuda", "--device", "cpu"], "--decode-device cuda"),
])
def test_bad_speed_options_exit_2_and_write_nothing(shards, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert embed("--input", shards, "--output", str(out), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() or not os.listdir(out)
