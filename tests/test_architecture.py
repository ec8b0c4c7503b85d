"""The boundaries the README's Architecture section states, checked on every module:

- `core/` (every shape that crosses a boundary) imports nothing of `service/`, `worker/`, and no web
  framework, database, queue, object store or onnxruntime;
- the engine (`worker/engine/`) imports only `core/` and itself;
- `worker/` never imports the web schemas or FastAPI; `service/` never imports onnxruntime;
- nothing has an import cycle, imports put inside functions included;
- no class that crosses a boundary is defined twice.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "service", "worker")
HEAVY = {"onnxruntime", "fastapi", "starlette", "sqlalchemy", "celery", "kombu", "redis", "boto3", "botocore"}

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
        ("core", HEAVY | {"service", "worker", "numpy.testing"}),
        ("service", {"onnxruntime"}),
        ("worker.engine", {"service", "celery", "kombu", "sqlalchemy", "fastapi", "starlette", "boto3"}),
    ],
)
def test_a_package_loads_nothing_it_must_not(package: str, forbidden: set[str]) -> None:
    """What importing every module of the package really loads, transitively."""
    code = IMPORT_ALL.format(package=package, forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"importing every module of {package} loads {done.stdout.strip()}"


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.with_suffix("").relative_to(ROOT).parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """Every module a file names in an import, at the top or inside a function (`from a import b` names
    both `a` and `a.b`, which may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


MODULES = _modules()
IMPORTS = {module: _imports(path) for module, path in MODULES.items()}


def _offenders(where: str, allowed: tuple[str, ...], watched: tuple[str, ...]) -> list[str]:
    """`module -> import` pairs of modules under `where` that import something under `watched` that is not
    under `allowed`."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(
        f"{m} -> {i}"
        for m, imported in IMPORTS.items()
        if under(m, (where,))
        for i in imported
        if under(i, watched) and not under(i, allowed)
    )


def test_core_imports_nothing_of_the_service_or_the_worker() -> None:
    assert not _offenders("core", (), ("service", "worker", *sorted(HEAVY)))


def test_the_engine_imports_only_core_and_itself() -> None:
    assert not _offenders("worker.engine", ("worker.engine",), ("service", "worker", "fastapi", "sqlalchemy"))


def test_the_worker_never_imports_the_web_schemas_or_fastapi() -> None:
    web = ("fastapi", "starlette", "service.jobs.schemas", "service.schemas", "service.app", "service.api")
    assert not _offenders("worker", (), web)
    assert not [p for p in (ROOT / "service").rglob("*.py") if "onnxruntime" in _imports(p)]


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


def test_nothing_has_an_import_cycle() -> None:
    """No module imports, directly or through others, a module that imports it back. An import put
    inside a function counts: it only hides the cycle. A package's __init__ counts as the package (one
    that re-exports its modules would tie them all together)."""
    graph = {m: {i for i in imported if i in MODULES and i != m} for m, imported in IMPORTS.items()}
    assert graph["worker.engine.evaluate"] and graph["service.storage.s3"]  # the walk sees imports
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_no_two_folders_import_each_other() -> None:
    """The same one level up: a folder (a package) of the house never imports, through its modules, a folder
    that imports it back (as `service/jobs/` and `service/reports/` once did)."""
    folders = {m for m, p in MODULES.items() if p.name == "__init__.py"}

    def folder(module: str) -> str:
        return max((f for f in folders if module == f or module.startswith(f + ".")), key=len)

    graph: dict[str, set[str]] = {f: set() for f in folders}
    for module, imported in IMPORTS.items():
        for other in imported & set(MODULES):
            if folder(other) != folder(module) and not folder(module).startswith(folder(other) + "."):
                graph[folder(module)].add(folder(other))
    assert graph["service.reports"] == {"core"}  # the page reads the result, nothing of the jobs
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)


# The shapes that cross a process or wire boundary: each is defined once, in core/.
BOUNDARY_SHAPES = {
    "Recipe",
    "FidelitySpec",
    "EvaluationSettings",
    "EvaluationSpec",
    "TensorSpec",
    "TensorInfo",
    "ModelFacts",
    "DatasetSource",
    "DataSource",
    "DatasetPlan",
    "Preprocess",
    "JobFile",
    "ChildOutcome",
    "ArtifactItem",
    "Limits",
    "ProgressLine",
    "Progress",
    "Note",
    "CandidateProgress",
    "ErrorInfo",
    "JobError",
    "RuleError",
    "EngineError",
    "JobStatus",
    "Stage",
    "AttemptStatus",
    "JobResult",
    "JobResultData",
    "ModelMetrics",
    "LatencyStats",
    "OutputFidelity",
    "FidelityVerdict",
    "AccuracyComparison",
    "Comparison",
    "Machine",
    "EvaluationFacts",
    "AutoSearch",
    "AutoTrial",
    "Sensitivity",
    "SensitivitySummary",
    "QuantizationFacts",
    "QuantizationSpec",
}


def test_no_shape_that_crosses_a_boundary_is_defined_twice() -> None:
    """Each is defined exactly once, in core/ (aliases count: `X = Y` names a second X). The client is a
    separate distribution without the server's dependencies (pydantic, onnx): its thin views of the JSON
    are held to core's result by tests/client/test_types.py instead."""
    defined: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.ImportFrom):
                names = [a.asname for a in node.names if a.asname and a.asname != a.name]
            for name in names:
                if name in BOUNDARY_SHAPES:
                    defined[name] += 1
                    where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    twice = {name: where[name] for name, n in defined.items() if n > 1}
    assert not twice, twice
    outside_core = {n: w for n, w in where.items() if not all(p.startswith("core/") for p in w)}
    assert not outside_core, outside_core


def test_the_core_and_the_engine_hide_no_import_of_their_own_in_a_function() -> None:
    """An import of the house's own modules put inside a function hides an arrow from anyone reading the
    file's head (and once hid cycles): core/ and the engine import theirs at the top."""
    hidden = []
    for module, path in MODULES.items():
        if not module.startswith(("core", "worker.engine")):
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import) and id(node) not in top:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if name and name.split(".")[0] in PACKAGES:
                    hidden.append(f"{module}:{node.lineno} {name}")
    assert not hidden, hidden
