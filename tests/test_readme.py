"""The README stays true: every flag it shows for a clipbeam command exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipbeam.cli import COMMANDS
from clipbeam.commands.common import beam_option_parser

README = Path(__file__).resolve().parent.parent / "README.md"
MODULES = {name: module for name, module, _ in COMMANDS}


def _command_lines() -> list[tuple[str, str]]:
    """(command, full command line) for every `clipbeam X ...` in the README's code blocks."""
    blocks = re.findall(r"^[ ]*```(\w*)\n(.*?)^[ ]*```", README.read_text(), flags=re.S | re.M)
    found = []
    for language, block in blocks:
        if language not in ("sh", "bash", ""):
            continue
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            match = re.search(r"(?:^|\$ |\s)clipbeam ([a-z-]+)(.*)", line)
            if match and match.group(1) in MODULES:
                found.append((match.group(1), match.group(2)))
    return found


def _parser(command: str):
    import argparse
    import importlib

    module = importlib.import_module(MODULES[command])
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    return parser


def test_readme_shows_most_commands():
    assert {command for command, _ in _command_lines()} >= {"embed", "index", "search", "classify", "export",
                                                             "generate", "convert-vqgan", "synth-corpus", "train"}


@pytest.mark.parametrize("command,line", _command_lines())
def test_every_flag_in_the_readme_exists(command, line):
    parser = _parser(command)
    known = set()
    for action in parser._actions:
        known.update(action.option_strings)
        if isinstance(action.choices, dict):  # sub-commands (train clip|vqgan)
            for sub_parser in action.choices.values():
                for sub_action in sub_parser._actions:
                    known.update(sub_action.option_strings)
    known.update(beam_option_parser()._option_string_actions)  # Beam's own flags pass through
    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", line)
    missing = [f for f in flags if f not in known]
    assert not missing, f"README shows `clipbeam {command}` with flags it does not have: {missing}"
