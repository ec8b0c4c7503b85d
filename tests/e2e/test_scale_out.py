"""Scale-out: the API and two workers as separate processes, each with an empty data dir of its own
and no shared filesystem. Only PostgreSQL, Redis and an S3 server (moto, on loopback) connect them."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_database, redis_prefix
from tests.e2e.conftest import Deployment, deploy_scaled_out, wait_for_job
from tests.e2e.faults import descendants, job_processes, wait_gone
from tests.e2e.test_faults import FAST, LONG, SHORT, create_job, measuring, upload_model, wait_job
from tests.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str, s3_server: S3Server, bucket: str
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("scale-out")
    for database_url in fresh_database(postgres_url):
        yield from deploy_scaled_out(
            "scale-out",
            root,
            s3_server.env(bucket),
            workers=2,
            QAAS_DATABASE_URL=database_url,
            QAAS_BROKER_URL=redis_url,
            QAAS_BROKER_KEY_PREFIX=redis_prefix() + "scale-out:",
            **FAST,
        )


def local_files(dep: Deployment) -> list[Path]:
    """Files left in any process's data dir outside its scratch space and input cache."""
    root = dep.data_dir.parent
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and p.parent != dep.logs and not {"work", "cache", "staging"} & set(p.relative_to(root).parts)
    ]


def worker_running_a_job(dep: Deployment) -> str:
    busy = [name for name, proc in dep.procs.items() if name.startswith("worker") and job_processes(proc.pid)]
    assert len(busy) == 1, busy
    return busy[0]


def test_jobs_run_on_either_worker_and_a_killed_workers_job_is_finished_by_the_other(
    two_workers: Deployment, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    dep = two_workers
    with dep.client() as http:
        model_id = upload_model(http, tmp_path)
        jobs = [create_job(http, model_id, SHORT) for _ in range(4)]
        for job_id in jobs:
            job, _ = wait_for_job(http, job_id, timeout=120)
            assert job["status"] == "succeeded", (job, dep.log_tail())
            artifact = http.get(f"/v1/jobs/{job_id}/artifacts").json()
            quantized = next(a for a in artifact if a["name"] == "quantized.onnx")
            content = http.get(quantized["url"]).content
            assert hashlib.sha256(content).hexdigest() == quantized["sha256"]

        # A long job: SIGKILL whichever worker runs it; the other finishes it.
        long_id = create_job(http, model_id, LONG)
        wait_job(http, long_id, measuring(1), 60, dep)
        victim = worker_running_a_job(dep)
        family = descendants(dep.procs[victim].pid)
        dep.procs[victim].send_signal(signal.SIGKILL)
        dep.procs[victim].wait()
        assert not wait_gone(family, 5)
        job = wait_job(http, long_id, lambda j: j["status"] in ("succeeded", "failed"), 90, dep)
        assert job["status"] == "succeeded" and job["attempts"] == 2, (job, dep.log_tail())
        survivor = next(n for n in dep.procs if n.startswith("worker") and n != victim)
        assert f"job {long_id}: attempt 2 started" in (dep.logs / f"{survivor}.log").read_text()
        names = sorted(a["name"] for a in http.get(f"/v1/jobs/{long_id}/artifacts").json())
        assert names == ["quantized.onnx", "report.json"]

    # Each worker ran jobs, and no file was shared through a disk: everything is in the bucket.
    assert all("attempt 1 started" in (dep.logs / f"worker-{n}.log").read_text() for n in (1, 2)), dep.log_tail()
    assert local_files(dep) == []
    keys = s3_server.object_keys(bucket)
    assert sum(k.startswith(f"qaas/jobs/{long_id}/") for k in keys) == 2  # the winning attempt's two files
    assert not any(k.startswith(f"qaas/jobs/{long_id}/1/") for k in keys)
    assert s3_server.unfinished_uploads(bucket) == []
