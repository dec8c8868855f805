"""DESIGN.md's layer rules, checked on the source (imports inside functions count too).

- corpus/, models/, index/, dedup/, layout/ and serve/ never import apache_beam, transforms/ or commands/;
- transforms/ never imports commands/;
- no two modules import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipbeam"
LIBRARIES = ("corpus", "models", "index", "dedup", "layout", "serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it: `from a.b import c` counts as a.b.c when that is a module."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


GRAPH = {name: {m for m in imported(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def offending(layer: str, banned: tuple[str, ...]) -> list[str]:
    prefix = f"clipbeam.{layer}"
    found = []
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            for target in sorted(imported(path)):
                if any(target == b or target.startswith(b + ".") for b in banned):
                    found.append(f"{name} imports {target}")
    return found


@pytest.mark.parametrize("layer", LIBRARIES)
def test_libraries_never_import_beam_transforms_or_commands(layer):
    assert offending(layer, ("apache_beam", "clipbeam.transforms", "clipbeam.commands")) == []


def test_transforms_never_import_commands():
    assert offending("transforms", ("clipbeam.commands",)) == []


def test_transforms_hold_only_beam_code():
    """Each module of transforms/ wraps the layers below in Beam; a Beam-free one belongs in a library layer."""
    beamless = [name for name, path in MODULES.items()
                if name.startswith("clipbeam.transforms.") and not any(
                    n == "apache_beam" or n.startswith("apache_beam.") for n in imported(path))]
    assert beamless == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other():
    assert cycles(GRAPH) == []


def test_the_checks_can_fail():
    """The cycle finder and the import reader see what they must (so an empty answer above means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "clipbeam.corpus.plan" in GRAPH["clipbeam.corpus.read"]
    assert "apache_beam" in imported(MODULES["clipbeam.transforms.embed_corpus"])
    assert "clipbeam.models.clip" in imported(MODULES["clipbeam.transforms.clip_handler"])  # a function-level import


def test_the_embeddings_format_has_one_owner():
    """Its version and its schema metadata key are set in layout/embeddings/schema.py and nowhere else."""
    owner = MODULES["clipbeam.layout.embeddings.schema"]
    for name, path in MODULES.items():
        if path == owner:
            continue
        text = path.read_text()
        assert '"clipbeam.dim"' not in text, name
        if name.startswith("clipbeam.layout.embeddings"):
            assert "FORMAT_VERSION =" not in text, name
    assert "FORMAT_VERSION = " in owner.read_text() and '"clipbeam.dim"' in owner.read_text()
