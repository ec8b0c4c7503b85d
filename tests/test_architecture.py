"""The boundaries the README's Architecture section states, checked on every module: `service/` never
imports onnxruntime, `service/contract/` (the rules the API and the engine share) no web framework
either, and `worker/engine/` has no database, queue or web framework inside; none of the shared
rules, inspection or the engine has an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(sorted({{name.split(".")[0] for name in sys.modules}} & {forbidden!r}))
"""


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("service", {"onnxruntime"}),
        # The recipe and format rules, which the API and the engine both run.
        ("service.contract", {"onnxruntime", "fastapi", "starlette", "sqlalchemy", "celery"}),
        ("worker.engine", {"celery", "kombu", "sqlalchemy", "fastapi", "starlette"}),
    ],
)
def test_a_package_imports_nothing_it_must_not(package: str, forbidden: set[str]) -> None:
    code = IMPORT_ALL.format(package=package, forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"importing every module of {package} loads {done.stdout.strip()}"


CYCLE_FREE = ("service/contract", "service/inspection", "worker/engine")


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The modules among `modules` that a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from worker.engine import fp16` imports the module fp16
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (its modules in order, the first repeated last), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        for imported in sorted(graph[module]):
            if found := visit(imported, [*path, module]):
                return found
        done.add(module)
        return []

    return next((c for m in sorted(graph) if (c := visit(m, []))), [])


def test_the_shared_rules_and_the_engine_have_no_import_cycle() -> None:
    """No module of the contract, inspection or the engine imports, directly or through others, a
    module that imports it back. An import put inside a function counts: it only hides the cycle
    (as worker/engine/data.py and images.py once did). A package's __init__ is left out."""
    files = {
        ".".join(p.with_suffix("").relative_to(ROOT).parts): p
        for package in CYCLE_FREE
        for p in (ROOT / package).glob("*.py")
        if p.name != "__init__.py"
    }
    graph = {module: _imported(path, set(files)) - {module} for module, path in files.items()}
    assert graph["worker.engine.data"] and graph["worker.engine.images"]  # the walk sees imports
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)
