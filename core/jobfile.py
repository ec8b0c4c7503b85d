"""The files between the worker and a job process: the job file (`job.json`) the worker writes and the
outcome (`outcome.json`) the job process writes back, and for a measurement on another worker class the
measure file and the measurement (`measure.json`, `measured.json`). Both sides read and write them here, typed, never
through json and string keys; the progress lines in between are `core.progress.ProgressLine`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import TypeAdapter

from core.errors import ErrorInfo
from core.evaluation import EvaluationSpec
from core.lifecycle import AttemptStatus
from core.model import TensorSpec
from core.placement import Placement
from core.recipe import Recipe
from core.result import JobResult, MeasuredOn

JOB_FILE = "job.json"
OUTCOME_FILE = "outcome.json"
MEASURE_FILE = "measure.json"
MEASURED_FILE = "measured.json"


@dataclass(frozen=True)
class Limits:
    """What the job process may use (see worker/sandbox.py); 0 leaves a limit as inherited."""

    memory_bytes: int = 0
    cpu_s: int = 0
    file_bytes: int = 0
    open_files: int = 0


@dataclass(frozen=True)
class DatasetSource:
    """A stored dataset file: `format` is npz, npy or images (`preprocess`: the image settings)."""

    path: Path
    format: str
    preprocess: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobFile:
    """Everything a job process needs, written by the worker into WORKDIR/job.json."""

    job_id: str
    model_path: Path
    inputs: tuple[TensorSpec, ...]
    recipe: Recipe
    evaluation: EvaluationSpec
    limits: Limits
    calibration: DatasetSource | None = None
    evaluation_data: DatasetSource | None = None
    reused_calibration: bool = False  # the evaluation data is the calibration data
    reference_model_path: Path | None = None  # mode compare: the float model to compare with
    # Mode auto: the pre-flight timings the worker keeps for this CPU and ONNX Runtime version, a read-only copy
    # among the inputs (`core.preflight_timings`); None: the pre-flight times every layer. What the job times
    # goes to WORKDIR/`preflight_timings.MEASURED_FILE`, for the worker to merge.
    preflight_timings: Path | None = None
    # The class and pool of the worker running it, which the result's machine records (None: the job process
    # takes them from its environment, `Placement.from_environ`).
    placement: Placement | None = None

    def write(self, workdir: Path) -> None:
        (workdir / JOB_FILE).write_bytes(_JOB.dump_json(self))

    @classmethod
    def read(cls, workdir: Path) -> Self:
        return _JOB.validate_json((workdir / JOB_FILE).read_bytes())  # type: ignore[return-value]


@dataclass(frozen=True)
class ArtifactItem:
    """A file the job process made, for the worker to store under `name`."""

    name: str
    path: Path
    media_type: str


@dataclass(frozen=True)
class ChildOutcome:
    """How an attempt ended. The job process writes succeeded (with result and artifacts) or failed
    (with error) into WORKDIR/outcome.json; the worker makes the other statuses itself."""

    status: AttemptStatus
    result: JobResult | None = None
    error: ErrorInfo | None = None
    artifacts: tuple[ArtifactItem, ...] = field(default_factory=tuple)

    def write(self, workdir: Path) -> None:
        """Written under a temporary name and renamed: the worker never reads half an outcome."""
        tmp = workdir / (OUTCOME_FILE + ".tmp")
        tmp.write_bytes(_OUTCOME.dump_json(self))
        os.replace(tmp, workdir / OUTCOME_FILE)

    @classmethod
    def read(cls, workdir: Path) -> Self:
        """Raises pydantic's ValidationError (a ValueError) on a file that is not an outcome."""
        return _OUTCOME.validate_json((workdir / OUTCOME_FILE).read_bytes())  # type: ignore[return-value]


@dataclass(frozen=True)
class MeasureFile:
    """A finished job's models to measure on another worker class (`python -m worker.measure_process WORKDIR`),
    written into WORKDIR/measure.json beside the job's own job file, which names its inputs. The measurement
    comes back as a `MeasuredOn` in WORKDIR/measured.json (`write_measured`, `read_measured`)."""

    target: str
    quantized_path: Path | None = None  # the job's stored artifact; None in mode compare (the model itself)

    def write(self, workdir: Path) -> None:
        (workdir / MEASURE_FILE).write_bytes(_MEASURE.dump_json(self))

    @classmethod
    def read(cls, workdir: Path) -> Self:
        return _MEASURE.validate_json((workdir / MEASURE_FILE).read_bytes())  # type: ignore[return-value]


def write_measured(workdir: Path, measured: MeasuredOn) -> None:
    """Written under a temporary name and renamed: the worker never reads half a measurement."""
    tmp = workdir / (MEASURED_FILE + ".tmp")
    tmp.write_text(measured.model_dump_json())
    os.replace(tmp, workdir / MEASURED_FILE)


def read_measured(workdir: Path) -> MeasuredOn:
    """Raises pydantic's ValidationError (a ValueError) on a file that is not a measurement."""
    return MeasuredOn.model_validate_json((workdir / MEASURED_FILE).read_bytes())


_JOB: TypeAdapter[JobFile] = TypeAdapter(JobFile)
_MEASURE: TypeAdapter[MeasureFile] = TypeAdapter(MeasureFile)
_OUTCOME: TypeAdapter[ChildOutcome] = TypeAdapter(ChildOutcome)
