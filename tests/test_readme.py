"""README.md and docs/*.md are executable evidence: every `clipbeam ...` command form they show runs here,
on small data.

The test reads their sh (and plain) code blocks, so a form added to the README
or a docs page is picked up without touching this file (a form shown twice runs once). Each form runs in its own
copy of a small "README world": a folder that holds, under the README's own
relative names, what the README's commands read (`shards/`, `rows.parquet`,
`photos/`, `prompts.txt`, `out/emb`, `out/index`, a taming-style `.ckpt` ...).
Only values change, never flags: pretrained tags become the shipped shapes
models (no downloads), loop sizes become tiny, brace ranges cover the two
shards there are, and S3 forms run against the loopback S3 server. Forms that
need a cloud are listed in SKIPPED with the reason; their flags are still
checked against the command's parser.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbeam.cli import COMMANDS, main
from clipbeam.commands.common import beam_option_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MODULES = {name: module for name, module, _ in COMMANDS}
SHIPPED_CLIP = ["--model", "shapes-clip", "--pretrained", "shapes"]

# Forms that cannot run here, each with the reason: (predicate on the argv, reason).
SKIPPED = [
    (lambda argv: "DataflowRunner" in argv, "needs Google Cloud (Dataflow)"),
    (lambda argv: "DOCKER" in argv, "needs a Docker daemon and a Flink or Spark job server"),
    (lambda argv: "EXTERNAL" in argv, "needs a job server and worker pools (tests/test_cluster.py starts them)"),
    (lambda argv: argv[:1] == ["serve"], "a long-running server; tests/test_serve*.py start and query it"),
]

# README values that would make a form slow, and the small ones used instead (the flag stays).
SMALL = {
    "--n": ["48"], "--shard-size": ["24"], "--steps": ["2"], "--size": ["64", "64"], "--cutn": ["4"],
    "--threads": ["1"], "--autoencoder-steps": ["1"], "--epochs": ["1"],
}
SMALL_FOR = {("train", "--batch-size"): ["8"], ("index", "--shards"): ["2"]}
PLACEHOLDERS = {"N", "E", "K", "W", "H", "PATH", "TAG", "URL", "FILE", "YAML", "JSON", "TEXT", "NAME", "DIR"}
# Commands that load a CLIP of their own and default to a pretrained tag (a download).
OWN_MODEL = ("embed", "generate")


@dataclass(frozen=True)
class Form:
    """One `clipbeam ...` command form of the README: its text and its arguments."""

    text: str
    argv: tuple[str, ...]

    @property
    def command(self) -> str:
        return self.argv[0]


def _choose_optional(text: str) -> str:
    """`[--x A|B]` usage synopses -> `--x A`; `[--a N | --b E]` -> `--a N` (the first alternative)."""
    def first(match: re.Match) -> str:
        inner = match.group(1).split(" | ")[0]
        return re.sub(r"([^\s|]+)(?:\|[^\s|]+)+", r"\1", inner)

    return re.sub(r"\[([^\[\]]*)\]", first, text)


def readme_forms() -> list[Form]:
    """Every `clipbeam ...` line in the sh and plain code blocks of README.md and docs/*.md, continuation
    lines joined; each form once."""
    blocks = [block for page in DOCS
              for block in re.findall(r"^[ ]*```(\w*)\n(.*?)^[ ]*```", page.read_text(), flags=re.S | re.M)]
    forms = []
    for language, block in blocks:
        if language not in ("sh", "bash", ""):
            continue
        text = re.sub(r"\\\n\s*", " ", block)
        text = re.sub(r"\n\s+(?=\[|--)", " ", text)  # synopsis lines continued by indentation
        for line in text.splitlines():
            line = re.sub(r"^\s*\$ ", "", line).strip()
            if line.startswith("clipbeam "):
                line = re.sub(r"\s+#.*$", "", line)
                forms.append(Form(line, tuple(shlex.split(_choose_optional(line))[1:])))
    return list(dict.fromkeys(forms))


FORMS = readme_forms()


def skip_reason(form: Form) -> str | None:
    return next((reason for matches, reason in SKIPPED if matches(list(form.argv))), None)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(MODULES[command]).add_arguments(parser)
    return parser


def _known_flags(command: str) -> set[str]:
    known = set(beam_option_parser()._option_string_actions)  # Beam's own flags pass through
    for action in _parser(command)._actions:
        known.update(action.option_strings)
        if isinstance(action.choices, dict):  # sub-commands (train clip|vqgan)
            for sub_parser in action.choices.values():
                for sub_action in sub_parser._actions:
                    known.update(sub_action.option_strings)
    return known


def _with_values(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """argv with the values after `flag` replaced by `values`."""
    if flag not in argv:
        return argv
    at = argv.index(flag) + 1
    end = at
    while end < len(argv) and end - at < len(values) and not argv[end].startswith("--"):
        end += 1
    return argv[:at] + values + argv[end:]


def _offline_model(argv: list[str]) -> list[str]:
    """A pretrained tag (a download) becomes the shipped shapes-clip; `none` and paths stay."""
    command = argv[0]
    if "--pretrained" not in argv:
        return argv + SHIPPED_CLIP if command in OWN_MODEL and "--model" not in argv else argv
    tag = argv[argv.index("--pretrained") + 1]
    if tag in ("none", "shapes") or "/" in tag or tag.endswith((".pt", ".safetensors")):
        return argv
    return _with_values(_with_values(argv, "--model", ["shapes-clip"]), "--pretrained", ["shapes"])


def small_argv(form: Form, base: dict[str, list[str]]) -> list[str]:
    """The form's arguments with small values, offline models and `...` filled with the command's first form."""
    argv = list(form.argv)
    if "..." in argv:
        at = argv.index("...")
        argv = argv[:at] + base[form.command][1:] + argv[at + 1:]
    for flag, values in SMALL.items():
        argv = _with_values(argv, flag, values)
    for (command, flag), values in SMALL_FOR.items():
        argv = _with_values(argv, flag, values) if argv[0] == command else argv
    argv = [re.sub(r"\{(\d+)\.\.(\d+)\}", lambda m: "{%s..%0*d}" % (m.group(1), len(m.group(1)), 1), a)
            for a in argv]
    argv = _offline_model(argv)
    placeholders = [a for a in argv if a in PLACEHOLDERS or "$" in a]
    assert not placeholders, f"README form `{form.text}` has placeholders {placeholders}: add values to SMALL"
    return argv


def _base_forms() -> dict[str, list[str]]:
    base: dict[str, list[str]] = {}
    for form in FORMS:
        if "..." not in form.argv and skip_reason(form) is None:
            base.setdefault(form.command, list(form.argv))
    return base


# ---------------------------------------------------------------- the README world


def _write_rows_table(shards: Path, path: Path) -> None:
    """rows.parquet as the README's manifest form reads it: image bytes in `jpg`, `caption`, `uid`."""
    import webdataset as wds

    samples = list(wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False))[:10]
    pq.write_table(pa.table({"jpg": [s["png"] for s in samples], "caption": [s["txt"].decode() for s in samples],
                             "uid": [f"u{i}" for i in range(len(samples))]}), path)


def _write_photos(shards: Path, folder: Path) -> bytes:
    """photos/ with NAME.txt sidecar captions; returns one photo's JPEG bytes (photo.jpg)."""
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir()
    jpeg = b""
    for i, sample in enumerate(list(wds.WebDataset(str(shards / "00001.tar"), shardshuffle=False))[:6]):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(sample["png"])).convert("RGB").save(buffer, "JPEG", quality=95)
        jpeg = buffer.getvalue()
        (folder / f"photo{i}.jpg").write_bytes(jpeg)
        (folder / f"photo{i}.txt").write_bytes(sample["txt"])
    return jpeg


def _write_taming_checkpoint(folder: Path, name: str) -> None:
    """A taming-style NAME.ckpt ({"state_dict": ...}) with NAME.yaml beside it: the shipped shapes VQGAN."""
    import torch

    from clipbeam.models.vqgan import config_to_yaml
    from clipbeam.models.vqgan_checkpoint import read_state_dict, resolve_vqgan

    source = resolve_vqgan("shapes")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": read_state_dict(source.checkpoint)}, folder / f"{name}.ckpt")
    (folder / f"{name}.yaml").write_text(config_to_yaml(source.config))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything the README's commands read, under the README's own relative names."""
    root = tmp_path_factory.mktemp("readme-world")
    shards = root / "shards"
    assert main(["synth-corpus", "--output", str(shards), "--n", "48", "--shard-size", "24"]) == 0
    shutil.copytree(shards, root / "shapes")
    _write_rows_table(shards, root / "rows.parquet")
    (root / "photo.jpg").write_bytes(_write_photos(shards, root / "photos"))
    (root / "prompts.txt").write_text("# prompts.txt\na red circle\na blue square | oil painting:0.5\n")
    _write_taming_checkpoint(root / "checkpoints", "vqgan_imagenet_f16_16384")
    _write_taming_checkpoint(root, "vqgan_imagenet_f16_16384")
    emb, index = root / "out" / "emb", root / "out" / "index"
    assert main(["embed", "--input", f"{shards}/*.tar", "--output", str(emb), *SHIPPED_CLIP, "--no-progress"]) == 0
    assert main(["index", "--embeddings", str(emb), "--output", str(index), "--index-factory", "IVF2,Flat"]) == 0
    assert main(["dedup", "--embeddings", str(emb), "--output", str(root / "out" / "dedup"),
                 "--threshold", "0.95", "--threshold", "0.9"]) == 0
    vectors = pq.read_table(emb / "embeddings").column("image_embedding").to_pylist()[:3]
    np.save(root / "queries.npy", np.asarray(vectors, dtype=np.float32))
    return root


def _output_of(argv: list[str]) -> str | None:
    if "--output" in argv:
        return argv[argv.index("--output") + 1]
    if argv[0] == "convert-vqgan":
        return [a for a in argv[1:] if not a.startswith("--")][1]
    return None


def _on_s3(argv: list[str], request, world: Path) -> list[str]:
    """s3://corpus/... -> a bucket on the loopback S3 server that holds the world's shards."""
    import s3fs

    server = request.getfixturevalue("s3_server")
    fs = s3fs.S3FileSystem(**server["storage_options"])
    for shard in sorted((world / "shards").glob("*.tar")):
        fs.put(str(shard), f"{server['bucket']}/shards/{shard.name}")
    argv = [re.sub(r"^s3://corpus/", f"s3://{server['bucket']}/", a) for a in argv]
    return _with_values(argv, "--storage-options", [json.dumps(server["storage_options"])])


# ---------------------------------------------------------------- the tests


def test_readme_shows_every_command():
    shown = {form.command for form in FORMS}
    unknown = shown - set(MODULES)
    assert not unknown, f"README shows commands that do not exist: {unknown}"
    assert shown >= {"embed", "index", "search", "classify", "export", "generate", "convert-vqgan",
                     "synth-corpus", "train"}
    assert {form.argv[1] for form in FORMS if form.command == "train"} == {"clip", "vqgan"}


def test_every_skip_reason_is_still_used():
    used = {reason for form in FORMS if (reason := skip_reason(form))}
    stale = [reason for _, reason in SKIPPED if reason not in used]
    assert not stale, f"SKIPPED entries no README form needs any more: {stale}"


@pytest.mark.parametrize("form", FORMS, ids=[f"{i:02d}-{f.command}" for i, f in enumerate(FORMS)])
def test_every_flag_in_the_readme_exists(form):
    known = _known_flags(form.command)
    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", form.text)
    missing = [f for f in flags if f not in known]
    assert not missing, f"README shows `clipbeam {form.command}` with flags it does not have: {missing}"


@pytest.mark.parametrize("form", FORMS, ids=[f"{i:02d}-{f.command}" for i, f in enumerate(FORMS)])
def test_readme_form_runs(form, world, tmp_path, monkeypatch, request, capsys):
    reason = skip_reason(form)
    if reason:
        pytest.skip(f"`{form.text}`: {reason}")
    argv = small_argv(form, _base_forms())
    if any(a.startswith("s3://") for a in argv):
        argv = _on_s3(argv, request, world)
    cwd = tmp_path / "w"
    shutil.copytree(world, cwd)
    monkeypatch.chdir(cwd)
    output = _output_of(argv)
    if output and "://" not in output and "--append" not in argv:
        shutil.rmtree(output, ignore_errors=True)  # the form itself must make it (an --append form extends it)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"`clipbeam {' '.join(argv)}` exited {code}:\n{captured.err[-3000:]}"
    if output and "://" not in output:
        assert Path(output).exists(), f"`clipbeam {' '.join(argv)}` wrote no {output}"
    if form.command == "search":
        assert captured.out.strip(), f"`clipbeam {' '.join(argv)}` printed no results"


def _layout_section() -> str:
    text = README.read_text()
    section = text[text.index("## Layout"):]
    return section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section


def test_the_readme_layout_matches_the_code():
    """Every folder the README's layout names exists, and every package of clipbeam/ is named there."""
    block = _layout_section()
    named = set(re.findall(r"^((?:clipbeam/)?[\w.-]+/)", block, flags=re.M))
    inner = {f"clipbeam/{path}" for path in re.findall(r"(?<![\w/])(\w+/\w+/)", block)
             if not path.startswith("clipbeam/")}  # layout/embeddings/
    missing = sorted(name for name in named | inner if not (ROOT / name).exists())
    assert not missing, f"README's Layout names folders that do not exist: {missing}"
    packages = {f"clipbeam/{p.parent.name}/" for p in (ROOT / "clipbeam").glob("*/__init__.py")}
    unnamed = sorted(packages - named)
    assert not unnamed, f"README's Layout does not name: {unnamed}"


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
