"""One job, start to end: the job file's inputs in, the typed result and the artifacts to store out."""

from __future__ import annotations

import resource
import time
from pathlib import Path

from core.jobfile import ArtifactItem, JobFile
from core.lifecycle import Stage
from core.preflight_timings import MEASURED_FILE
from core.recipe import Mode
from core.result import JobResult
from worker.engine.auto import auto_quantize
from worker.engine.compare import compare_models
from worker.engine.evaluate import Evaluation, evaluate
from worker.engine.measured_on import placed
from worker.engine.preprocess import runnable_original
from worker.engine.quantize import quantize
from worker.engine.results import QuantizationOutcome
from worker.engine.spec import NoteCallback, ProgressCallback, no_note, no_progress
from worker.engine.validate import validate_job

ONNX_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"


def peak_memory_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run_job(
    job: JobFile, workdir: Path, progress: ProgressCallback = no_progress, note: NoteCallback = no_note
) -> tuple[JobResult, list[ArtifactItem]]:
    """Validate, quantize (or search, or compare) and evaluate; the artifacts are the model's files, the
    engine's extra files and `report.json` (the result itself)."""
    started = time.perf_counter()
    recipe = job.recipe
    progress(Stage.VALIDATING, 0.0)
    model_path, declared = runnable_original(job.model_path, workdir / "original")
    validate_job(
        model_path,
        recipe,
        calibration=job.calibration,
        evaluation_data=job.evaluation_data,
        evaluation_batch_size=job.evaluation.batch_size,
    )
    outcome, measured = _run(job, model_path, workdir / "engine", progress, note, timings_out=workdir / MEASURED_FILE)
    progress(Stage.REPORTING, 0.0)
    machine = placed(measured.machine, job.placement)
    result = JobResult(
        original=measured.original,
        quantized=measured.quantized,
        comparison=measured.comparison,
        warnings=[*outcome.warnings, *measured.warnings],
        timings_s={**outcome.timings_s, **measured.timings_s, "total": round(time.perf_counter() - started, 3)},
        peak_memory_bytes=peak_memory_bytes(),
        preprocessing_steps=[*declared, *outcome.preprocessing_steps],
        machine=machine,
        evaluation=measured.facts,
        quantization=outcome.facts,
    )
    out = workdir / "artifacts"
    out.mkdir()
    artifacts = [ArtifactItem(path.name, path, ONNX_MEDIA_TYPE) for path in outcome.files]
    artifacts += [ArtifactItem(name, path, JSON_MEDIA_TYPE) for name, path in outcome.artifacts.items()]
    report_path = out / "report.json"
    report_path.write_text(result.model_dump_json(indent=2))
    artifacts.append(ArtifactItem("report.json", report_path, JSON_MEDIA_TYPE))
    progress(Stage.REPORTING, 1.0)
    return result, artifacts


def _run(
    job: JobFile,
    model_path: Path,
    workdir: Path,
    progress: ProgressCallback,
    note: NoteCallback,
    *,
    timings_out: Path | None = None,
) -> tuple[QuantizationOutcome, Evaluation]:
    recipe = job.recipe
    if recipe.mode == Mode.AUTO:
        return auto_quantize(
            model_path,
            recipe,
            workdir,
            job.evaluation,
            calibration=job.calibration,
            data=job.evaluation_data,
            inputs=job.inputs,
            reused_calibration=job.reused_calibration,
            progress=progress,
            note=note,
            preflight_timings=job.preflight_timings,
            preflight_out=timings_out,
        )
    if recipe.mode == Mode.COMPARE:
        progress(Stage.EVALUATING, 0.0)
        assert job.reference_model_path is not None, "the runner gives mode compare its reference"
        return compare_models(
            job.reference_model_path,
            model_path,
            recipe,
            job.evaluation,
            data=job.evaluation_data,
            inputs=job.inputs,
            progress=progress,
        )
    outcome = quantize(model_path, recipe, workdir, calibration=job.calibration, progress=progress)
    measured = evaluate(
        model_path,
        outcome.model_path,
        job.evaluation,
        data=job.evaluation_data,
        inputs=job.inputs,
        reused_calibration=job.reused_calibration,
        budget=recipe.fidelity,
        accuracy_tolerance=recipe.accuracy_tolerance,
        progress=progress,
    )
    return outcome, measured
