"""`pip install ./client` gives the client alone: it declares and imports none of the server's stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import clean_qaas_env

CLIENT = Path(__file__).resolve().parents[2] / "client"
SERVER_STACK = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "celery",
    "onnx",
    "onnxruntime",
    "numpy",
    "pydantic",
    "service",
    "worker",
)


def test_the_client_package_declares_only_light_dependencies() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert names == {"httpx", "httpx-sse", "rich", "click"}
    assert project["scripts"] == {"qaas": "qaas_client.cli:main"}


def test_the_client_and_its_command_run_without_the_server_stack() -> None:
    blocked = ", ".join(repr(m) for m in SERVER_STACK)
    probe = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ({blocked}):
            raise ImportError("the client imported " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["qaas", "--help"]
from qaas_client import Client
from qaas_client.cli import main
main()
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=clean_qaas_env(), cwd=CLIENT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "quantize" in done.stdout and "jobs" in done.stdout
