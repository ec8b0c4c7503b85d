"""Where a figure was measured, in real job processes: `python -m worker.job_process` records the class and
pool its worker handed it (the one variable worker/sandbox.py lets through), and `python -m
worker.measure_process` measures a finished job's stored models on another class into a typed `MeasuredOn`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.evaluation import EvaluationSpec
from core.jobfile import ChildOutcome, DatasetSource, JobFile, MeasureFile, read_measured
from core.model import TensorSpec
from core.placement import PLACEMENT_VARIABLE, Placement
from core.recipe import Recipe
from tests.onnx_models import matmul_mlp
from worker.sandbox import child_env, job_limits

ROOT = Path(__file__).resolve().parents[2]


def _job_file(model: Path, data: Path, recipe: Recipe) -> JobFile:
    source = DatasetSource(data, "npz", None)
    return JobFile(
        job_id="job-1",
        model_path=model,
        inputs=(TensorSpec("x", "float32", ("batch", 16)),),
        recipe=recipe,
        evaluation=EvaluationSpec(
            latency_runs=3, warmup_runs=1, threads=1, batch_size=1, max_samples=8, max_seconds=60
        ),
        limits=job_limits(memory_bytes=4 << 30, timeout_s=120, file_bytes=1 << 30, open_files=1024),
        calibration=source,
        evaluation_data=source,
    )


def _run(module: str, workdir: Path, placement: Placement) -> None:
    # The environment a worker gives its job processes, from a worker environment that names its placement.
    env = child_env(workdir, {**os.environ, **placement.environ(), "QAAS_DATABASE_URL": "postgresql://secret"})
    assert env[PLACEMENT_VARIABLE] == placement.environ()[PLACEMENT_VARIABLE] and "QAAS_DATABASE_URL" not in env
    done = subprocess.run([sys.executable, "-m", module, str(workdir)], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_a_job_records_its_workers_class_and_another_class_measures_its_stored_models(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 1, 16), dtype=np.float32))
    job = _job_file(model, data, Recipe(mode="dynamic"))

    ran = tmp_path / "ran"
    ran.mkdir()
    job.write(ran)
    _run("worker.job_process", ran, Placement("x86_64-amx", "edge"))
    outcome = ChildOutcome.read(ran)
    assert outcome.result is not None, outcome.error
    assert (outcome.result.machine.worker_class, outcome.result.machine.pool) == ("x86_64-amx", "edge")
    quantized = next(a.path for a in outcome.artifacts if a.name == "quantized.onnx")

    there = tmp_path / "there"
    there.mkdir()
    job.write(there)
    MeasureFile("x86_64-avx2", quantized).write(there)
    _run("worker.measure_process", there, Placement("x86_64-avx2"))
    measured = read_measured(there)
    assert (measured.target, measured.status, measured.worker_class, measured.pool) == (
        "x86_64-avx2",
        "measured",
        "x86_64-avx2",
        None,
    )
    assert measured.machine is not None and measured.machine.worker_class == "x86_64-avx2"
    assert measured.original is not None and measured.quantized is not None
    assert measured.original.latency_ms is not None and measured.quantized.latency_ms is not None
    assert measured.speedup_p50 == measured.original.latency_ms.p50 / measured.quantized.latency_ms.p50
    assert measured.within_budget is True and measured.chosen in ("quantized", "float")
    assert measured.quantized.size_bytes == quantized.stat().st_size


def test_a_measurement_that_cannot_be_made_comes_back_failed_with_the_reason(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 1, 16), dtype=np.float32))
    garbage = tmp_path / "quantized.onnx"
    garbage.write_bytes(b"not a model")
    _job_file(model, data, Recipe(mode="dynamic")).write(tmp_path)
    MeasureFile("edge", garbage).write(tmp_path)
    _run("worker.measure_process", tmp_path, Placement("x86_64-avx2", "edge"))
    measured = read_measured(tmp_path)
    assert (measured.target, measured.status, measured.original) == ("edge", "failed", None)
    assert measured.error is not None and measured.error.message
