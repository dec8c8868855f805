"""Packaging for Dataflow GPU workers: the container's pins, and the GPU asked for only on inference steps.

Resource hints are read from the pipeline proto that the runner receives
(`Pipeline.to_runner_api()`, captured when the command calls `run()`), not
from logs: a transform's environment carries `beam:resources:accelerator:v1`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import apache_beam as beam
import imagefactory as imgs
import pytest
import tomllib
import webdataset as wds

from clipbeam.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "dataflow" / "Dockerfile"
ACCELERATOR_URN = "beam:resources:accelerator:v1"
HINT = "type:nvidia-l4;count:1;install-nvidia-driver"
TINY = ["--model", "clipbeam-tiny", "--pretrained", "none"]
# Pinned in the image only, with the reason in the Dockerfile.
IMAGE_ONLY = {"gcsfs"}


# -- pins -------------------------------------------------------------------------
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(.*?)\s*", spec)
    return canonical(match.group(1)), match.group(2).replace(" ", "")


def project_pins() -> dict[str, str]:
    """pyproject's dependencies with the `gpu` extra in place of faiss-cpu: what a GPU worker runs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(requirement(d) for d in project["dependencies"])
    pins.update(requirement(d) for d in project["optional-dependencies"]["gpu"])
    return pins


def dockerfile_text() -> str:
    """The Dockerfile with comments dropped and continuation lines joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def dockerfile_pins() -> dict[str, str]:
    pins = {}
    for run in re.findall(r"^RUN\s+pip install\s+(.*)$", dockerfile_text(), flags=re.M):
        for token in run.split():
            token = token.strip("\"'")
            if token.startswith("-") or token.startswith("/"):
                continue
            name, spec = requirement(token)
            assert name not in pins, f"{name} installed twice in the Dockerfile"
            pins[name] = spec
    return pins


def test_dockerfile_pins_equal_the_project_pins():
    image, project = dockerfile_pins(), project_pins()
    assert "faiss-cpu" not in image and "faiss-gpu" in project
    assert {k: v for k, v in image.items() if k not in IMAGE_ONLY} == project
    assert all(image[name].startswith("==") for name in IMAGE_ONLY & set(image))


def test_dockerfile_base_image_matches_beam_and_python():
    """Workers must run the submitter's Beam and Python minor version (Beam pickles code across them)."""
    (tag,) = re.findall(r"^FROM\s+apache/beam_python(\d+\.\d+)_sdk:(\S+)", dockerfile_text(), flags=re.M)
    assert tag[1] == project_pins()["apache-beam"].removeprefix("==")
    assert tag[0] == f"{sys.version_info.major}.{sys.version_info.minor}"
    # clipbeam itself goes in without dependencies, so that the pins above are what runs
    assert re.search(r"pip install --no-deps /src/clipbeam", dockerfile_text())


# -- resource hints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hint-corpus")
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:04d}", "jpg": imgs.jpeg(i), "txt": f"c {i}"})
    from vqganhelpers import save_tiny_vqgan

    return {"shards": str(root / "*.tar"), "vqgan": str(save_tiny_vqgan(root / "vqgan"))}


# command -> (arguments minus --output, the steps that must get the GPU and only they)
HINTED = {
    "embed": (lambda c: ["embed", "--input", c["shards"], *TINY, "--batch-size", "4", "--no-progress"],
              ["EmbedCorpus/Embed"]),
    "generate": (lambda c: ["generate", "--prompt", "a red square", "--vqgan", c["vqgan"], "--steps", "1",
                            "--cutn", "2", "--size", "16", "16", *TINY], ["RenderPrompts/Render"]),
}


@pytest.fixture
def captured_protos(monkeypatch):
    """Every pipeline proto handed to a runner by `Pipeline.run` (the run itself goes ahead)."""
    protos = []
    original = beam.Pipeline.run

    def run(self, *args, **kwargs):
        protos.append(self.to_runner_api())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(beam.Pipeline, "run", run)
    return protos


def leaf_hints(proto) -> dict[str, bytes | None]:
    """Leaf transform name -> its accelerator hint (None: none), for transforms that run in an SDK environment."""
    hints = {}
    for transform in proto.components.transforms.values():
        if transform.subtransforms or not transform.environment_id:
            continue
        env = proto.components.environments[transform.environment_id]
        hints[transform.unique_name] = env.resource_hints.get(ACCELERATOR_URN)
    return hints


def accepts_accelerator(command: str) -> bool:
    module = importlib.import_module({name: m for name, m, _ in COMMANDS}[command])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return any("--accelerator" in action.option_strings for action in parser._actions)


@pytest.mark.parametrize("command", list(HINTED))
def test_accelerator_hint_is_on_the_inference_steps_only(command, corpus, captured_protos, tmp_path):
    assert accepts_accelerator(command), f"clipbeam {command} has no --accelerator option"
    args, steps = HINTED[command]
    assert main([*args(corpus), "--output", str(tmp_path / "out"), "--accelerator", HINT]) in (0, 3)
    (proto,) = captured_protos
    hints = leaf_hints(proto)
    on_gpu = {name for name, hint in hints.items() if hint is not None}
    expected = {name for name in hints if any(name == s or name.startswith(s + "/") for s in steps)}
    assert expected and on_gpu == expected, sorted(on_gpu ^ expected)
    assert {hints[name] for name in on_gpu} == {HINT.encode()}


def test_no_accelerator_no_hint(corpus, captured_protos, tmp_path):
    args, _ = HINTED["embed"]
    assert main([*args(corpus), "--output", str(tmp_path / "out")]) == 0
    (proto,) = captured_protos
    assert set(leaf_hints(proto).values()) == {None}


@pytest.mark.parametrize("bad", ["count:1;install-nvidia-driver", "type:nvidia-l4;count:0",
                                 "type:nvidia-l4;count:two", "type:nvidia-l4;install-driver"])
def test_malformed_accelerator_is_a_usage_error_before_any_work(corpus, tmp_path, capsys, bad):
    args, _ = HINTED["embed"]
    out = tmp_path / "out"
    assert main([*args(corpus), "--output", str(out), "--accelerator", bad]) == 2
    assert "--accelerator" in capsys.readouterr().err
    assert not out.exists()
