"""Scale-out: the API and two workers as separate processes, each with an empty data dir of its own
and no shared filesystem. Only PostgreSQL, Redis and an S3 server (moto, on loopback) connect them."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import fresh_database, redis_prefix
from tests.e2e.conftest import Deployment, deploy_scaled_out, wait_for_job
from tests.e2e.faults import descendants, job_processes, wait_gone
from tests.e2e.test_faults import FAST, LONG, SHORT, create_job, measuring, upload_model, wait_job
from tests.s3 import S3Server
from tests.worker.engine.pitfall_models import external_data_mlp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


# Workers only (and so their job processes): the engine's 2 GB external-data threshold lowered to
# 1000 bytes, so that every model here takes the path of one too large for one protobuf. Nothing of
# 2 GB is written in a test; multipart uploads are exercised by lowering the part size instead.
LOWER_THRESHOLD = """import worker.engine.preprocess as preprocess

preprocess.EXTERNAL_DATA_THRESHOLD = 1000
"""
PART_BYTES = 5 << 20  # S3's smallest part


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str, s3_server: S3Server, bucket: str
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("scale-out")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(LOWER_THRESHOLD)
    for database_url in fresh_database(postgres_url):
        yield from deploy_scaled_out(
            "scale-out",
            root,
            s3_server.env(bucket),
            workers=2,
            worker_env={"PYTHONPATH": str(hook)},
            QAAS_S3_PART_BYTES=str(PART_BYTES),
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
        if p.is_file()
        and not {"logs", "hook", "work", "cache", "cache.seen", "staging"} & set(p.relative_to(root).parts)
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
        # Past the (lowered) protobuf limit: the weights come back in an external data file.
        assert names == ["quantized.onnx", "quantized.onnx.data", "report.json"]
        assert any("too large for one protobuf" in step for step in job["result"]["preprocessing_steps"])

    # Each worker ran jobs, and no file was shared through a disk: everything is in the bucket.
    assert all("attempt 1 started" in (dep.logs / f"worker-{n}.log").read_text() for n in (1, 2)), dep.log_tail()
    assert local_files(dep) == []
    keys = s3_server.object_keys(bucket)
    assert sum(k.startswith(f"qaas/jobs/{long_id}/2/") for k in keys) == 3  # the winning attempt's files
    assert not any(k.startswith(f"qaas/jobs/{long_id}/") and f"/{long_id}/2/" not in k for k in keys)
    assert s3_server.unfinished_uploads(bucket) == []


def test_a_model_past_the_protobuf_limit_with_external_data_goes_through_s3(
    two_workers: Deployment, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Uploaded with its weights in an external data file of several S3 parts; the worker fetches
    both, keeps the tensors external (the lowered threshold), and stores quantized.onnx with its
    .data, each a multipart upload; both download and run."""
    model_path = external_data_mlp(tmp_path / "big.onnx", features=512, hidden=3072)  # 12.6 MB of weights
    data_path = tmp_path / "big.onnx.data"
    assert data_path.stat().st_size > 2 * PART_BYTES
    with two_workers.client() as http, model_path.open("rb") as fm, data_path.open("rb") as fd:
        model = http.post("/v1/models", files=[("file", ("big.onnx", fm)), ("external_data", ("big.onnx.data", fd))])
        assert model.status_code == 201, model.text
        stored = s3_server.object_keys(bucket)
        assert f"qaas/models/{model.json()['id']}/big.onnx.data" in stored
        assert not [k for k in stored if k.startswith("qaas/uploads/")]  # the direct upload's temporary key
        job_id = create_job(http, model.json()["id"], SHORT)
        job, _ = wait_for_job(http, job_id, timeout=120)
        assert job["status"] == "succeeded", (job["error"], two_workers.log_tail())
        steps = job["result"]["preprocessing_steps"]
        assert any("external data" in step for step in steps), steps
        artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()}
        assert {"quantized.onnx", "quantized.onnx.data"} <= set(artifacts)
        out = tmp_path / "out"
        out.mkdir()
        for name in ("quantized.onnx", "quantized.onnx.data"):
            content = http.get(artifacts[name]["url"]).content
            assert hashlib.sha256(content).hexdigest() == artifacts[name]["sha256"]
            (out / name).write_bytes(content)
    x = np.random.default_rng(0).random((1, 512), dtype=np.float32)
    want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out / "quantized.onnx")).run(None, {"x": x})[0]
    assert float(np.dot(want.ravel(), got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got))) > 0.98
    assert s3_server.unfinished_uploads(bucket) == []
