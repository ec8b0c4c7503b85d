"""What the README says of `make bench`'s harness: it starts QaaS as `make run` does, and every process
it starts is stopped at the end, a job's process (in a session of its own) included."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from bench import harness
from bench.models import tiny_model

pytestmark = pytest.mark.e2e


def test_every_process_the_benchmark_starts_is_stopped_at_the_end(tmp_path: Path) -> None:
    # A short shutdown grace: the job is handed back after 1 s instead of 10 (the default).
    with harness.service(tmp_path / "svc", QAAS_MAX_LATENCY_RUNS="100000", QAAS_WORKER_SHUTDOWN_GRACE_S="1") as svc:
        assert svc.supervisor is not None and svc.supervisor.cmdline()[-1] == "service.run"
        api, worker = svc.api_process(), svc.worker_process()
        assert api is not None and worker is not None
        with svc.client() as http:
            model = harness.upload_model(http, tiny_model(tmp_path / "tiny.onnx"))
            # A job that is still measuring when the benchmark ends: its process must go too.
            evaluation = {"latency_runs": 100_000, "warmup_runs": 0, "threads": 1}
            body = {"model_id": model["id"], "recipe": {"mode": "dynamic"}, "evaluation": evaluation}
            job = harness.create_job(http, body)
            deadline = time.monotonic() + 60
            while not svc.job_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        jobs = svc.job_processes()
        assert jobs, f"job {job['id']} never started a process\n{svc.log_tail()}"
        started = [svc.supervisor, api, worker, *jobs]
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
