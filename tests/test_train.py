"""clipbeam train clip / vqgan: losses fall, outputs load where they are meant to, resume continues exactly."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import yaml

from clipbeam.cli import main
from clipbeam.models import train_clip
from clipbeam.models.clip import ClipSpec, load_clip

FAST = ["--threads", "1", "--log-every", "2", "--warmup", "2"]
TINY_CLIP = ["--model", "clipbeam-tiny", "--batch-size", "24", "--lr", "3e-3", *FAST]
TINY_VQGAN = {
    "model": {
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 8, "n_embed": 32,
            "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        },
    }
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("train") / "corpus")
    assert main(["synth-corpus", "--output", out, "--n", "96", "--seed", "3", "--shard-size", "48"]) == 0
    return os.path.join(out, "*.tar")


def history(out: str) -> list[dict]:
    with open(os.path.join(out, "history.csv")) as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def weights(out: str, name: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)["state_dict"]


def test_clip_loss_falls_and_the_checkpoint_loads_with_pretrained(tmp_path, corpus):
    out = str(tmp_path / "clip")
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--steps", "16", *TINY_CLIP]) == 0
    rows = history(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    first, last = rows[0]["loss"], min(r["loss"] for r in rows[-2:])
    assert last < first - 0.3, rows
    assert all(0 < r["temperature"] < 1 for r in rows)
    assert {"loss.png", "history.csv", "train.json", "clipbeam-tiny.pt", "clipbeam-tiny.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "loss.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(out, "clipbeam-tiny.json")))["embed_dim"] == 64
    summary = json.load(open(os.path.join(out, "train.json")))
    assert summary["steps"] == 16 and summary["settings"]["model"] == "clipbeam-tiny"
    loaded = load_clip(ClipSpec("clipbeam-tiny", os.path.join(out, "clipbeam-tiny.pt"), device="cpu"))
    saved = weights(out, "clipbeam-tiny.pt")
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert loaded.weights.startswith("sha256:")
    random_init = load_clip(ClipSpec("clipbeam-tiny", "none", device="cpu"))
    assert not torch.equal(random_init.model.visual.conv1.weight, loaded.model.visual.conv1.weight)


def test_loop_augment_trains_on_the_loops_own_cutouts(tmp_path, corpus):
    """`--augment loop` shows the CLIP what the demo's generation loop shows it: make_cutouts with the demo's
    augmentations and strength, from a generator seeded with the run's seed; training with it still learns."""
    from clipbeam.demo import DEMO_SETTINGS
    from clipbeam.models.shapes import heldout_set
    from clipbeam.models.vqgan_clip import make_cutouts, pil_to_tensor

    assert (train_clip.LOOP_AUGMENT, train_clip.LOOP_STRENGTH) == (DEMO_SETTINGS.augment, DEMO_SETTINGS.augment_scale)
    spec = ClipSpec("clipbeam-tiny", "none", seed=4)
    transform = train_clip.build_train_preprocess(spec, "loop")
    image = heldout_set(1, seed=5)[0][0]
    size = transform.size
    gen = torch.Generator().manual_seed(4)
    expected = [make_cutouts(pil_to_tensor(image, (size, size)), size, 1, 1.0, DEMO_SETTINGS.augment, 0.0, gen,
                             DEMO_SETTINGS.augment_scale)[0] for _ in range(3)]
    got = [transform(image) * transform.std + transform.mean for _ in range(3)]
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # a new cutout each time the image is shown
    plain = pil_to_tensor(image, (size, size))[0]
    assert any(not torch.allclose(g, plain, atol=0.05) for g in got)
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_clip.build_train_preprocess(spec, "bogus")
    out = str(tmp_path / "clip-loop")
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--steps", "16", "--augment", "loop",
                 *TINY_CLIP]) == 0
    rows = history(out)
    assert min(r["loss"] for r in rows[-2:]) < rows[0]["loss"] - 0.3, rows
    assert json.load(open(os.path.join(out, "train.json")))["settings"]["augment"] == "loop"


