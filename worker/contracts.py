"""The typed files and lines between the worker and a job process: the job file (`job.json`) the
worker writes, the progress lines the job process prints, and the outcome (`outcome.json`) it
writes back. Both sides read and write them here, never through json and string keys.

Plain dataclasses rather than pydantic: the job process imports this module before anything
else, and every import adds to each job's start-up time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, cast, get_args

from service.contract.progress import Note

JOB_FILE = "job.json"
OUTCOME_FILE = "outcome.json"

# succeeded/failed come from the job process; the worker decides the others itself.
Status = Literal["succeeded", "failed", "cancelled", "abandoned", "handed_back"]


@dataclass(frozen=True)
class Limits:
    """What the job process may use (see worker/sandbox.py); 0 leaves a limit as inherited."""

    memory_bytes: int = 0
    cpu_s: int = 0
    file_bytes: int = 0
    open_files: int = 0


@dataclass(frozen=True)
class DataSource:
    """A stored dataset file: `format` is npz, npy or images (`preprocess`: the image settings)."""

    path: str
    format: str
    preprocess: dict[str, Any] | None = None


@dataclass(frozen=True)
class TensorInfo:
    """A model input as stored at upload (None as shape: the model declares none)."""

    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclass(frozen=True)
class EvaluationSettings:
    """The job's evaluation settings with the operator's caps already applied."""

    latency_runs: int
    warmup_runs: int
    threads: int | None
    batch_size: int
    max_samples: int | None
    max_seconds: float


@dataclass(frozen=True)
class JobFile:
    """Everything a job process needs, written by the worker into WORKDIR/job.json."""

    job_id: str
    model_path: str
    inputs: list[TensorInfo]
    recipe: dict[str, Any]
    evaluation: EvaluationSettings
    limits: Limits
    calibration: DataSource | None = None
    evaluation_data: DataSource | None = None
    reused_calibration: bool = False  # the evaluation data is the calibration data
    reference_model_path: str | None = None  # mode compare: the float model to compare with

    def write(self, workdir: Path) -> None:
        (workdir / JOB_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, workdir: Path) -> Self:
        data = json.loads((workdir / JOB_FILE).read_text())

        def source(value: dict[str, Any] | None) -> DataSource | None:
            return None if value is None else DataSource(**value)

        return cls(
            job_id=data["job_id"],
            model_path=data["model_path"],
            inputs=[TensorInfo(**i) for i in data["inputs"]],
            recipe=data["recipe"],
            evaluation=EvaluationSettings(**data["evaluation"]),
            limits=Limits(**data["limits"]),
            calibration=source(data["calibration"]),
            evaluation_data=source(data["evaluation_data"]),
            reused_calibration=data["reused_calibration"],
            reference_model_path=data.get("reference_model_path"),
        )


@dataclass(frozen=True)
class Progress:
    """One progress line on the job process's stdout: a stage and the fraction of it done, and on the
    lines where the engine says what it does now, its note (text and, in mode auto, the candidate;
    see service/contract/progress.py). A line without a note leaves the last one standing."""

    stage: str
    fraction: float
    note: Note | None = None

    def line(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def parse(cls, line: bytes | str) -> Self:
        """Raises ValueError (json's errors included), KeyError or TypeError on a line that is not one."""
        data = json.loads(line)
        return cls(stage=str(data["stage"]), fraction=float(data["fraction"]), note=Note.from_dict(data.get("note")))


@dataclass(frozen=True)
class JobError:
    """The contract's `{code, message, detail}` error of a job."""

    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(code=data["code"], message=data["message"], detail=dict(data.get("detail") or {}))


@dataclass(frozen=True)
class ArtifactItem:
    """A file the job process made, for the worker to store under `name`."""

    name: str
    path: str
    media_type: str


@dataclass
class JobResultData:
    """The job's result as stored and served: the keys of the contract's JobResult
    (service/jobs/schemas.py) plus `evaluation` (how it was measured, the thresholds used) and
    `quantization` (what the quantizer did). The nested values are the engine's outcomes."""

    original: dict[str, Any]
    quantized: dict[str, Any]
    comparison: dict[str, Any]
    warnings: list[str]
    timings_s: dict[str, float]
    peak_memory_bytes: int
    preprocessing_steps: list[str]
    machine: dict[str, Any]
    evaluation: dict[str, Any]
    quantization: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def empty(cls) -> Self:
        """A result with nothing measured (for tests and scripted job processes)."""
        return cls({}, {}, {}, [], {}, 0, [], {}, {}, {})


@dataclass(frozen=True)
class ChildOutcome:
    """How an attempt ended. The job process writes succeeded (with result and artifacts) or failed
    (with error) into WORKDIR/outcome.json; the worker makes the other statuses itself."""

    status: Status
    result: JobResultData | None = None
    error: JobError | None = None
    artifacts: list[ArtifactItem] = field(default_factory=list)

    def write(self, workdir: Path) -> None:
        """Written under a temporary name and renamed: the worker never reads half an outcome."""
        tmp = workdir / (OUTCOME_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, workdir / OUTCOME_FILE)

    @classmethod
    def read(cls, workdir: Path) -> Self:
        data = json.loads((workdir / OUTCOME_FILE).read_text())
        if data["status"] not in get_args(Status):
            raise ValueError(f"unknown outcome status {data['status']!r}")
        return cls(
            status=cast(Status, data["status"]),
            result=None if data.get("result") is None else JobResultData(**data["result"]),
            error=None if data.get("error") is None else JobError.from_dict(data["error"]),
            artifacts=[ArtifactItem(**a) for a in data.get("artifacts") or []],
        )
