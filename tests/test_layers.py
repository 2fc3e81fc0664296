"""The layer contract of ``wsi_pipeline``: imports run one way, and no module imports itself back.

The folders are layers, each importing only the ones below it (``docs/architecture.md``)::

    core ◀── image ◀── model ◀── results ◀── run ◀── learn ◀── cli
    synth ──▶ core

``learn`` (making cards) sits above ``run`` (it cuts training crops as a run does), ``synth``
(synthetic slides) imports only ``core``, and only ``learn`` and ``cli`` import ``synth``: the
pipeline itself never depends on synthetic data. A module may import any module of its own
folder, as long as no cycle forms.

What counts as an import: every ``import`` and ``from ... import`` statement anywhere in a
module, at module level, inside functions and under ``if TYPE_CHECKING:`` alike. A deferred
import (in a function, to keep torch out of the command line's start) still ties the two
modules together, and an import for type checking still means the importer knows the other
module's types; so neither may run against the layers or close a cycle. ``from package import
name`` counts as an import of ``package.name`` when that is a module. Importing a module does
not count as importing its parent packages' ``__init__`` (Python loads those first whatever the
order, so they cannot deadlock an import).

The package root, ``wsi_pipeline/__init__.py``, is exempt as an importer: it imports no module
of the package, and its public names (``_PUBLIC``) are imported by name on first use, after
whatever module asks for them has loaded. Any module may import the root itself (for
``__version__``), but a name the root only exports lazily counts as an import of the module that
defines it, so the root is never a way around the layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = "wsi_pipeline"
PACKAGE = Path(__file__).resolve().parents[1] / ROOT

#: The folders each folder may import besides itself (the root's own names are allowed to all).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "image": frozenset({"core"}),
    "model": frozenset({"core", "image"}),
    "results": frozenset({"core", "image", "model"}),
    "run": frozenset({"core", "image", "model", "results"}),
    "learn": frozenset({"core", "image", "model", "results", "run", "synth"}),
    "cli": frozenset({"core", "image", "model", "results", "run", "learn", "synth"}),
    "synth": frozenset({"core"}),
}

Graph = Mapping[str, set[str]]


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``'s file)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def lazy_exports(root_source: str) -> dict[str, str]:
    """The root's ``_PUBLIC`` map: name to the module that defines it."""
    for node in ast.parse(root_source).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in targets):
                if node.value is None:
                    break
                mapping = ast.literal_eval(node.value)
                return {str(k): str(v) for k, v in mapping.items()}
    return {}


