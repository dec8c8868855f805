"""Hostile files (issue 12): no code runs from a checkpoint, clean one-line refusals, nothing created."""

from __future__ import annotations

import json
import os
import pickle
from typing import List

import pytest
import torch
import yaml
from vqganhelpers import tiny_config

from clipbeam.cli import main
from clipbeam.errors import UsageError
from clipbeam.models import train_common
from clipbeam.models.torch_files import load_weights_only, refuse_torchscript, torchscript_entries
from clipbeam.models.vqgan_checkpoint import load_raw_checkpoint


class _WritesAFile(torch.nn.Module):
    """A TorchScript module whose __setstate__ writes 8 bytes to a path: the issue's evil.ckpt."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> List[str]:
        return [self.path]

    @torch.jit.export
    def __setstate__(self, state: List[str]) -> None:
        self.training = False
        written = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8)
        written.fill_(65)
        self.path = state[0] + str(int(written[0]))  # used, so TorchScript keeps the write


def evil_archive(path, marker) -> str:
    """Save the TorchScript archive; the marker appears only if something loads it."""
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(_WritesAFile(str(marker))), str(path))
    assert not os.path.exists(marker)
    return str(path)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_torchscript_checkpoint_is_refused_before_any_loader(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = evil_archive(tmp_path / "evil.ckpt", marker)
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(tiny_config().to_yaml_dict()))
    out = tmp_path / "out.safetensors"
    assert main(["convert-vqgan", ckpt, str(out)]) == 2
    assert "TorchScript archive" in one_error_line(capsys)
    assert main(["generate", "--vqgan", ckpt, "--prompt", "a cat", "--output", str(tmp_path / "renders"),
                 "--model", "clipbeam-tiny", "--pretrained", "none", "--size", "32", "32"]) == 2
    assert "TorchScript archive" in one_error_line(capsys)
    with pytest.raises(UsageError, match="TorchScript"):
        load_raw_checkpoint(ckpt)
    assert not marker.exists() and not out.exists() and not (tmp_path / "renders").exists()


def test_torchscript_is_recognised_by_its_entries_only(tmp_path):
    assert torchscript_entries(["evil/data.pkl", "evil/constants.pkl"]) == ["evil/constants.pkl"]
    assert torchscript_entries(["code/__torch__.py", "data.pkl"]) == ["code/__torch__.py"]
    assert torchscript_entries(["archive/data.pkl", "archive/data/0", "archive/version"]) == []
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    refuse_torchscript(str(plain), str(plain))  # an ordinary torch.save zip passes
    assert load_weights_only(str(plain), None)["w"].tolist() == [1.0, 1.0]


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_training_checkpoint_is_refused_and_creates_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    corpus = tmp_path / "corpus"
    assert main(["synth-corpus", "--output", str(corpus), "--n", "8", "--seed", "0", "--shard-size", "8"]) == 0
    out = tmp_path / "run"
    train = ["train", "clip", "--corpus", str(corpus / "*.tar"), "--output", str(out), "--steps", "1",
             "--model", "clipbeam-tiny", "--batch-size", "4", "--threads", "1", "--warmup", "1"]
    assert main(train) == 0
    # Someone with write access to the shared output swaps in a pickle that runs a command.
    torch.save({"settings": {"kind": "clip"}, "step": 1, "payload": _RunsCode(marker)}, out / "checkpoints/last.pt")
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(train[:train.index("--steps") + 1] + ["2"] + train[train.index("--steps") + 2:]) == 2
    assert "refusing to load training checkpoint" in one_error_line(capsys)
    assert not marker.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(UsageError, match="refusing"):
        train_common.read_checkpoint_settings(str(out), None)
    # The TorchScript route is closed for last.pt too.
    evil_archive(out / "checkpoints/last.pt", marker)
    with pytest.raises(UsageError, match="TorchScript"):
        train_common.read_checkpoint_step(str(out), None)
    assert not marker.exists()


def test_plain_pickle_as_training_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    with open(path, "wb") as handle:
        pickle.dump(_RunsCode(marker), handle, protocol=2)
    with pytest.raises(UsageError, match="refusing to load"):
        train_common.load_torch(str(path), None)
    assert not marker.exists()


def test_torchscript_clip_checkpoint_is_refused(tmp_path):
    from clipbeam.models.clip import ClipSpec, load_clip

    marker = tmp_path / "pwned"
    ckpt = evil_archive(tmp_path / "evil.pt", marker)
    with pytest.raises(UsageError, match="TorchScript"):
        load_clip(ClipSpec("clipbeam-tiny", ckpt))
    assert not marker.exists()


def test_remote_clip_checkpoint_cache_is_private_and_revalidated(tmp_path, s3_server, monkeypatch):
    import s3fs

    from clipbeam.models.clip import ClipSpec, load_clip

    monkeypatch.setenv("CLIPBEAM_CACHE_DIR", str(tmp_path / "cache"))
    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    url = f"s3://{s3_server['bucket']}/weights/tiny.pt"
    first = load_clip(ClipSpec("clipbeam-tiny", "none", seed=1)).model.state_dict()
    torch.save(first, tmp_path / "a.pt")
    fs.put(str(tmp_path / "a.pt"), url)
    spec = ClipSpec("clipbeam-tiny", url)
    loaded = load_clip(spec, so)
    folder = tmp_path / "cache" / "checkpoints"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert len(list(folder.iterdir())) == 1
    assert load_clip(spec, so).weights == loaded.weights  # a second load reuses the copy
    # The object changes under the same URL: the next load sees the new weights.
    second = load_clip(ClipSpec("clipbeam-tiny", "none", seed=2)).model.state_dict()
    torch.save(second, tmp_path / "b.pt")
    fs.put(str(tmp_path / "b.pt"), url)
    reloaded = load_clip(spec, so)
    assert reloaded.weights != loaded.weights
    key = "visual.conv1.weight" if "visual.conv1.weight" in second else next(iter(second))
    assert torch.equal(reloaded.model.state_dict()[key], second[key])
    assert len(list(folder.iterdir())) == 1  # the stale copy is gone


def test_output_in_a_missing_bucket_is_refused_and_no_bucket_is_made(tmp_path, s3_server, capsys):
    import boto3

    from clipbeam.storage import check_writable

    # A region other than us-east-1, where s3fs's mkdir would send a location constraint and succeed.
    so = dict(s3_server["storage_options"], client_kwargs={"endpoint_url": s3_server["endpoint_url"],
                                                           "region_name": "eu-west-1"})
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    before = {b["Name"] for b in client.list_buckets()["Buckets"]}
    with pytest.raises(UsageError, match="does not exist .clipbeam never creates buckets"):
        check_writable("s3://typo-bucket-x/emb", so)
    corpus = tmp_path / "corpus"
    assert main(["synth-corpus", "--output", str(corpus), "--n", "4", "--seed", "0", "--shard-size", "4"]) == 0
    capsys.readouterr()
    assert main(["embed", "--input", str(corpus / "*.tar"), "--output", "s3://typo-bucket-y/emb",
                 "--storage-options", json.dumps(so), "--model", "clipbeam-tiny", "--pretrained", "none",
                 "--no-progress"]) == 2
    assert "never creates buckets" in one_error_line(capsys)
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before
    check_writable(f"s3://{s3_server['bucket']}/emb", so)  # an existing bucket is fine


@pytest.mark.parametrize("argv, message", [
    (["--input", "nosuch://x/*.tar"], "cannot open nosuch://x"),
    (["--input", "s3://b/x/*.tar", "--storage-options", '{"bogus": 1}'], "unknown --storage-options key 'bogus'"),
])
def test_bad_protocol_and_storage_options_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "emb"
    code = main(["embed", *argv, "--output", str(out), "--model", "clipbeam-tiny", "--pretrained", "none",
                 "--no-progress"])
    assert code == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_max_pixels_above_pils_default_governs_pils_own_cap():
    """The issue's 10000x10000 image: over PIL's default cap of 89,478,485 pixels, under --max-pixels 100M."""
    import io as _io

    from PIL import Image

    from clipbeam.models.images import DecodeError, decode_image

    buffer = _io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(DecodeError, match="bomb"):
        decode_image(data)
    assert decode_image(data, max_pixels=100_000_000).size == (10_000, 10_000)
    with pytest.raises(DecodeError, match="exceeds the cap of 50000000"):
        decode_image(data, max_pixels=50_000_000)  # a lower cap still holds after PIL's was raised


def test_confusion_plot_draws_mathtext_like_labels_as_plain_text(tmp_path):
    import numpy as np

    from clipbeam.gallery import Classification, confusion_plot

    labels = ["$\\frac{$", "a $5 bill", "cat"]
    path = tmp_path / "confusion.png"
    confusion_plot(Classification(labels, np.eye(3, dtype=int), 1.0, 3), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrained_tag_that_cannot_be_downloaded_stops_before_the_pipeline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    from clipbeam.commands.common import runner_is_local
    from clipbeam.models.clip import ClipSpec, fetch_pretrained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus"
    assert main(["synth-corpus", "--output", str(corpus), "--n", "4", "--seed", "0", "--shard-size", "4"]) == 0
    capsys.readouterr()
    out = tmp_path / "emb"
    code = main(["embed", "--input", str(corpus / "*.tar"), "--output", str(out), "--model", "ViT-B-32",
                 "--pretrained", "laion2b_s34b_b79k", "--no-progress"])
    assert code == 2
    line = one_error_line(capsys)
    assert "cannot download the 'laion2b_s34b_b79k' weights of ViT-B-32" in line and "rerun" not in line
    assert not out.exists()
    # Remote runners: the registry check only, and a line that says the workers download.
    note = fetch_pretrained(ClipSpec("ViT-B-32", "laion2b_s34b_b79k"), local_runner=False)
    assert "workers will download" in note
    assert runner_is_local([]) and runner_is_local(["--runner", "PortableRunner", "--environment_type", "LOOPBACK"])
    assert not runner_is_local(["--runner=DataflowRunner"])
    assert fetch_pretrained(ClipSpec("clipbeam-tiny", "none")) is None


def test_max_member_bytes_flag_reaches_the_reader(tmp_path, capsys):
    import imagefactory as imgs
    from embedhelpers import embed, read_failures, write_tar

    write_tar(str(tmp_path / "s.tar"), [("a.jpg", imgs.jpeg(1)), ("b.jpg", imgs.jpeg(2) + b"\0" * 5000)])
    out = str(tmp_path / "emb")
    assert embed("--input", str(tmp_path / "s.tar"), "--output", out, "--max-member-bytes", "4000") == 3
    failures = read_failures(out)
    assert [f["id"].rsplit("/", 1)[-1] for f in failures] == ["b"]
    assert "over --max-member-bytes 4000" in failures[0]["error"]
    assert embed("--input", str(tmp_path / "s.tar"), "--output", str(tmp_path / "x"),
                 "--max-member-bytes", "0") == 2


def test_latin1_labels_file_is_one_line(tmp_path, capsys):
    import numpy as np
    from synthetic_embeddings import write_embed_output

    emb = str(tmp_path / "emb")
    write_embed_output(emb, np.eye(4, 64, dtype=np.float32), parts=1)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\xe9\ncr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    out = tmp_path / "labels-out"
    assert main(["classify", "--embeddings", emb, "--labels-file", str(labels), "--output", str(out)]) == 2
    assert "not UTF-8" in one_error_line(capsys)
    assert not out.exists()


def test_malformed_vqgan_yaml_is_one_line(tmp_path, capsys):
    from vqganhelpers import save_tiny_vqgan

    weights = save_tiny_vqgan(tmp_path / "v")
    config = tiny_config().to_yaml_dict()
    config["model"]["params"]["ddconfig"]["ch_mult"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    out = tmp_path / "out.safetensors"
    assert main(["convert-vqgan", str(weights), str(out), "--config", str(bad)]) == 2
    assert "VQGAN config" in one_error_line(capsys)
    assert not out.exists()
    renders = tmp_path / "renders"
    assert main(["generate", "--vqgan", str(weights), "--vqgan-config", str(bad), "--prompt", "a cat",
                 "--output", str(renders), "--model", "clipbeam-tiny", "--pretrained", "none"]) == 2
    assert "VQGAN config" in one_error_line(capsys)
    assert not renders.exists()


def test_latin1_prompts_file_is_one_line(tmp_path, capsys):
    from vqganhelpers import save_tiny_vqgan

    weights = save_tiny_vqgan(tmp_path / "v")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un caf\xe9 cr\xe8me\n".encode("latin-1"))
    renders = tmp_path / "renders"
    assert main(["generate", "--vqgan", str(weights), "--prompts", str(prompts), "--output", str(renders),
                 "--model", "clipbeam-tiny", "--pretrained", "none"]) == 2
    assert "--prompts" in (line := one_error_line(capsys)) and "not UTF-8" in line
    assert not renders.exists()


def test_generate_with_an_undownloadable_tag_stops_before_the_pipeline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    from vqganhelpers import save_tiny_vqgan

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    weights = save_tiny_vqgan(tmp_path / "v")
    renders = tmp_path / "renders"
    assert main(["generate", "--vqgan", str(weights), "--prompt", "a cat", "--output", str(renders),
                 "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]) == 2
    assert "cannot download" in one_error_line(capsys)
    assert not renders.exists()
