"""The import rules of DESIGN.md's layout, read from the source with `ast` (function-local imports too).

Each part of onnxmerge may import only the parts below it:

    errors
    kernels, model                     (the custom-op loader; load, save, metadata)
    data, graph                        (datasets; gs conversion, layers, alignment, ai.onnxmerge ops, MACs)
    pipeline                           (pass base, manager, state, checks, Method)
    passes                             (common/ and one package per method)
    calibration, measure, deploy       (the PyTorch bridge and training; evaluation, latency, size, report;
                                        what a board needs)
    api -> sweep, search -> cli -> __main__    (search: the budgeted merge, trials through the API)

Passes never import calibration, measurement, the API or the CLI (what they need reaches them through
`MergeState.services`); a method package imports no other method's package; the API and the CLI name
no method; `DOMAIN` and `SHARED` are defined once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folders and the package they are installed as
TREES = {"onnxmerge": ROOT / "onnxmerge", "onnxmerge.passes": ROOT / "passes", "onnxmerge.kernels": ROOT / "kernels"}
LEVELS = [
    {"errors"},
    {"kernels", "model", "examples"},
    {"data", "graph"},
    {"pipeline"},
    {"passes"},
    {"calibration", "measure", "deploy"},
    {"api"},
    {"sweep", "search"},
    {"cli"},
    {"__main__", "__init__"},
]
LEVEL = {part: k for k, parts in enumerate(LEVELS) for part in parts}


def modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name as installed."""
    found = {}
    for package, folder in TREES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def part(module: str) -> str:
    """The layout part a module belongs to: onnxmerge.graph.layers -> graph; onnxmerge -> __init__."""
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported onnxmerge module) of every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from onnxmerge import kernels` imports the module onnxmerge.kernels
                out.append((node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base))
    return [(line, name) for line, name in out if name == "onnxmerge" or name.startswith("onnxmerge.")]


def method_packages() -> list[str]:
    return sorted(p.name for p in TREES["onnxmerge.passes"].iterdir() if (p / "__init__.py").is_file() and p.name != "common")


def test_the_tree_is_read():
    assert {"onnxmerge.api", "onnxmerge.cli", "onnxmerge.passes.mtz.zip_neurons", "onnxmerge.pipeline.manager",
            "onnxmerge.kernels"} <= set(MODULES)
    assert set(map(part, MODULES)) <= set(LEVEL), set(map(part, MODULES)) - set(LEVEL)
    assert len(method_packages()) >= 4


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_upward(module):
    mine = part(module)
    bad = []
    for line, name in imports(MODULES[module], module):
        theirs = part(name)
        if theirs == "__init__":
            continue  # the package's version
        if LEVEL[theirs] > LEVEL[mine]:
            bad.append(f"line {line}: {name} ({theirs} is above {mine})")
    assert not bad, f"{MODULES[module].relative_to(ROOT)} imports upward: " + "; ".join(bad)


@pytest.mark.parametrize("method", method_packages())
def test_a_method_package_imports_no_other_method(method):
    others = [m for m in method_packages() if m != method]
    bad = []
    for module, path in MODULES.items():
        if module.startswith(f"onnxmerge.passes.{method}"):
            bad += [f"{path.name}:{line} {name}" for line, name in imports(path, module)
                    if any(name.startswith(f"onnxmerge.passes.{o}") for o in others)]
    assert not bad, bad


def _code_strings_and_names(path: Path):
    """String constants (docstrings left out) and identifiers of a module's code."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr


@pytest.mark.parametrize("module", ["onnxmerge.api", "onnxmerge.cli", "onnxmerge.sweep", "onnxmerge.pipeline.method",
                                    "onnxmerge.pipeline.manager", "onnxmerge.pipeline.state"])
def test_generic_modules_name_no_method(module):
    names = re.compile(r"\b(" + "|".join(method_packages()) + r")\b")
    found = [f"line {line}: {text!r}" for line, text in _code_strings_and_names(MODULES[module]) if names.search(text)]
    assert not found, f"{module} names a method: " + "; ".join(found)


@pytest.mark.parametrize("constant", ["DOMAIN", "SHARED"])
def test_constants_are_defined_once(constant):
    where = []
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                names = [getattr(e, "id", None) for e in t.elts] if isinstance(t, ast.Tuple) else [getattr(t, "id", None)]
                if constant in names:
                    where.append(module)
    assert len(where) == 1, f"{constant} is defined in {where}"
