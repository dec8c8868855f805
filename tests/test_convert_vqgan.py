"""`clipbeam convert-vqgan` in a downloaded taming layout: model.ckpt with its own model.yaml beside it."""

from __future__ import annotations

import torch
import yaml
from vqganhelpers import tiny_config, tiny_vqgan

from clipbeam.cli import main
from clipbeam.models import vqgan_checkpoint as ckpt


def _taming_download(folder):
    """model.ckpt (a Lightning-style {"state_dict": ...} with loss weights) and model.yaml beside it."""
    model = tiny_vqgan(seed=3)
    state = dict(model.state_dict(), **{"loss.logvar": torch.zeros(())})
    torch.save({"state_dict": state}, folder / "model.ckpt")
    text = yaml.safe_dump(tiny_config().to_yaml_dict()) + "# the checkpoint's own config\n"
    (folder / "model.yaml").write_text(text)
    return model, text


def test_reuses_the_checkpoints_own_yaml_beside_it(tmp_path, capsys):
    model, text = _taming_download(tmp_path)
    assert main(["convert-vqgan", str(tmp_path / "model.ckpt"), str(tmp_path / "model.safetensors")]) == 0
    assert "config kept" in capsys.readouterr().err
    assert (tmp_path / "model.yaml").read_text() == text  # reused, not rewritten
    loaded = ckpt.load_vqgan(ckpt.resolve_vqgan(str(tmp_path / "model.safetensors")))
    assert torch.equal(loaded.codebook, model.codebook)


def test_refuses_to_replace_a_yaml_with_another_config(tmp_path, capsys):
    _taming_download(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    other = yaml.safe_dump(tiny_config(n_embed=128).to_yaml_dict())
    (out / "model.yaml").write_text(other)
    args = ["convert-vqgan", str(tmp_path / "model.ckpt"), str(out / "model.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another config" in err[0]
    assert (out / "model.yaml").read_text() == other and not (out / "model.safetensors").exists()
    assert main(args + ["--overwrite"]) == 0
    assert ckpt.resolve_vqgan(str(out / "model.safetensors")).config == tiny_config()
