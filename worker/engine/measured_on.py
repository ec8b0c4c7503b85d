"""Where a measurement was made, and the measurement a worker of one class makes of a finished job's stored
models for `result.measured_on` when the job's target lists several classes or pools."""

from __future__ import annotations

from pathlib import Path

from core.jobfile import JobFile, MeasureFile
from core.placement import Placement
from core.recipe import Mode
from core.result import Machine, MeasuredOn
from worker.engine.evaluate import evaluate
from worker.engine.preprocess import runnable_original


def placed(machine: Machine, placement: Placement | None) -> Machine:
    """The machine facts with the class and pool of the worker that measured on it."""
    if placement is None:
        return machine
    return machine.model_copy(update={"worker_class": placement.worker_class, "pool": placement.pool})


def measure_on(job: JobFile, measure: MeasureFile, workdir: Path) -> MeasuredOn:
    """The job's float and quantized models (mode compare: its reference and its model) evaluated side by side
    on this worker as the job's own evaluation was where it ran: the same settings, data and budget."""
    recipe = job.recipe
    model, _ = runnable_original(job.model_path, workdir / "original")
    if recipe.mode == Mode.COMPARE:
        assert job.reference_model_path is not None, "the runner gives mode compare its reference"
        original, quantized = job.reference_model_path, model
    else:
        assert measure.quantized_path is not None, "every other mode stores quantized.onnx"
        original, quantized = model, measure.quantized_path
    evaluation = evaluate(
        original,
        quantized,
        job.evaluation,
        data=job.evaluation_data,
        inputs=job.inputs,
        reused_calibration=job.reused_calibration,
        budget=recipe.fidelity,
        accuracy_tolerance=recipe.accuracy_tolerance,
    )
    return MeasuredOn.measured(
        measure.target,
        placed(evaluation.machine, job.placement),
        evaluation.original,
        evaluation.quantized,
        evaluation.comparison,
        objective=str(recipe.objective),
    )