def test_contrastive_loss_shares_targets_between_equal_captions():
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    distinct = ["a", "b", "c", "d"]
    loss, _, _ = train_clip.contrastive_loss(features, features, torch.tensor(10.0), distinct)
    logits = 10.0 * features @ features.t()
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(4)) +
                torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert torch.allclose(loss, expected)  # distinct captions: exactly CLIP's loss
    # two images of "a": pairing either with either caption is right
    same = ["a", "a", "c", "d"]
    swapped = features[[1, 0, 2, 3]]
    loss_a, acc_a, _ = train_clip.contrastive_loss(features, features, torch.tensor(10.0), same)
    loss_b, acc_b, _ = train_clip.contrastive_loss(swapped, features, torch.tensor(10.0), same)
    assert torch.allclose(loss_a, loss_b) and acc_a == acc_b == 1.0


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path, corpus, monkeypatch, capsys):
    args = ["--steps", "8", "--save-every", "4", *TINY_CLIP]
    straight = str(tmp_path / "straight")
    assert main(["train", "clip", "--corpus", corpus, "--output", straight, *args]) == 0

    resumed = str(tmp_path / "resumed")
    real_step = train_clip.ClipTask.step
    calls = {"n": 0}

    def failing_step(self, images, captions):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real_step(self, images, captions)

    monkeypatch.setattr(train_clip.ClipTask, "step", failing_step)
    capsys.readouterr()
    assert main(["train", "clip", "--corpus", corpus, "--output", resumed, *args]) == 1
    err = capsys.readouterr().err
    assert "simulated crash); rerun the same command to resume" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(resumed, "clipbeam-tiny.pt"))
    state = torch.load(os.path.join(resumed, "checkpoints", "last.pt"), weights_only=False)
    assert state["step"] == 4
    monkeypatch.setattr(train_clip.ClipTask, "step", real_step)
    assert main(["train", "clip", "--corpus", corpus, "--output", resumed, *args]) == 0
    assert [r["step"] for r in history(resumed)] == [2, 4, 6, 8]
    a, b = weights(straight, "clipbeam-tiny.pt"), weights(resumed, "clipbeam-tiny.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rerun_extends_and_refuses_another_run(tmp_path, corpus, capsys):
    out = str(tmp_path / "clip")
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--steps", "4", *TINY_CLIP]) == 0
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--steps", "6", *TINY_CLIP]) == 0
    assert json.load(open(os.path.join(out, "train.json")))["steps"] == 6
    assert [r["step"] for r in history(out)] == [2, 4, 6]
    other_seed = ["train", "clip", "--corpus", corpus, "--output", out, "--steps", "6", *TINY_CLIP, "--seed", "5"]
    capsys.readouterr()
    assert main(other_seed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (seed: 0 -> 5)" in err[0], err
    assert main(other_seed + ["--overwrite"]) == 0
    assert [r["step"] for r in history(out)] == [2, 4, 6]


def test_fp16_export_halves_the_file_and_loads_as_fp32(tmp_path, corpus):
    out = str(tmp_path / "clip16")
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--steps", "2", *TINY_CLIP,
                 "--export-precision", "fp16"]) == 0
    saved = weights(out, "clipbeam-tiny.pt")
    assert saved["visual.conv1.weight"].dtype == torch.float16
    loaded = load_clip(ClipSpec("clipbeam-tiny", os.path.join(out, "clipbeam-tiny.pt"), device="cpu"))
    assert loaded.model.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.model.visual.conv1.weight, saved["visual.conv1.weight"].float())


def test_vqgan_loss_falls_and_generate_can_load_it(tmp_path, corpus):
    from clipbeam.models.shapes import heldout_set
    from clipbeam.models.train_vqgan import reconstruction_error
    from clipbeam.models.vqgan import build_vqgan
    from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_VQGAN))
    out = str(tmp_path / "vq")
    assert main(["train", "vqgan", "--corpus", corpus, "--output", out, "--config", str(config), "--steps", "24",
                 "--batch-size", "8", "--crop", "16", "--lr", "5e-3", "--restart-dead-codes", "5", "--l2-weight", "1",
                 *FAST]) == 0
    rows = history(out)
    assert sum(r["l1"] for r in rows[-3:]) / 3 < 0.9 * rows[0]["l1"], rows
    assert {"vqgan.safetensors", "vqgan.yaml", "loss.png", "train.json"} <= set(os.listdir(out))
    source = resolve_vqgan(os.path.join(out, "vqgan.safetensors"))
    model = load_vqgan(source)
    assert source.config.n_embed == 32
    images = [image for image, _ in heldout_set(1, seed=5)]
    torch.manual_seed(0)
    trained, untrained = reconstruction_error(model, images), reconstruction_error(build_vqgan(source.config), images)
    assert trained["mse"] < 0.9 * untrained["mse"], (trained, untrained)  # 24 steps: better, not good


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, not 0"),
    (["--batch-size", "1"], "argument --batch-size: must be at least 2, not 1"),
    (["--model", "no-such-model"], "unknown model"),
    (["--epochs", "1", "--batch-size", "500"], "fewer than --batch-size"),
    (["--augment", "noise"], "argument --augment: invalid choice"),
])
def test_bad_arguments_write_nothing(tmp_path, corpus, capsys, extra, message):
    out = str(tmp_path / "bad")
    assert main(["train", "clip", "--corpus", corpus, "--output", out, "--model", "clipbeam-tiny", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_missing_corpus_and_bad_vqgan_crop(tmp_path, capsys):
    assert main(["train", "clip", "--corpus", str(tmp_path / "none" / "*.tar"), "--output", str(tmp_path / "o")]) == 2
    assert "no files match" in capsys.readouterr().err
    assert main(["train", "vqgan", "--corpus", str(tmp_path), "--output", str(tmp_path / "o"), "--crop", "30"]) == 2
    assert "--crop must be" in capsys.readouterr().err
    assert main(["train", "vqgan", "--corpus", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--l2-weight", "-1"]) == 2
    assert "argument --l2-weight: must be 0 or more, not -1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_overwrite_keeps_other_files_and_a_foreign_folder_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "clip"
    args = ["train", "clip", "--corpus", corpus, "--steps", "2", *TINY_CLIP]
    assert main([*args, "--output", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "picked-by-hand.pt").write_bytes(b"mine")
    assert main([*args, "--output", str(out), "--seed", "5", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "picked-by-hand.pt").exists()
    assert json.load(open(out / "train.json"))["settings"]["seed"] == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "history.csv").write_text("someone else's curves")
    capsys.readouterr()
    assert main([*args, "--output", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no clipbeam.train output" in err[0], err
    assert os.listdir(foreign) == ["history.csv"] and (foreign / "history.csv").read_text() == "someone else's curves"
