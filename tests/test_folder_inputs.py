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
