"""The typed files between the worker and a job process (core/jobfile.py, core/progress.py): what one side
writes the other reads back field for field, and a real job process speaks them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.errors import ErrorInfo
from core.evaluation import EvaluationSpec
from core.jobfile import ArtifactItem, ChildOutcome, DatasetSource, JobFile
from core.lifecycle import AttemptStatus
from core.model import TensorSpec
from core.progress import CandidateProgress, Note, ProgressLine
from core.recipe import Recipe
from core.result import Comparison, JobResult, ModelMetrics
from tests.onnx_models import matmul_mlp
from worker.sandbox import job_limits

ROOT = Path(__file__).resolve().parents[2]


def _job_file(model: Path, data: Path | None, recipe: Recipe) -> JobFile:
    source = None if data is None else DatasetSource(data, "npz", None)
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
        reused_calibration=source is not None,
    )


def test_the_job_file_reads_back_as_written(tmp_path: Path) -> None:
    job = _job_file(tmp_path / "m.onnx", tmp_path / "d.npz", Recipe(mode="static", per_channel=True))
    job.write(tmp_path)
    assert JobFile.read(tmp_path) == job
    compare = dataclasses.replace(
        job, recipe=Recipe(mode="compare", reference_model_id="f"), reference_model_path=tmp_path / "float.onnx"
    )
    compare.write(tmp_path)
    assert JobFile.read(tmp_path) == compare


def test_the_outcome_reads_back_as_written(tmp_path: Path) -> None:
    result = JobResult(
        original=ModelMetrics(size_bytes=10),
        quantized=ModelMetrics(size_bytes=4),
        comparison=Comparison(size_ratio=0.4),
        warnings=["w"],
        timings_s={"total": 1.5},
        peak_memory_bytes=123,
    )
    artifact = ArtifactItem("a.onnx", Path("/tmp/a.onnx"), "x/y")
    done = ChildOutcome(AttemptStatus.SUCCEEDED, result=result, artifacts=(artifact,))
    done.write(tmp_path)
    assert ChildOutcome.read(tmp_path) == done
    failed = ChildOutcome(AttemptStatus.FAILED, error=ErrorInfo("invalid_recipe", "no", {"field": "mode"}))
    failed.write(tmp_path)
    assert ChildOutcome.read(tmp_path) == failed
    assert not (tmp_path / "outcome.json.tmp").exists()


def test_a_progress_line_carries_the_engines_note_whole() -> None:
    note = Note("candidate 2 of 5: static QDQ", CandidateProgress(2, 5, "static QDQ"))
    line = ProgressLine("quantizing", 0.5, note)
    assert ProgressLine.parse(line.line()) == line
    assert ProgressLine.parse(ProgressLine("quantizing", 0.6).line()).note is None
    assert ProgressLine.parse(ProgressLine("quantizing", 0.7, Note("search step 3")).line()).note == Note(
        "search step 3"
    )


def test_a_job_process_speaks_the_job_file(tmp_path: Path) -> None:
    """A real `python -m worker.job_process`: progress lines parse, the outcome reads back with the typed
    result the engine built, its artifacts exist; a refused recipe ends as a typed error."""
    model = matmul_mlp(tmp_path / "mlp.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 1, 16), dtype=np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    ok = tmp_path / "ok"
    ok.mkdir()
    _job_file(model, data, Recipe(mode="dynamic")).write(ok)
    done = subprocess.run(
        [sys.executable, "-m", "worker.job_process", str(ok)], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    stages = [ProgressLine.parse(line).stage for line in done.stdout.splitlines()]
    assert stages[0] == "validating" and stages[-1] == "reporting"
    outcome = ChildOutcome.read(ok)
    assert outcome.status == "succeeded" and outcome.error is None and outcome.result is not None
    result = outcome.result
    assert result.quantized.size_bytes > 0 and result.comparison.outputs
    assert result.comparison.fidelity is not None and all(o.faithful is not None for o in result.comparison.outputs)
    assert {a.name for a in outcome.artifacts} == {"quantized.onnx", "report.json"}
    assert all(a.path.is_file() for a in outcome.artifacts)
    report = next(a.path for a in outcome.artifacts if a.name == "report.json")
    assert JobResult.model_validate_json(report.read_text()) == result

    refused = tmp_path / "refused"
    refused.mkdir()
    _job_file(model, None, Recipe(mode="static")).write(refused)  # static without calibration data
    done = subprocess.run(
        [sys.executable, "-m", "worker.job_process", str(refused)], capture_output=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    outcome = ChildOutcome.read(refused)
    assert outcome.status == "failed" and outcome.result is None and outcome.artifacts == ()
    assert outcome.error is not None and outcome.error.code == "invalid_recipe"
    assert outcome.error.detail["field"] == "calibration_dataset_id"
