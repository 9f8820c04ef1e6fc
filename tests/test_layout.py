"""The dependency rules of the code layout (README, "Code layout"), checked on the source.

Layers point one way: the entry modules (launch/*.py) -> cli -> tasks -> core -> data, model; the tools sit
beside the entry modules. No module imports one that imports it back (no cycle of any length), and an import
inside a function is kept only for a heavy or optional third-party module, with the reason on its line.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"launch": "bertlaunch", "data": "bertlaunch.data", "model": "bertlaunch.model"}  # pyproject's package-dir


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))}


def layer(mod: str) -> str:
    """core, tasks, cli, tools, entry (launch/*.py), data or model."""
    parts = mod.split(".")
    if parts[1:2] in (["data"], ["model"]):
        return parts[1]
    if len(parts) > 2 and parts[1] in ("core", "tasks", "cli", "tools"):
        return parts[1]
    return "entry"


@cache
def imports() -> dict[str, list[tuple[str, int, bool, str]]]:
    """module -> (imported module of ours, line, inside a function?, source line) for every import statement."""
    mods = modules()
    out = {}
    for mod, path in mods.items():
        src = path.read_text()
        lines = src.splitlines()
        found = []
        tree = ast.parse(src)
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            else:
                continue
            for name in names:
                found.append((name, node.lineno, id(node) in nested, lines[node.lineno - 1]))
        out[mod] = found
    return out


def ours(name: str) -> str | None:
    """The module of ours that an imported name refers to (None: a third-party module)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> dict[str, set[str]]:
    return {mod: {t for name, *_ in found if (t := ours(name)) and t != mod} for mod, found in imports().items()}


ALLOWED = {  # layer -> the layers it may import (besides itself)
    "entry": {"cli", "tasks", "core", "data", "model", "tools"},
    "tools": {"tasks", "core", "data", "model"},
    "cli": {"tasks", "core", "data", "model"},
    "tasks": {"core", "data", "model"},
    "core": {"data", "model"},
    "data": set(),
    "model": set(),
}


def test_layers_point_one_way():
    bad = sorted(f"{mod} ({layer(mod)}) imports {t} ({layer(t)})" for mod, targets in edges().items()
                 for t in targets if layer(t) != layer(mod) and layer(t) not in ALLOWED[layer(mod)])
    assert bad == []


def test_no_import_cycles():
    """Tarjan's strongly connected components over the import graph: every one must be a single module."""
    graph, index, low, stack, on, cycles = edges(), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_inside_functions_are_third_party_with_a_reason():
    bad = [f"{modules()[mod].relative_to(REPO)}:{line}: {text.strip()}" for mod, found in imports().items()
           for name, line, nested, text in found if nested and (ours(name) or "#" not in text)]
    assert bad == []


def test_one_module_reads_the_rank_variables():
    pattern = re.compile(r"[\"'](RANK|WORLD_SIZE|LOCAL_RANK|SLURM_PROCID)[\"']")
    readers = sorted(str(p.relative_to(REPO)) for p in modules().values() if pattern.search(p.read_text()))
    assert readers == ["launch/core/dist.py"]


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for folder in ("launch", "data", "model", "tests", "bench")
            for p in (REPO / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages one by one (the folders map onto `bertlaunch`): none may be missing."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for folder in FOLDERS for p in (REPO / folder).rglob("__init__.py")}
    assert listed == folders


def test_no_production_module_reads_a_test_variable():
    readers = sorted(str(p.relative_to(REPO)) for p in modules().values()
                     if re.search(r"BERTLAUNCH_(NAN|HANG|FAIL|KILL|SLOW)", p.read_text()))
    assert readers == []


@pytest.mark.parametrize("rule", ["core", "tasks"])
def test_the_layer_rules_are_checked_on_real_edges(rule):
    """The checks above would pass vacuously on an empty graph: the graph has the edges we know of."""
    e = edges()
    known = {"core": ("bertlaunch.core.assemble", "bertlaunch.core.loop"),
             "tasks": ("bertlaunch.tasks.mlm.spec", "bertlaunch.core.task")}[rule]
    assert known[1] in e[known[0]]


def test_benchmark_results_name_no_path_of_the_machine_that_ran_them():
    absolute = re.compile(r'(?:^|[\s"=\[,])/[\w.-]+/')
    bad = sorted(p.name for p in (REPO / "bench" / "results").glob("*.json") if absolute.search(p.read_text()))
    assert bad == []
