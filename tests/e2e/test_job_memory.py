"""The job process's peak memory does not grow with the number of calibration samples.

Measured as the operating system counts it: `result.peak_memory_bytes` is the job process's own
`ru_maxrss`, which sees ONNX Runtime's native allocations (tracemalloc, in the engine's unit test,
sees only Python's). The benchmark (`make bench`) keeps the full-size figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import Deployment, upload, wait_for_job
from tests.service.helpers import npz_bytes
from tests.worker.engine.pitfall_models import wide_intermediates

pytestmark = pytest.mark.e2e

CHANNELS, SIZE = 64, 48
# Each sample's intermediate tensors (two Conv and two Relu outputs) as float32.
PER_SAMPLE_BYTES = 4 * CHANNELS * SIZE * SIZE * 4
FEW, MANY = 16, 128


def test_job_peak_rss_does_not_grow_with_calibration_samples(embedded: Deployment, tmp_path: Path) -> None:
    """Plain `quantize_static` with Percentile keeps every sample's intermediates until the end:
    here (MANY - FEW) x PER_SAMPLE_BYTES more at MANY samples than at FEW. Fed in chunks, the job's
    peak stays where it was. Evaluation runs on the same two samples in both jobs,
    so only calibration differs."""
    model = wide_intermediates(tmp_path / "wide.onnx", channels=CHANNELS, size=SIZE)
    rng = np.random.default_rng(0)
    peaks = {}
    with embedded.client() as http:
        model_id = upload(http, "/v1/models", "wide.onnx", model.read_bytes())
        eval_id = upload(
            http, "/v1/datasets", "eval.npz", npz_bytes(input=rng.random((2, 1, 3, SIZE, SIZE), np.float32))
        )
        for n in (FEW, MANY):
            data = npz_bytes(input=rng.random((n, 1, 3, SIZE, SIZE), dtype=np.float32))
            created = http.post(
                "/v1/jobs",
                json={
                    "model_id": model_id,
                    "calibration_dataset_id": upload(http, "/v1/datasets", f"calib{n}.npz", data),
                    "evaluation_dataset_id": eval_id,
                    "recipe": {"mode": "static", "calibration_method": "percentile", "per_channel": True},
                    "evaluation": {"latency_runs": 2, "warmup_runs": 1},
                },
            )
            assert created.status_code == 202, created.text
            job, _ = wait_for_job(http, created.json()["id"])
            assert job["status"] == "succeeded", (job["error"], embedded.log_tail())
            assert job["result"]["quantization"]["calibration_samples"] == n
            peaks[n] = job["result"]["peak_memory_bytes"]
    growth = peaks[MANY] - peaks[FEW]
    holding_everything = (MANY - FEW) * PER_SAMPLE_BYTES
    assert growth < holding_everything / 8, (peaks, f"{growth / 2**20:.1f} MiB more at {MANY} samples")
