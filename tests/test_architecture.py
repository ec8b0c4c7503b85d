"""The boundaries the README's Architecture section states, checked on every module: `service/` never
imports onnxruntime, and `worker/engine/` has no database, queue or web framework inside."""

from __future__ import annotations

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
        ("worker.engine", {"celery", "kombu", "sqlalchemy", "fastapi", "starlette"}),
    ],
)
def test_a_package_imports_nothing_it_must_not(package: str, forbidden: set[str]) -> None:
    code = IMPORT_ALL.format(package=package, forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"importing every module of {package} loads {done.stdout.strip()}"
