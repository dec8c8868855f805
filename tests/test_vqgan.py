"""The taming-compatible VQGAN and its checkpoints: keys, shapes, numerics, safe loading."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml
from vqganhelpers import PUBLIC_CONFIGS, reference_keys, save_tiny_vqgan, tiny_config, tiny_vqgan

from clipbeam.cli import main
from clipbeam.errors import UsageError
from clipbeam.models import vqgan_checkpoint as ckpt
from clipbeam.models.vqgan import AttnBlock, Downsample, build_vqgan, config_from_dict, config_from_yaml
from clipbeam.models.vqgan_checkpoint import load_vqgan, resolve_vqgan, save_vqgan


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_public_config_keys_match_reference_exactly(name):
    config = config_from_dict(PUBLIC_CONFIGS[name])
    model = build_vqgan(config, "meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    reference = reference_keys(name)
    weights = {k: v for k, v in reference.items() if not k.startswith("loss.")}
    assert ours == weights
    # Every other key of the published file is training-only and is dropped on load.
    assert len(reference) == {"vqgan_imagenet_f16_1024": 398, "vqgan_imagenet_f16_16384": 392,
                              "vqgan_gumbel_f8_8192": 301}[name]


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_public_config_encode_quantize_decode_shapes(name):
    config = config_from_dict(PUBLIC_CONFIGS[name])
    model = build_vqgan(config, "meta")
    f = config.factor
    assert f == (8 if "f8" in name else 16)
    with torch.device("meta"):
        x = torch.zeros(2, 3, 4 * f, 6 * f)
    z_q, loss, (_, _, indices) = model.encode(x)
    assert tuple(z_q.shape) == (2, 256, 4, 6)
    assert indices.numel() == 2 * 4 * 6
    assert tuple(model.decode(z_q).shape) == (2, 3, 4 * f, 6 * f)
    assert loss.dim() == 0


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_public_config_yaml_round_trip(name):
    config = config_from_yaml(yaml.safe_dump(PUBLIC_CONFIGS[name]))
    assert config.gumbel == ("gumbel" in name)
    again = config_from_dict(config.to_yaml_dict())
    assert again == config


def test_net2net_config_uses_first_stage():
    net2net = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {"n_layer": 2}},
        "first_stage_config": PUBLIC_CONFIGS["vqgan_imagenet_f16_1024"]["model"],
    }}}
    assert config_from_dict(net2net) == config_from_dict(PUBLIC_CONFIGS["vqgan_imagenet_f16_1024"])


def test_bad_configs_are_rejected_with_a_reason():
    good = PUBLIC_CONFIGS["vqgan_imagenet_f16_1024"]["model"]["params"]
    with pytest.raises(ValueError, match="n_embed"):
        config_from_dict({"model": {"params": {k: v for k, v in good.items() if k != "n_embed"}}})
    with pytest.raises(ValueError, match="unsupported target"):
        config_from_dict({"model": {"target": "taming.models.other.Thing", "params": good}})
    with pytest.raises(ValueError, match="multiple of 32"):
        config_from_dict({"model": {"params": dict(good, ddconfig=dict(good["ddconfig"], ch=48))}})


def test_tiny_vqgan_numerics():
    model = tiny_vqgan(seed=3)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z_q, _, (_, _, indices) = model.encode(x)
        assert tuple(z_q.shape) == (2, 32, 16, 24)
        # Every quantized vector is a codebook row, the nearest one to the pre-quantization vector.
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 32)
        nearest = torch.cdist(z, model.codebook).argmin(1)
        assert torch.equal(indices, nearest)
        assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 32), model.codebook[indices])
        out = model.decode(z_q)
    assert tuple(out.shape) == (2, 3, 32, 48)
    assert torch.isfinite(out).all()


def test_quantizer_straight_through_gradient():
    model = tiny_vqgan().train()
    z = torch.randn(1, 32, 4, 4, requires_grad=True)
    z_q, loss, _ = model.quantize(z)
    (z_q * 3).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))
    assert loss > 0


def test_attention_is_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 7)
    h = block.norm(x)
    q = block.q(h).flatten(2).transpose(1, 2)  # [b, hw, c]
    k = block.k(h).flatten(2)  # [b, c, hw]
    v = block.v(h).flatten(2)
    weights = torch.softmax(q @ k / 32 ** 0.5, dim=2)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).view(2, 32, 5, 7))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert tuple(down(x).shape) == (1, 32, 4, 4)


def test_gumbel_quantize_is_deterministic_in_eval():
    model = tiny_vqgan(gumbel=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, _, (_, _, ia) = model.encode(x)
        b, _, (_, _, ib) = model.encode(x)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert tuple(model.decode(a).shape) == (1, 3, 32, 32)


@pytest.fixture
def lightning_standin(monkeypatch):
    """A stand-in `pytorch_lightning` package, present only while the checkpoint is written."""
    modules = {}
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])

    class ModelCheckpoint:
        pass

    class AttributeDict(dict):
        pass

    for cls, module in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                        (AttributeDict, "pytorch_lightning.utilities.parsing")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
    modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
    return types.SimpleNamespace(ModelCheckpoint=ModelCheckpoint, AttributeDict=AttributeDict,
                                 remove=monkeypatch.undo)


def _lightning_checkpoint(model, standin, prefix: str = "") -> dict:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.rand(1, 3, 32, 32))[0].mean().backward()
    optimiser.step()  # real optimizer state, as Lightning saves it
    state = collections.OrderedDict((prefix + k, v.clone()) for k, v in model.state_dict().items())
    state[prefix + "loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    state[prefix + "loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {standin.ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x"}},
        "optimizer_states": [optimiser.state_dict()],
        "lr_schedulers": [],
        "state_dict": state,
        "hparams": standin.AttributeDict(embed_dim=32, n_embed=64),
    }


def test_lightning_checkpoint_loads_without_pytorch_lightning(tmp_path, lightning_standin):
    model = tiny_vqgan(seed=5)
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(model, lightning_standin), path)
    (tmp_path / "last.yaml").write_text(yaml.safe_dump(tiny_config().to_yaml_dict()))
    lightning_standin.remove()
    assert "pytorch_lightning" not in sys.modules
    assert importlib.util.find_spec("pytorch_lightning") is None
    with pytest.raises(ModuleNotFoundError):  # what a plain torch.load does here
        torch.load(path, weights_only=False)

    loaded = load_vqgan(resolve_vqgan(str(path)))
    assert set(loaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model.eval()(x)[0])
    raw = ckpt.load_raw_checkpoint(str(path))
    state, dropped = ckpt.extract_state_dict(raw)
    assert not any(k.startswith("loss.") for k in state)
    assert dropped == {"loss.*": 2, "optimizer_states": 1}
    callback_class = next(iter(raw["callbacks"]))
    assert issubclass(callback_class, ckpt.InertStandIn) and callback_class.__name__ == "ModelCheckpoint"


def test_net2net_checkpoint_is_stripped_to_first_stage(tmp_path, lightning_standin):
    model = tiny_vqgan(seed=6)
    checkpoint = _lightning_checkpoint(model, lightning_standin, prefix="first_stage_model.")
    checkpoint["state_dict"]["transformer.tok_emb.weight"] = torch.zeros(4, 4)
    checkpoint["state_dict"]["cond_stage_model.weight"] = torch.zeros(2)
    torch.save(checkpoint, tmp_path / "net2net.ckpt")
    lightning_standin.remove()
    net2net = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                         "params": {"first_stage_config": tiny_config().to_yaml_dict()["model"]}}}
    (tmp_path / "net2net.yaml").write_text(yaml.safe_dump(net2net))
    loaded = load_vqgan(resolve_vqgan(str(tmp_path / "net2net.ckpt")))
    assert torch.equal(loaded.codebook, model.codebook)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("1 / 0",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = dict(tiny_vqgan().state_dict())
    torch.save({"state_dict": state, "callbacks": {"x": _RunsCode(marker)}}, tmp_path / "evil.ckpt")
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(tiny_config().to_yaml_dict()))
    with pytest.raises(UsageError, match=r"refusing to load .*system"):
        resolve_vqgan(str(tmp_path / "evil.ckpt"))
    # A plain (non-zip) pickle goes through the same gate.
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump(_RunsCode(marker), handle, protocol=2)
    with pytest.raises(UsageError, match="refusing to load"):
        ckpt.load_raw_checkpoint(str(tmp_path / "evil.pt"))
    with open(tmp_path / "eval.pt", "wb") as handle:
        pickle.dump(_Evaluates(), handle, protocol=2)
    with pytest.raises(UsageError, match="builtins.eval"):
        ckpt.load_raw_checkpoint(str(tmp_path / "eval.pt"))
    assert not marker.exists()


def test_safetensors_round_trip_with_config_beside_and_embedded(tmp_path):
    model = tiny_vqgan(seed=7)
    weights, config = save_vqgan(model, str(tmp_path / "mine.safetensors"))
    assert config == str(tmp_path / "mine.yaml")
    source = resolve_vqgan(weights)
    assert source.config_origin == config and source.config == model.config
    loaded = load_vqgan(source)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    os.remove(config)
    assert resolve_vqgan(weights).config_origin == "embedded"
    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text(yaml.safe_dump(tiny_config().to_yaml_dict()))
    assert resolve_vqgan(weights, str(explicit)).config_origin == str(explicit)


def test_missing_checkpoint_and_config_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_vqgan(str(tmp_path / "nope.ckpt"))
    torch.save({"state_dict": dict(tiny_vqgan().state_dict())}, tmp_path / "bare.ckpt")
    with pytest.raises(UsageError, match="no config for VQGAN checkpoint"):
        resolve_vqgan(str(tmp_path / "bare.ckpt"))
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        resolve_vqgan(str(tmp_path / "bare.ckpt"), str(tmp_path / "bad.yaml"))


def test_config_that_does_not_match_checkpoint(tmp_path):
    weights = save_tiny_vqgan(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_config(n_embed=128).to_yaml_dict()))
    with pytest.raises(UsageError, match=r"does not match checkpoint .*quantize.embedding.weight: checkpoint "
                                         r"\[64, 32\], config \[128, 32\]"):
        resolve_vqgan(str(weights), str(other))
    gumbel = tmp_path / "gumbel.yaml"
    gumbel.write_text(yaml.safe_dump(tiny_config(gumbel=True).to_yaml_dict()))
    with pytest.raises(UsageError, match="keys missing .*quantize.embed"):
        resolve_vqgan(str(weights), str(gumbel))


def test_shipped_name_resolves_under_assets(tmp_path, monkeypatch):
    save_tiny_vqgan(tmp_path, name="shapes")
    monkeypatch.setattr(ckpt, "ASSETS_DIR", tmp_path)
    monkeypatch.setitem(ckpt.SHIPPED_VQGANS, "shapes", "shapes.safetensors")
    source = resolve_vqgan("shapes")
    assert source.checkpoint == str(tmp_path / "shapes.safetensors") and source.name == "shapes"
    with pytest.raises(UsageError, match=r"shipped names: shapes"):
        resolve_vqgan("squares")


def test_convert_vqgan_command(tmp_path, lightning_standin, capsys):
    model = tiny_vqgan(seed=8)
    torch.save(_lightning_checkpoint(model, lightning_standin), tmp_path / "model.ckpt")
    lightning_standin.remove()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "model.yaml").write_text(yaml.safe_dump(tiny_config().to_yaml_dict()))
    out = tmp_path / "out" / "model.safetensors"
    assert main(["convert-vqgan", str(tmp_path / "model.ckpt"), str(out),
                 "--config", str(tmp_path / "configs" / "model.yaml")]) == 0
    assert out.exists() and (tmp_path / "out" / "model.yaml").exists()
    header, metadata = ckpt.read_safetensors_header(str(out))
    assert not any(k.startswith("loss.") for k in header)
    assert json.loads(metadata[ckpt.CONFIG_METADATA_KEY])["model"]["params"]["n_embed"] == 64
    loaded = load_vqgan(resolve_vqgan(str(out)))
    assert torch.equal(loaded.codebook, model.codebook)
    assert "loss.* (2)" in capsys.readouterr().err
    # Again without --overwrite: one line, exit 2, file untouched.
    before = out.read_bytes()
    assert main(["convert-vqgan", str(tmp_path / "model.ckpt"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    assert out.read_bytes() == before


def test_vqgan_on_s3(tmp_path, s3_server):
    import s3fs

    weights = save_tiny_vqgan(tmp_path)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_server["bucket"]
    fs.put(str(weights), f"{bucket}/models/tiny.safetensors")
    fs.put(str(tmp_path / "tiny.yaml"), f"{bucket}/models/tiny.yaml")
    url = f"s3://{bucket}/models/tiny.safetensors"
    source = resolve_vqgan(url, storage_options=s3_server["storage_options"])
    assert source.config_origin == f"s3://{bucket}/models/tiny.yaml"
    loaded = load_vqgan(source, storage_options=s3_server["storage_options"])
    assert torch.equal(loaded.codebook, tiny_vqgan().codebook)
