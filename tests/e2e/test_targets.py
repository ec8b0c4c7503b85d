"""Targets with real processes: the API and two workers that advertise different classes (their settings
override what they detect; one of them is in a pool), on the embedded default. A job runs on a worker of the
class or pool it names, a class without a live worker is refused with the list of the live ones, and a job
that names two is measured on both, side by side in its result and its report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.cpu import architecture
from core.placement import class_name
from tests.e2e.conftest import Deployment, deploy, upload, wait_for_job
from tests.onnx_models import matmul_mlp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

# Worker A derives its class from the flags it is told it has; worker B is told its class, and is in a pool.
A_FEATURES = "avx2,fma"
A = class_name(architecture(), A_FEATURES.split(","))
B, POOL = "x86_64-amx", "edge"
SHORT = {"latency_runs": 5, "warmup_runs": 1, "threads": 1}


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workers = {
        "worker-a": {"QAAS_WORKER_FEATURES": A_FEATURES},
        "worker-b": {"QAAS_WORKER_CLASS": B, "QAAS_WORKER_POOL": POOL},
    }
    root = tmp_path_factory.mktemp("two-classes")
    for dep in deploy("two-classes", root, worker=False, workers=workers, QAAS_WORKER_HEARTBEAT_S="1"):
        with dep.client() as http:
            deadline = time.monotonic() + 60
            while sorted(c["name"] for c in live(http)) != sorted([A, B]):
                exited = [name for name, proc in dep.procs.items() if proc.poll() is not None]
                assert not exited and time.monotonic() < deadline, f"{exited}\n{dep.log_tail()}"
                time.sleep(0.2)
        yield dep


def live(http: httpx.Client) -> list[dict[str, Any]]:
    classes: list[dict[str, Any]] = http.get("/v1/targets").json()["classes"]
    return [c for c in classes if c["live_workers"]]


def measured_everywhere(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """The job once it ended and, if it succeeded, its measurements on the other classes are all in."""
    deadline = time.monotonic() + timeout
    while True:
        job, _ = wait_for_job(http, job_id)
        if not job["measurements_pending"] or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_a_job_runs_where_its_target_is_is_refused_where_none_is_and_is_measured_side_by_side(
    two_classes: Deployment, tmp_path: Path
) -> None:
    with two_classes.client() as http:
        classes = {c["name"]: c for c in live(http)}
        assert classes[B]["pools"] == [POOL] and classes[A]["pools"] == []
        assert classes[A]["features"] == ["avx2"] and classes[A]["capacity"] == 1
        model = upload(http, "/v1/models", "mlp.onnx", matmul_mlp(tmp_path / "mlp.onnx").read_bytes())

        def create(target: Any) -> httpx.Response:
            body = {"model_id": model, "recipe": {"mode": "dynamic"}, "evaluation": SHORT, "target": target}
            return http.post("/v1/jobs", json=body)

        refused = create([A, "x86_64-avx512vnni"])
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_target" and error["detail"]["unknown"] == ["x86_64-avx512vnni"]
        assert (error["detail"]["classes"], error["detail"]["pools"]) == (sorted([A, B]), [POOL])

        jobs = {name: create(target).json()["id"] for name, target in (("a", A), ("b", B), ("both", [A, POOL]))}
        for name, worker_class, pool in (("a", A, None), ("b", B, POOL)):
            job, _ = wait_for_job(http, jobs[name])
            assert job["status"] == "succeeded", job["error"]
            machine = job["result"]["machine"]
            assert (machine["worker_class"], machine["pool"]) == (worker_class, pool), name
            assert job["result"]["measured_on"] == [] and not job["measurements_pending"]  # one target

        both = measured_everywhere(http, jobs["both"])
        assert both["status"] == "succeeded", both["error"]
        assert both["target"] == [A, POOL] and both["result"]["machine"]["worker_class"] == A
        here, there = both["result"]["measured_on"]
        assert (here["target"], here["status"], here["worker_class"]) == (A, "measured", A)
        comparison = both["result"]["comparison"]  # where it ran: its own evaluation, as the result says
        assert (here["speedup_p50"], here["within_budget"]) == (
            comparison["speedup_p50"],
            comparison["fidelity"]["within_budget"],
        )
        assert (there["target"], there["status"], there["worker_class"], there["pool"]) == (POOL, "measured", B, POOL)
        for entry in (here, there):
            assert entry["original"]["latency_ms"]["p50"] > 0 and entry["quantized"]["latency_ms"]["p50"] > 0
            assert entry["chosen"] in ("quantized", "float") and entry["within_budget"] in (True, False)
        assert there["requests"] == 1 and there["machine"]["worker_class"] == B
        assert http.get(f"/v1/jobs/{jobs['both']}/report").json()["measured_on"] == both["result"]["measured_on"]
        page = http.get(f"/v1/jobs/{jobs['both']}/report.html").text
        section = page[page.index('id="measured-on"') :]
        assert section.index(A) < section.index(B) and "waiting for" not in section
