"""One message style for bad arguments (commands/argtypes.py), and library errors that name fields, not flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clipbeam.cli import main
from clipbeam.commands.argtypes import flag_message
from clipbeam.errors import FieldError
from clipbeam.index.plan import shard_count

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, words", [
    (["embed", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    (["embed", "--decode-threads", "-1"], "argument --decode-threads: must be at least 0, not -1"),
    (["index", "--shard-size", "0"], "argument --shard-size: must be at least 1, not 0"),
    (["index", "--target-recall", "1.5"], "argument --target-recall: must be in (0, 1], not 1.5"),
    (["search", "-k", "0"], "argument -k/--k: must be at least 1, not 0"),
    (["serve", "--port", "70000"], "argument --port: must be between 1 and 65535, not 70000"),
    (["classify", "--top-k", "x"], "argument --top-k: must be an integer, not 'x'"),
    (["export", "--batch-rows", "0"], "argument --batch-rows: must be at least 1, not 0"),
    (["generate", "--noise-fac", "-1"], "argument --noise-fac: must be 0 or more, not -1"),
    (["synth-corpus", "--n", "0"], "argument --n: must be at least 1, not 0"),
    (["train", "clip", "--batch-size", "1"], "argument --batch-size: must be at least 2, not 1"),
    (["train", "vqgan", "--lr", "0"], "argument --lr: must be above 0, not 0"),
])
def test_every_command_reports_a_bad_number_in_one_style(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"clipbeam {argv[0]}") and err.endswith(words), err


def test_library_errors_name_the_field_and_commands_the_flag(tmp_path, capsys):
    with pytest.raises(FieldError) as exc:
        shard_count(10, shard_size=0)
    assert str(exc.value) == "shard_size must be at least 1, not 0"
    assert flag_message(exc.value) == "--shard-size must be at least 1, not 0"
    missing = str(tmp_path / "none" / "*.tar")
    assert main(["embed", "--input", missing, "--output", str(tmp_path / "o"), "--model", "clipbeam-tiny",
                 "--pretrained", "none"]) == 2
    assert f"error: --input {missing}: no files match" in capsys.readouterr().err
    assert main(["train", "clip", "--corpus", missing, "--output", str(tmp_path / "o")]) == 2
    assert f"error: --corpus {missing}: no files match" in capsys.readouterr().err  # train's flag for `inputs`


def _raised_messages(path: Path):
    """The string parts of every UsageError / InputError / FieldError raised in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", ""))
            if name in ("UsageError", "InputError", "IndexInputError", "FieldError"):
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield node.lineno, sub.value


@pytest.mark.parametrize("layer", ["corpus", "models", "index", "dedup", "layout", "serve"])
def test_library_errors_carry_no_flags(layer):
    flag = re.compile(r"(^|[\s(`'\"])--[a-z]")
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for path in sorted((ROOT / "clipbeam" / layer).rglob("*.py"))
             for line, text in _raised_messages(path) if flag.search(text)]
    assert found == []
