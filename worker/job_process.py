"""The child process that does a job's heavy work: `python -m worker.job_process WORKDIR`.

Reads WORKDIR/job.json, runs the engine under resource limits, prints progress as JSON lines on
stdout and writes WORKDIR/outcome.json. It never touches the database."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

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
from worker.engine.spec import CandidateProgress
from worker.sandbox import apply_limits, die_with_parent, limit_error

ONNX_MEDIA_TYPE = "application/octet-stream"


class Reporter:
    """Progress as JSON lines on stdout: `{"stage", "fraction", "detail"}`; `detail` names auto's
    candidate (`{"candidate": {"index", "total", "name"}}`) while one is being tried, else null."""

    def __init__(self) -> None:
        self.stage = Stage.VALIDATING
        self.fraction = 0.0
        self.detail: dict[str, Any] | None = None

    def __call__(self, stage: Stage, fraction: float) -> None:
        self.stage = stage
        self.fraction = round(float(fraction), 4)
        line = {"stage": str(stage), "fraction": self.fraction, "detail": self.detail}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def candidate(self, candidate: CandidateProgress | None) -> None:
        self.detail = (
            None
            if candidate is None
            else {"candidate": {"index": candidate.index, "total": candidate.total, "name": candidate.name}}
        )
        self(self.stage, self.fraction)


def _source(data: dict[str, Any] | None) -> DatasetSource | None:
    if data is None:
        return None
    return DatasetSource(path=Path(data["path"]), format=data["format"], preprocess=data.get("preprocess"))


def peak_memory_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(job: dict[str, Any], workdir: Path, report: Reporter) -> dict[str, Any]:
    started = time.perf_counter()
    spec = QuantizationSpec.from_mapping(job["recipe"])
    evaluation = EvaluationSpec.from_mapping(job["evaluation"])
    model_path = Path(job["model_path"])
    inputs = [TensorSpec.from_mapping(i) for i in job["inputs"]]
    calibration = _source(job.get("calibration"))
    eval_data = _source(job.get("evaluation_data"))

    report(Stage.VALIDATING, 0.0)
    reused = bool(job.get("reused_calibration"))
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
            on_candidate=report.candidate,
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
    result = measured.to_dict()
    result["warnings"] = [*outcome.warnings, *measured.warnings]
    result["preprocessing_steps"] = outcome.preprocessing_steps
    result["timings_s"] = {
        **outcome.timings_s,
        **measured.timings_s,
        "total": round(time.perf_counter() - started, 3),
    }
    result["quantization"] = {"calibration_samples": outcome.calibration_samples, **outcome.details}
    result["peak_memory_bytes"] = peak_memory_bytes()

    out = workdir / "artifacts"
    out.mkdir()
    artifacts = []
    for path in outcome.files:
        artifacts.append({"name": path.name, "path": str(path), "media_type": ONNX_MEDIA_TYPE})
    report_path = out / "report.json"
    report_path.write_text(json.dumps(result, indent=2))
    artifacts.append({"name": "report.json", "path": str(report_path), "media_type": "application/json"})
    report(Stage.REPORTING, 1.0)
    return {"status": "succeeded", "result": result, "artifacts": artifacts}


def main(workdir: Path) -> int:
    job = json.loads((workdir / "job.json").read_text())
    die_with_parent()
    apply_limits(job.get("limits", {}))
    report = Reporter()
    try:
        outcome = run(job, workdir, report)
    except EngineError as exc:
        # ONNX Runtime's allocation failures under RLIMIT_AS arrive wrapped in an EngineError.
        outcome = {
            "status": "failed",
            "error": limit_error(exc, job.get("limits", {}), str(report.stage)) or exc.to_dict(),
        }
    except Exception as exc:  # MemoryError included
        traceback.print_exc()  # to the worker's log, never to the user
        code = "evaluation_failed" if report.stage == Stage.EVALUATING else "quantization_failed"
        limited = limit_error(exc, job.get("limits", {}), str(report.stage))
        outcome = {
            "status": "failed",
            "error": limited
            or {
                "code": code,
                "message": f"{type(exc).__name__} during {report.stage}: {str(exc)[:1000]}",
                "detail": {"stage": str(report.stage)},
            },
        }
    tmp = workdir / "outcome.json.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, workdir / "outcome.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
