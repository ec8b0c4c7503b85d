"""Jobs that hurt the process running them: out of memory, a real segfault, a model that never
finishes, a job that writes too much. Each ends as a cleanly failed job saying what happened, and
the same worker process then completes a normal job."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import psutil
import pytest

from tests.e2e.conftest import wait_for_job
from tests.onnx_models import conv_classifier, matmul_mlp
from tests.security import hostile as h
from tests.security.conftest import Hostile, assert_serving, normal_job, start

pytestmark = pytest.mark.e2e

MEMORY_BYTES = 1 << 30
TIMEOUT_S = 10
FILE_BYTES = 2 << 20
CRASH_MARKER = "qaas-test-segfault"

# Only the tests install this, on PYTHONPATH: production code has no crash switch. It arms a
# real SIGSEGV in a job process (`python -m worker.job_process WORKDIR`) whose model carries the
# marker as its producer name, fired when the engine opens the model.
SITECUSTOMIZE = f'''
import sys


def _arm():
    import json
    import os

    if len(sys.argv) != 2 or sys.argv[0] != "-m":
        return
    job_file = os.path.join(sys.argv[1], "job.json")
    if not os.path.isfile(job_file):
        return
    with open(job_file) as f:
        model = json.load(f)["model_path"]
    with open(model, "rb") as f:
        if b"{CRASH_MARKER}" not in f.read():
            return

    def crash(event, args):
        if event == "open" and args and str(args[0]) == model:
            import ctypes

            ctypes.string_at(0)

    sys.addaudithook(crash)


try:
    _arm()
except Exception:
    pass
'''


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    yield from start(
        tmp_path_factory,
        "job-limits",
        PYTHONPATH=os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p),
        QAAS_JOB_MEMORY_BYTES=str(MEMORY_BYTES),
        QAAS_JOB_TIMEOUT_S=str(TIMEOUT_S),
        QAAS_JOB_FILE_BYTES=str(FILE_BYTES),
    )


def crashing_model(tmp_path: Path) -> bytes:
    model = onnx.load(str(conv_classifier(tmp_path / "crash.onnx")))
    model.producer_name = CRASH_MARKER
    return model.SerializeToString()


def big_weights_model(tmp_path: Path) -> bytes:
    """A valid 4 MiB model: the engine writes copies of it, beyond the 2 MiB file-size limit."""
    return matmul_mlp(tmp_path / "big.onnx", features=64, hidden=8192).read_bytes()


def worker_processes(service: Hostile) -> set[int]:
    """The Celery worker and its pool processes (a job's own process is a grandchild, not listed)."""
    main = psutil.Process(service.dep.procs["worker"].pid)
    return {main.pid, *(child.pid for child in main.children())}


@dataclass(frozen=True)
class Case:
    model: str  # name of a builder below
    code: str
    says: str
    max_s: float  # the job ends well within this


BUILDERS = {
    "out-of-memory": lambda tmp: h.constant_of_shape_model([1, 1 << 29]),  # 2 GiB of floats, limit 1 GiB
    "segfault": crashing_model,
    "never-ends": lambda tmp: h.long_loop_model(),
    "writes-too-much": big_weights_model,
}

CASES = {
    "out-of-memory": Case("out-of-memory", "resource_limit", "ran out of memory", 60),
    "segfault": Case("segfault", "internal", "crashed with SIGSEGV", 60),
    "never-ends": Case("never-ends", "timeout", f"longer than the limit of {TIMEOUT_S} s", TIMEOUT_S + 30),
    "writes-too-much": Case("writes-too-much", "resource_limit", f"limit of {FILE_BYTES} bytes", 60),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_job_fails_cleanly_and_the_worker_carries_on(service: Hostile, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    worker = worker_processes(service)
    with service.client() as http:
        model = http.post("/v1/models", files={"file": ("model.onnx", BUILDERS[case.model](tmp_path))})
        assert model.status_code == 201, model.text
        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model.json()["id"],
                "recipe": {"mode": "dynamic"},
                "evaluation": {"latency_runs": 2, "warmup_runs": 1},
            },
        )
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(http, created.json()["id"], timeout=case.max_s)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == case.code, error
    assert case.says in error["message"], error
    assert "Traceback" not in error["message"] and "stderr" not in str(error["detail"]), error
    assert_serving(service)
    assert worker_processes(service) == worker, "the worker or its pool process was replaced"
    normal_job(service, tmp_path, timeout=60)
