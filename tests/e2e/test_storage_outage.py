"""Object storage goes away under a running deployment: the API and a worker as separate processes on
S3 (moto, on loopback), the worker reaching it through a TCP proxy that the tests cut and restore.
A job whose worker cannot fetch its inputs or store its results is put back in line and tried
again later, a bounded number of times; an input deleted from the bucket fails the job at once."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_database, redis_prefix
from tests.e2e.conftest import Deployment, deploy_scaled_out
from tests.e2e.faults import TcpProxy
from tests.e2e.test_faults import FAST, LONG, SHORT, create_job, ended, measuring, wait_job
from tests.onnx_models import matmul_mlp
from tests.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

RETRY_S = 1.0  # QAAS_STORAGE_RETRY_S: the first wait before the next attempt (then 2 s)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server) -> Iterator[TcpProxy]:
    tcp = TcpProxy(("127.0.0.1", s3_server.port))
    tcp.start()
    yield tcp
    tcp.close()


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    redis_url: str,
    s3_server: S3Server,
    bucket: str,
    proxy: TcpProxy,
) -> Iterator[Deployment]:
    """The API reaches the S3 server directly, the worker through the proxy: cutting it is an
    object store the worker cannot reach."""
    root = tmp_path_factory.mktemp("storage-outage")
    for database_url in fresh_database(postgres_url):
        yield from deploy_scaled_out(
            "storage-outage",
            root,
            s3_server.env(bucket),
            worker_env={"QAAS_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"},
            QAAS_DATABASE_URL=database_url,
            QAAS_BROKER_URL=redis_url,
            QAAS_BROKER_KEY_PREFIX=redis_prefix() + "storage-outage:",
            QAAS_STORAGE_RETRY_S=str(RETRY_S),
            **FAST,
        )


@pytest.fixture
def dep(deployment: Deployment, proxy: TcpProxy) -> Iterator[Deployment]:
    yield deployment
    if proxy.listener is None:  # a test that failed with the store cut leaves it reachable again
        proxy.restore()


def fresh_model(http: httpx.Client, tmp_path: Path) -> str:
    """A model no worker has fetched yet (its own weights, so not in any worker's input cache)."""
    seed = uuid.uuid4().int % 10_000
    path = matmul_mlp(tmp_path / f"mlp-{seed}.onnx", features=512, hidden=2048, seed=seed)
    response = http.post("/v1/models", files={"file": ("mlp.onnx", path.read_bytes())})
    assert response.status_code == 201, response.text
    model_id: str = response.json()["id"]
    return model_id


def worker_log(dep: Deployment) -> str:
    return (dep.logs / "worker-1.log").read_text(errors="replace")


def wait_log(dep: Deployment, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, worker_log(dep)):
        assert time.monotonic() < deadline, f"the worker never logged {pattern!r}\n{dep.log_tail()}"
        time.sleep(0.1)


def stored(s3_server: S3Server, bucket: str, job_id: str) -> list[str]:
    return [k for k in s3_server.object_keys(bucket) if k.startswith(f"qaas/jobs/{job_id}/")]


def assert_succeeded_on(
    http: httpx.Client, s3_server: S3Server, bucket: str, job: dict[str, Any], attempt: int, dep: Deployment
) -> None:
    assert job["status"] == "succeeded", (job, dep.log_tail())
    assert job["attempts"] == attempt and job["progress_note"] is None, job
    artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert sorted(artifacts) == ["quantized.onnx", "report.json"]
    content = http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content
    assert len(content) == artifacts["quantized.onnx"]["size_bytes"]
    assert {k.rsplit("/", 2)[-2] for k in stored(s3_server, bucket, job["id"])} == {str(attempt)}


def test_storage_cut_before_the_worker_fetches_the_job_waits_and_then_finishes(
    dep: Deployment, proxy: TcpProxy, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    with dep.client() as http:
        model_id = fresh_model(http, tmp_path)
        proxy.cut()
        job_id = create_job(http, model_id, SHORT)
        wait_log(dep, rf"job {job_id}: attempt 1 could not reach object storage")
        waiting = wait_job(http, job_id, lambda j: j["status"] == "queued", 10, dep)
        # Back in line, the failed attempt counted, and the job says why it waits.
        assert waiting["attempts"] == 1 and waiting["error"] is None, waiting
        assert "object storage" in waiting["progress_note"], waiting
        proxy.restore()
        job = wait_job(http, job_id, ended, 90, dep)
        assert_succeeded_on(http, s3_server, bucket, job, 2, dep)


def test_storage_cut_while_the_job_runs_its_results_are_stored_by_the_next_attempt(
    dep: Deployment, proxy: TcpProxy, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    with dep.client() as http:
        job_id = create_job(http, fresh_model(http, tmp_path), LONG)
        wait_job(http, job_id, measuring(1), 60, dep)
        proxy.cut()  # the job's process goes on; storing its results fails
        wait_log(dep, rf"job {job_id}: attempt 1 could not reach object storage")
        assert stored(s3_server, bucket, job_id) == []
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running")  # never succeeded
        proxy.restore()
        job = wait_job(http, job_id, ended, 90, dep)
        assert_succeeded_on(http, s3_server, bucket, job, 2, dep)
    assert s3_server.unfinished_uploads(bucket) == []


def test_storage_that_stays_down_fails_the_job_after_the_last_attempt(
    dep: Deployment, proxy: TcpProxy, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    attempts = int(FAST["QAAS_JOB_MAX_ATTEMPTS"])
    with dep.client() as http:
        model_id = fresh_model(http, tmp_path)
        proxy.cut()
        job_id = create_job(http, model_id, SHORT)
        job = wait_job(http, job_id, ended, 120, dep)
        proxy.restore()
        assert job["status"] == "failed" and job["attempts"] == attempts, (job, dep.log_tail())
        error = job["error"]
        assert error["code"] == "storage_unavailable", error
        assert f"{attempts} attempts" in error["message"] and error["detail"]["attempts"] == attempts
        assert "127.0.0.1" not in str(error)  # the operator's endpoint is in the worker's log, not the answer
        assert http.get(f"/v1/jobs/{job_id}/artifacts").json() == []
    assert stored(s3_server, bucket, job_id) == []
    assert re.findall(rf"job {job_id}: attempt (\d) started", worker_log(dep)) == ["1", "2", "3"]


def test_an_input_deleted_from_the_bucket_fails_the_job_at_once(
    dep: Deployment, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    with dep.client() as http:
        model_id = fresh_model(http, tmp_path)
        s3_server.client().delete_object(Bucket=bucket, Key=f"qaas/models/{model_id}/model.onnx")
        job = wait_job(http, create_job(http, model_id, SHORT), ended, 60, dep)
        assert job["status"] == "failed" and job["attempts"] == 1, job
        assert job["error"]["code"] == "input_missing", job["error"]
        assert "model" in job["error"]["message"] and "upload" in job["error"]["message"]