def imports_in(
    source: str, module: str, is_package: bool, modules: set[str], lazy: Mapping[str, str]
) -> set[str]:
    """The package's modules that ``source`` (the text of ``module``) imports, anywhere in it.

    Parameters
    ----------
    source : str
        Python source.
    module : str
        Its dotted name (to resolve relative imports).
    is_package : bool
        Whether it is a package's ``__init__`` (relative imports start from itself).
    modules : set of str
        The package's modules, to tell ``from pkg import module`` from ``from pkg import name``.
    lazy : mapping
        The root's lazily exported names and the modules that define them.
    """
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                if origin == ROOT and alias.name in lazy:
                    found.add(lazy[alias.name])
                elif f"{origin}.{alias.name}" in modules:
                    found.add(f"{origin}.{alias.name}")
                else:
                    found.add(origin)
    return {name for name in found if name in modules and name != module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module to the package's modules it imports (see the module docstring)."""
    modules = module_names(package)
    lazy = lazy_exports(modules[ROOT].read_text(encoding="utf-8"))
    return {
        name: imports_in(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py", set(modules), lazy
        )
        for name, path in modules.items()
    }


def layer_of(module: str) -> str | None:
    """The folder a module belongs to; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(graph: Graph) -> list[str]:
    """Every import against :data:`ALLOWED`, as ``importer -> imported (layer -> layer)``."""
    wrong = []
    for importer, imported in sorted(graph.items()):
        source = layer_of(importer)
        if source is None:
            if imported:  # the root imports nothing; its exports are lazy
                wrong.append(f"{importer} -> {', '.join(sorted(imported))} (the root imports)")
            continue
        for target in sorted(imported):
            layer = layer_of(target)
            if layer is None or layer == source:
                continue
            if layer not in ALLOWED.get(source, frozenset()):
                wrong.append(f"{importer} -> {target} ({source} may not import {layer})")
    return wrong


def import_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        # Recursion depth is the longest import chain, a few dozen modules at most.
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _chain(graph: Graph, group: list[str]) -> Iterator[str]:
    """One import of each member of a cycle that stays inside it, for the failure message."""
    for module in group:
        inside = sorted(graph[module] & set(group))
        yield f"{module} -> {', '.join(inside)}"


def test_imports_follow_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_module_imports_itself_back():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert cycles == [], "\n".join(line for group in cycles for line in _chain(graph, group))


def test_the_graph_sees_every_kind_of_import():
    """Module level, inside functions, under TYPE_CHECKING, relative, ``from pkg import mod``
    and a name the root exports lazily all count."""
    modules = {
        "wsi_pipeline",
        "wsi_pipeline.core",
        "wsi_pipeline.core.errors",
        "wsi_pipeline.image.slide",
        "wsi_pipeline.model.cards",
        "wsi_pipeline.results.counts",
        "wsi_pipeline.results.report",
        "wsi_pipeline.run.local",
    }
    source = """
from typing import TYPE_CHECKING
import numpy
from wsi_pipeline import __version__, run_slide
from . import counts
from ..core import errors
if TYPE_CHECKING:
    from wsi_pipeline.model.cards import ClassifierCard
def later():
    import wsi_pipeline.image.slide
"""
    found = imports_in(
        source,
        "wsi_pipeline.results.report",
        False,
        modules,
        {"run_slide": "wsi_pipeline.run.local"},
    )
    assert found == {
        "wsi_pipeline",
        "wsi_pipeline.run.local",
        "wsi_pipeline.results.counts",
        "wsi_pipeline.core.errors",
        "wsi_pipeline.model.cards",
        "wsi_pipeline.image.slide",
    }
    assert layer_violations({"wsi_pipeline.results.report": found}) == [
        "wsi_pipeline.results.report -> wsi_pipeline.run.local (results may not import run)"
    ]


@pytest.mark.parametrize(
    ("graph", "wrong"),
    [
        ({"wsi_pipeline.core.a": {"wsi_pipeline.image.b"}}, "core may not import image"),
        ({"wsi_pipeline.synth.a": {"wsi_pipeline.model.b"}}, "synth may not import model"),
        ({"wsi_pipeline.run.a": {"wsi_pipeline.synth.b"}}, "run may not import synth"),
        ({"wsi_pipeline.run.a": {"wsi_pipeline.learn.b"}}, "run may not import learn"),
        ({"wsi_pipeline": {"wsi_pipeline.core.a"}}, "the root imports"),
    ],
)
def test_a_wrong_import_fails(graph, wrong):
    (found,) = layer_violations(graph)
    assert wrong in found


def test_a_right_import_passes():
    graph = {
        "wsi_pipeline.cli.run": {"wsi_pipeline.learn.a", "wsi_pipeline", "wsi_pipeline.cli.b"},
        "wsi_pipeline.learn.a": {"wsi_pipeline.run.a", "wsi_pipeline.synth.a"},
        "wsi_pipeline.synth.a": {"wsi_pipeline.core.a"},
    }
    assert layer_violations(graph) == []


def test_a_cycle_fails():
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": set(),
        "e": {"e"},
    }
    assert import_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_command_line_starts_without_torch():
    """The commands import torch where they need it, so ``wsi --help`` and bad input answer
    at once."""
    check = "import sys, wsi_pipeline.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0
