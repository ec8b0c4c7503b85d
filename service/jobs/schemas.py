"""Wire shapes of jobs: the recipe, the evaluation settings, the job, its result and artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    computed_field,
    field_validator,
)

from core.evaluation import EvaluationSettings
from core.lifecycle import JobStatus, Stage
from core.placement import ANY, parse_target
from core.progress import CandidateProgress, candidate_of
from core.recipe import Recipe, parse_recipe, unchecked_recipe
from core.result import JobResult, upgrade_stored
from service.schemas import ErrorInfo, OrmModel

__all__ = ["CandidateProgress", "JobResult", "Recipe"]


def _checked_target(value: str | list[str]) -> str | list[str]:
    parse_target(value)  # TargetError (a ValueError): 422 invalid_target
    return value


# "any", one class or pool, or a list of them, kept as given (`JobCreate.target_names` reads it).
Target = Annotated[str | list[str], AfterValidator(_checked_target)]


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "3f0e6a52-5a0c-4a9e-9b0e-1f2d3c4b5a69",
                    "calibration_dataset_id": "9a8b7c6d-1111-2222-3333-444455556666",
                    "recipe": {"mode": "static", "calibration_method": "minmax", "per_channel": True},
                    "evaluation": {"latency_runs": 50, "warmup_runs": 5},
                }
            ]
        },
    )

    model_id: str
    calibration_dataset_id: str | None = Field(None, description="Required for static quantization.")
    evaluation_dataset_id: str | None = Field(None, description="Defaults to the calibration dataset.")
    recipe: Recipe = Field(default_factory=Recipe)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    target: Target = Field(
        ANY,
        description='Where the job runs: `"any"` worker, a worker class or pool with a live worker (GET '
        "/v1/targets), or a list of them: the job runs on the first, and its float and quantized models are "
        "then measured on each of the others too, side by side in `result.measured_on`.",
        examples=[ANY, "x86_64-avx512vnni", ["x86_64-avx2", "x86_64-avx512vnni"]],
    )

    @property
    def target_names(self) -> tuple[str, ...]:
        """The classes and pools `target` lists (none: any worker)."""
        return parse_target(self.target)


_IDS = {"model_id": "<id from POST /v1/models>", "calibration_dataset_id": "<id from POST /v1/datasets>"}
JOB_EXAMPLES: dict[str, Any] = {
    "static": {
        "summary": "Static int8 (QDQ, per-channel MinMax): needs calibration data",
        "value": {
            **_IDS,
            "recipe": {"mode": "static", "calibration_method": "minmax", "per_channel": True},
            "evaluation": {"latency_runs": 50, "warmup_runs": 5},
        },
    },
    "auto": {
        "summary": "Auto: try several recipes, keep the fastest within 1 point of top-1",
        "value": {**_IDS, "recipe": {"mode": "auto", "accuracy_tolerance": 0.01}},
    },
    "transformer": {
        "summary": "Static on MatMul/Gemm only, Percentile calibration (transformers)",
        "value": {
            **_IDS,
            "recipe": {
                "mode": "static",
                "calibration_method": "percentile",
                "percentile": 99.99,
                "per_channel": True,
                "op_types_to_quantize": ["MatMul", "Gemm"],
            },
        },
    },
    "dynamic": {
        "summary": "Dynamic int8: no data needed",
        "value": {"model_id": _IDS["model_id"], "recipe": {"mode": "dynamic"}},
    },
    "weight_only": {
        "summary": "Weight-only int4 (MatMulNBits) for large MatMul models",
        "value": {"model_id": _IDS["model_id"], "recipe": {"mode": "weight_only", "block_size": 128}},
    },
    "fp16": {"summary": "Float16: half the size", "value": {"model_id": _IDS["model_id"], "recipe": {"mode": "fp16"}}},
    "targets": {
        "summary": "Static int8, measured on two worker classes side by side (see GET /v1/targets)",
        "value": {
            **_IDS,
            "recipe": {"mode": "static", "per_channel": True},
            "target": ["x86_64-avx2", "x86_64-avx512vnni"],
        },
    },
}


JobStatusName = JobStatus
JobStage = Stage


def _as_stored(value: Any) -> Any:
    """A stored result as this version serves it: the JSON the worker stored from a JobResult (results of
    older versions given their verdicts by `upgrade_stored`), never validated again on a read."""
    if isinstance(value, JobResult):
        return value.model_dump(mode="json")
    return upgrade_stored(value) if isinstance(value, dict) else value


# Typed as JobResult in /openapi.json; served as stored: polling a job costs no validation of its result.
StoredResult = Annotated[
    SerializeAsAny[JobResult] | None, PlainValidator(_as_stored, json_schema_input_type=JobResult | None)
]


class JobEvent(BaseModel):
    """The `data` of a `status` or `progress` event on `GET /v1/jobs/{id}/events`."""

    job_id: str
    status: JobStatusName
    stage: JobStage
    progress: float = Field(ge=0, le=1)
    attempts: int
    progress_note: str | None = Field(None, description="What the job does now, as `Job.progress_note`.")
    candidate: CandidateProgress | None = Field(None, description="Mode auto's candidate k of n, as `Job.candidate`.")


class JobOut(OrmModel):
    id: str
    status: JobStatusName
    stage: JobStage
    progress: float = Field(ge=0, le=1)
    progress_note: str | None = Field(
        None,
        description='What the running job does now, e.g. mode auto\'s "candidate 2 of 6" or "search step 3"; '
        "for a queued job put back in line after an outage (object storage unreachable), why it waits.",
    )
    progress_detail: dict[str, Any] | None = Field(None, exclude=True)
    model_id: str
    calibration_dataset_id: str | None
    evaluation_dataset_id: str | None
    recipe: Recipe
    evaluation: EvaluationSettings
    target: str | list[str] = Field(
        ANY, description="Where the job runs, as it was asked: `any`, a class or pool, or a list of them."
    )
    measurements_pending: bool = Field(
        False,
        description="A succeeded job whose `target` lists several classes or pools: true until its measurements "
        "on the others are all in `result.measured_on` (each is filled in as it arrives).",
    )
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorInfo | None
    result: StoredResult = Field(
        description="Once succeeded. A result stored by another version of QaaS in a shape this one does not "
        "know is served as it was stored."
    )

    @field_validator("recipe", mode="before")
    @classmethod
    def _stored_recipe(cls, value: Any) -> Any:
        """A recipe stored before a rule existed is shown as it was stored, not refused."""
        if isinstance(value, dict):
            try:
                return parse_recipe(value)
            except (ValueError, ValidationError):
                return unchecked_recipe(value)
        return value

    @field_validator("target", mode="before")
    @classmethod
    def _any_when_unset(cls, value: Any) -> Any:
        return ANY if value is None else value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def candidate(self) -> CandidateProgress | None:
        """Mode auto, while it tries its whole-model candidates: which one, of how many (`progress_note`
        says the same in words)."""
        return candidate_of(self.progress_detail)


class ArtifactOut(OrmModel):
    name: str = Field(examples=["quantized.onnx"])
    size_bytes: int
    sha256: str
    media_type: str
    url: str
