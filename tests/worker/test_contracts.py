"""The typed files between the worker and a job process (worker/contracts.py): what one side
writes the other reads back field for field, a real job process speaks them, and they cannot
drift from the engine's specs or the API's JobResult."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from service.contract.progress import CandidateProgress, Note
from service.jobs.schemas import JobResult
from tests.onnx_models import matmul_mlp
from worker.contracts import (
    ArtifactItem,
    ChildOutcome,
    DataSource,
    EvaluationSettings,
    JobError,
    JobFile,
    JobResultData,
    Progress,
    TensorInfo,
)
from worker.engine.spec import DatasetSource, EvaluationSpec, TensorSpec
from worker.sandbox import job_limits

ROOT = Path(__file__).resolve().parents[2]


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _job_file(model: Path, data: Path | None, recipe: dict) -> JobFile:
    source = None if data is None else DataSource(str(data), "npz", None)
    return JobFile(
        job_id="job-1",
        model_path=str(model),
        inputs=[TensorInfo("x", "float32", ["batch", 16])],
        recipe=recipe,
        evaluation=EvaluationSettings(
            latency_runs=3, warmup_runs=1, threads=1, batch_size=1, max_samples=8, max_seconds=60.0
        ),
        limits=job_limits(memory_bytes=4 << 30, timeout_s=120, file_bytes=1 << 30, open_files=1024),
        calibration=source,
        evaluation_data=source,
        reused_calibration=source is not None,
    )


def test_the_job_file_reads_back_as_written(tmp_path: Path) -> None:
    job = _job_file(tmp_path / "m.onnx", tmp_path / "d.npz", {"mode": "static", "per_channel": True})
    job.write(tmp_path)
    assert JobFile.read(tmp_path) == job
    compare = dataclasses.replace(job, recipe={"mode": "compare"}, reference_model_path=str(tmp_path / "float.onnx"))
    compare.write(tmp_path)
    assert JobFile.read(tmp_path) == compare


def test_the_outcome_reads_back_as_written(tmp_path: Path) -> None:
    result = JobResultData(
        original={"size_bytes": 10},
        quantized={"size_bytes": 4},
        comparison={"size_ratio": 0.4, "outputs": []},
        warnings=["w"],
        timings_s={"total": 1.5},
        peak_memory_bytes=123,
        preprocessing_steps=["s"],
        machine={"cpu": "x"},
        evaluation={"fidelity_thresholds": {"cosine": 0.99}},
        quantization={"mode": "static"},
    )
    done = ChildOutcome("succeeded", result=result, artifacts=[ArtifactItem("a.onnx", "/tmp/a.onnx", "x/y")])
    done.write(tmp_path)
    assert ChildOutcome.read(tmp_path) == done
    failed = ChildOutcome("failed", error=JobError("invalid_recipe", "no", {"field": "mode"}))
    failed.write(tmp_path)
    assert ChildOutcome.read(tmp_path) == failed
    assert not (tmp_path / "outcome.json.tmp").exists()


def test_the_contracts_carry_every_field_of_the_engine_specs_and_of_job_result() -> None:
    """The job process builds the engine's specs from the job file field by field, and the API
    serves the result as JobResult: a field added on one side only fails here."""
    assert _names(EvaluationSettings) == _names(EvaluationSpec)
    assert _names(DataSource) == _names(DatasetSource)
    assert _names(TensorInfo) == _names(TensorSpec)
    assert set(JobResult.model_fields) <= _names(JobResultData)


def test_a_progress_line_carries_the_engines_note_whole() -> None:
    note = Note("candidate 2 of 5: static QDQ", CandidateProgress(2, 5, "static QDQ"))
    assert Progress.parse(Progress("quantizing", 0.5, note).line()) == Progress("quantizing", 0.5, note)
    assert Progress.parse(Progress("quantizing", 0.6).line()).note is None
    assert Progress.parse(Progress("quantizing", 0.7, Note("search step 3")).line()).note == Note("search step 3")


def test_a_job_process_speaks_the_contracts(tmp_path: Path) -> None:
    """A real `python -m worker.job_process`: progress lines parse, the outcome reads back, its
    result is a valid JobResult, its artifacts exist; a refused recipe ends as a typed error."""
    model = matmul_mlp(tmp_path / "mlp.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 1, 16), dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    ok = tmp_path / "ok"
    ok.mkdir()
    _job_file(model, data, {"mode": "dynamic"}).write(ok)
    done = subprocess.run(
        [sys.executable, "-m", "worker.job_process", str(ok)], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    stages = [Progress.parse(line).stage for line in done.stdout.splitlines()]
    assert stages[0] == "validating" and stages[-1] == "reporting"
    outcome = ChildOutcome.read(ok)
    assert outcome.status == "succeeded" and outcome.error is None and outcome.result is not None
    served = JobResult.model_validate(outcome.result.to_dict())
    assert served.quantized.size_bytes > 0 and served.comparison.outputs
    assert outcome.result.evaluation["fidelity_thresholds"]["cosine"] > 0
    assert {a.name for a in outcome.artifacts} == {"quantized.onnx", "report.json"}
    assert all(Path(a.path).is_file() for a in outcome.artifacts)

    refused = tmp_path / "refused"
    refused.mkdir()
    _job_file(model, None, {"mode": "static"}).write(refused)  # static without calibration data
    done = subprocess.run(
        [sys.executable, "-m", "worker.job_process", str(refused)], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    outcome = ChildOutcome.read(refused)
    assert outcome.status == "failed" and outcome.result is None and outcome.artifacts == []
    assert outcome.error is not None and outcome.error.code == "invalid_recipe"
    assert outcome.error.detail["field"] == "calibration_dataset_id"
