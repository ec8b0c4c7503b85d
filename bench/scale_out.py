"""Object storage and scale-out figures, on S3 storage (moto's S3 server on loopback, started here):

- `upload_s3_mb_s`: a model with external data uploaded through the API into S3 (the external data
  streamed straight into a multipart upload, the .onnx staged and inspected), beside `cp` of the
  same bytes on the same disk.
- `jobs_per_minute_1` / `_2`: a batch of small static jobs submitted at once, finished with one
  worker process, then with two (`python -m worker` started twice, as on two machines).

Each figure comes from a function that returns it (`upload_figures`, `jobs_per_minute`); `run` only
puts them in the table. The S3 figures are measured against moto, a Python server on the same machine,
not against MinIO or AWS."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench import harness
from bench.common import MB, Context, mb
from bench.models import external_data_model, tiny_model, tiny_npz
from bench.results import Baseline, Measurement
from bench.upload import _cp
from service.run import WORKER

UPLOAD_BYTES = 256 << 20
JOBS = 12
STATIC = {"mode": "static", "calibration_method": "minmax"}
EVALUATION = {"latency_runs": 5, "warmup_runs": 1}


@contextlib.contextmanager
def extra_worker(svc: harness.Service) -> Iterator[subprocess.Popen[bytes]]:
    """A second `python -m worker` beside the service's own (same database, broker and bucket)."""
    with (svc.root / "worker-2.log").open("ab") as log:
        proc = subprocess.Popen(WORKER, env=svc.env, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        family = harness.tree(psutil.Process(proc.pid))
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs([p for p in family[1:] if p.is_running()], timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()


def upload_figures(svc: harness.Service, files: list[Path]) -> dict[str, Any]:
    """Upload `files` (the .onnx, then its external data) once; seconds, MB/s and the API's RSS."""
    api = svc.api_process()
    before = harness.rss(api)
    total = sum(f.stat().st_size for f in files)
    with harness.Sampler(lambda: {"api": float(harness.rss(api))}, interval=0.05) as sampler, svc.client(1800) as c:
        t = time.perf_counter()
        model = harness.upload_model(c, files[0], files[1:])
        upload_s = time.perf_counter() - t
        c.delete(f"/v1/models/{model['id']}")
    return {
        "bytes": total,
        "upload_s": round(upload_s, 2),
        "upload_mb_s": round(total / MB / upload_s, 1),
        "api_rss_growth_mb": mb(sampler.peak["api"] - before),
    }


def jobs_per_minute(svc: harness.Service, model_id: str, dataset_id: str, jobs: int) -> dict[str, Any]:
    """Submit `jobs` small static jobs at once and wait for all: jobs per minute from the first
    submission to the last finish (server clock), and how long each job ran."""
    body = {"model_id": model_id, "calibration_dataset_id": dataset_id, "recipe": STATIC, "evaluation": EVALUATION}
    with svc.client() as c:
        ids = [harness.create_job(c, body)["id"] for _ in range(jobs)]
        done = [harness.wait_job(c, job_id, timeout=1800) for job_id in ids]
    failed = [harness.job_error(j) for j in done if j["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {jobs} jobs did not succeed: {failed[0]}")

    def at(job: dict[str, Any], key: str) -> float:
        return dt.datetime.fromisoformat(job[key].replace("Z", "+00:00")).timestamp()

    span = max(at(j, "finished_at") for j in done) - min(at(j, "created_at") for j in done)
    running = sorted(at(j, "finished_at") - at(j, "started_at") for j in done)
    return {
        "jobs": jobs,
        "span_s": round(span, 2),
        "jobs_per_minute": round(jobs / span * 60, 1),
        "job_running_s_median": round(running[len(running) // 2], 2),
    }


def run(ctx: Context) -> dict[str, Measurement]:
    work = ctx.dir("scale_out")
    size = (32 << 20) if ctx.quick else UPLOAD_BYTES
    jobs = 4 if ctx.quick else JOBS
    onnx_path, bin_path = external_data_model(work / "big.onnx", size)
    model_path, data_path = tiny_model(work / "tiny.onnx"), tiny_npz(work / "tiny.npz")
    try:
        with harness.s3_service(work / "run") as (svc, _):
            cp = _cp([onnx_path, bin_path], svc.data_dir / "cp-ceiling")
            upload = upload_figures(svc, [onnx_path, bin_path])
            upload["cp_mb_s"] = round(upload["bytes"] / MB / cp["cp_s"], 1)
            with svc.client() as c:
                model_id = harness.upload_model(c, model_path)["id"]
                dataset_id = harness.upload_dataset(c, data_path)["id"]
            jobs_per_minute(svc, model_id, dataset_id, 1)  # warm: imports, the worker's input cache
            one = jobs_per_minute(svc, model_id, dataset_id, jobs)
            with extra_worker(svc):
                jobs_per_minute(svc, model_id, dataset_id, 2)  # the second worker warms up too
                two = jobs_per_minute(svc, model_id, dataset_id, jobs)
    finally:
        for f in (onnx_path, bin_path):
            f.unlink(missing_ok=True)
    batch = f"{jobs} small static jobs submitted at once, S3 storage (moto)"
    return {
        "upload_s3_mb_s": Measurement(
            what=f"Upload of a {upload['bytes'] / MB:,.0f} MB model (external data) into S3 (moto on loopback)",
            unit="MB/s",
            value=upload["upload_mb_s"],
            baseline=Baseline(what="`cp`", value=upload["cp_mb_s"]),
            ratio=round(upload["upload_mb_s"] / upload["cp_mb_s"], 3),
            details=upload,
        ),
        "jobs_per_minute_1": Measurement(
            what=f"{batch}: 1 worker process", unit="jobs/min", value=one["jobs_per_minute"], details=one
        ),
        "jobs_per_minute_2": Measurement(
            what=f"{batch}: 2 worker processes (2 cores: not a scaling target)",
            unit="jobs/min",
            value=two["jobs_per_minute"],
            baseline=Baseline(what="1 worker process", value=one["jobs_per_minute"]),
            ratio=round(two["jobs_per_minute"] / one["jobs_per_minute"], 2),
            details={**two, "cores": psutil.cpu_count()},
        ),
    }
