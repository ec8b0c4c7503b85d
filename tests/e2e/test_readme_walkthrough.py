"""The README's walk-through, run as written against the real API and worker processes: the shell
block that makes the demo model and quantizes it with `qaas`, the Python client block, and the curl
block. The only change is the service's address (the README's http://127.0.0.1:8000 is `make run`'s;
the test's deployment listens on a free port)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.conftest import unavailable
from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEFAULT_URL = "http://127.0.0.1:8000"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n") + len(title) + 2
    following = re.search(r"\n#{2,} ", text[start:])  # the next heading (a shell comment has one #)
    return text[start : start + following.start() if following else len(text)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a reader runs the walk-through: `.venv/bin/python` and `.venv/bin/qaas` are the repository's."""
    here = tmp_path_factory.mktemp("walkthrough")
    (here / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return here


def _run(script: str, folder: Path, dep: Deployment, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    environment.update(HOME=str(folder), QAAS_URL=dep.base_url, **env)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def walked(embedded: Deployment, folder: Path) -> subprocess.CompletedProcess[str]:
    """The walk-through's first shell block: the demo model and data, then `qaas quantize`."""
    [script] = _blocks(_section("## Walk-through"), "sh")[:1]
    return _run(script, folder, embedded)


def test_the_walk_through_makes_the_demo_model_and_quantizes_it(
    walked: subprocess.CompletedProcess[str], folder: Path
) -> None:
    assert walked.returncode == 0, (walked.stdout[-3000:], walked.stderr[-3000:])
    quantized = onnx.load(str(folder / "demo_int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    for shown in ("speedup", "logits"):  # what it cost: latency and speedup, fidelity per output
        assert shown in walked.stdout, walked.stdout


def test_the_python_client_block_runs(
    embedded: Deployment, folder: Path, walked: subprocess.CompletedProcess[str]
) -> None:
    [block] = _blocks(_section("## Walk-through"), "python")
    assert DEFAULT_URL in block and walked.returncode == 0
    done = subprocess.run(
        [str(folder / ".venv" / "bin" / "python"), "-c", block.replace(DEFAULT_URL, embedded.base_url)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    onnx.checker.check_model(str(folder / "out" / "quantized.onnx"))


def test_the_curl_block_runs(embedded: Deployment, folder: Path, walked: subprocess.CompletedProcess[str]) -> None:
    if shutil.which("curl") is None:
        unavailable("curl", "not installed", "apt-get install -y curl")
    [block] = _blocks(_section("### The same with curl"), "sh")
    assert f"API={DEFAULT_URL}" in block and walked.returncode == 0
    done = _run(block.replace(f"API={DEFAULT_URL}", f"API={embedded.base_url}"), folder, embedded)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    onnx.checker.check_model(str(folder / "quantized.onnx"))
    assert "event: end" in done.stdout, done.stdout[-3000:]  # the event stream ran to its end
    assert '"speedup_p50"' in done.stdout and done.stdout.rstrip().endswith("/report.html"), done.stdout[-3000:]
