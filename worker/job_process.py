"""The child process that does a job's heavy work: `python -m worker.job_process WORKDIR`.

Reads WORKDIR/job.json, runs the engine under resource limits, prints progress lines on stdout
and writes WORKDIR/outcome.json (all three typed in worker/contracts.py). It never touches the
database."""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from worker.contracts import ArtifactItem, ChildOutcome, DataSource, JobError, JobFile, JobResultData, Progress
from worker.engine import (
    DatasetSource,
    EngineError,
    EvaluationSpec,
    Mode,
    QuantizationSpec,
    Stage,
    TensorSpec,
    evaluate,
    quantize,
)
from worker.engine.auto import auto_quantize
from worker.engine.compare import compare_models
from worker.engine.preprocess import runnable_original
from worker.engine.spec import Note
from worker.engine.validate import validate_job
from worker.sandbox import apply_limits, die_with_parent, exit_on_sigterm, limit_error

ONNX_MEDIA_TYPE = "application/octet-stream"


class Reporter:
    """Progress lines on stdout (worker.contracts.Progress): every progress call, and every note."""

    def __init__(self) -> None:
        self.stage = Stage.VALIDATING
        self.fraction = 0.0

    def __call__(self, stage: Stage, fraction: float) -> None:
        self.stage = stage
        self.fraction = round(float(fraction), 4)
        sys.stdout.write(Progress(str(stage), self.fraction).line())
        sys.stdout.flush()

    def note(self, note: Note) -> None:
        """What the engine does now (mode auto: "candidate 2 of 5: ..." with the candidate, "search step 3")."""
        sys.stdout.write(Progress(str(self.stage), self.fraction, note).line())
        sys.stdout.flush()


def _source(data: DataSource | None) -> DatasetSource | None:
    if data is None:
        return None
    return DatasetSource(path=Path(data.path), format=data.format, preprocess=data.preprocess)


def peak_memory_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(job: JobFile, workdir: Path, report: Reporter) -> ChildOutcome:
    started = time.perf_counter()
    spec = QuantizationSpec.from_mapping(job.recipe)
    evaluation = EvaluationSpec(**asdict(job.evaluation))
    model_path = Path(job.model_path)
    inputs = [TensorSpec(i.name, i.dtype, None if i.shape is None else tuple(i.shape)) for i in job.inputs]
    calibration = _source(job.calibration)
    eval_data = _source(job.evaluation_data)

    report(Stage.VALIDATING, 0.0)
    model_path, declared = runnable_original(model_path, workdir / "original")
    validate_job(
        model_path,
        spec,
        calibration=calibration,
        evaluation_data=eval_data,
        evaluation_batch_size=evaluation.batch_size,
    )
    reused = job.reused_calibration
    if spec.mode == Mode.AUTO:
        outcome, measured = auto_quantize(
            model_path,
            spec,
            workdir / "engine",
            evaluation,
            calibration=calibration,
            data=eval_data,
            inputs=inputs,
            reused_calibration=reused,
            progress=report,
            note=report.note,
        )
    elif spec.mode == Mode.COMPARE:
        report(Stage.EVALUATING, 0.0)
        assert job.reference_model_path is not None, "the runner gives mode compare its reference"
        outcome, measured = compare_models(
            Path(job.reference_model_path),
            model_path,
            spec,
            evaluation,
            data=eval_data,
            inputs=inputs,
            progress=report,
        )
    else:
        outcome = quantize(model_path, spec, workdir / "engine", calibration=calibration, progress=report)
        measured = evaluate(
            model_path,
            outcome.model_path,
            evaluation,
            data=eval_data,
            inputs=inputs,
            reused_calibration=reused,
            accuracy_tolerance=spec.accuracy_tolerance,
            progress=report,
        )
    report(Stage.REPORTING, 0.0)
    result = JobResultData(
        original=measured.original,
        quantized=measured.quantized,
        comparison=measured.comparison,
        warnings=[*outcome.warnings, *measured.warnings],
        timings_s={**outcome.timings_s, **measured.timings_s, "total": round(time.perf_counter() - started, 3)},
        peak_memory_bytes=peak_memory_bytes(),
        preprocessing_steps=[*declared, *outcome.preprocessing_steps],
        machine=measured.machine,
        evaluation=measured.evaluation,
        quantization={"calibration_samples": outcome.calibration_samples, **outcome.details},
    )

    out = workdir / "artifacts"
    out.mkdir()
    artifacts = [ArtifactItem(path.name, str(path), ONNX_MEDIA_TYPE) for path in outcome.files]
    artifacts += [ArtifactItem(name, str(path), "application/json") for name, path in outcome.artifacts.items()]
    report_path = out / "report.json"
    report_path.write_text(json.dumps(result.to_dict(), indent=2))
    artifacts.append(ArtifactItem("report.json", str(report_path), "application/json"))
    report(Stage.REPORTING, 1.0)
    return ChildOutcome("succeeded", result=result, artifacts=artifacts)


def main(workdir: Path) -> int:
    exit_on_sigterm()
    job = JobFile.read(workdir)
    die_with_parent()
    apply_limits(job.limits)
    report = Reporter()
    try:
        outcome = run(job, workdir, report)
    except EngineError as exc:
        # ONNX Runtime's allocation failures under RLIMIT_AS arrive wrapped in an EngineError.
        error = limit_error(exc, job.limits, str(report.stage)) or JobError(exc.code, exc.message, exc.detail)
        outcome = ChildOutcome("failed", error=error)
    except Exception as exc:  # MemoryError included
        traceback.print_exc()  # to the worker's log, never to the user
        code = "evaluation_failed" if report.stage == Stage.EVALUATING else "quantization_failed"
        error = limit_error(exc, job.limits, str(report.stage)) or JobError(
            code, f"{type(exc).__name__} during {report.stage}: {str(exc)[:1000]}", {"stage": str(report.stage)}
        )
        outcome = ChildOutcome("failed", error=error)
    outcome.write(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
