"""Wire shapes of jobs: the recipe, the evaluation settings, the job, its result and artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.contract.recipe import Recipe, parse_recipe, unchecked_recipe
from service.schemas import ErrorInfo, OrmModel

__all__ = ["Recipe"]


class EvaluationSettings(BaseModel):
    """How to measure. Latency runs of the two models are interleaved."""

    model_config = ConfigDict(extra="forbid")

    latency_runs: int = Field(50, ge=1, le=100_000)
    warmup_runs: int = Field(5, ge=0, le=10_000)
    threads: int | None = Field(None, ge=1, le=256, description="Default: the worker's cores.")
    batch_size: int = Field(1, ge=1, le=4096)


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
    evaluation: EvaluationSettings = Field(default_factory=lambda: EvaluationSettings())


class LatencyStats(BaseModel):
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float


class ModelMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    size_bytes: int
    latency_ms: LatencyStats | None = None
    throughput_per_s: float | None = None
    accuracy: float | None = None


class OutputFidelity(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    cosine: float | None = None
    sqnr_db: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    top1_agreement: float | None = None


class AccuracyComparison(BaseModel):
    model_config = ConfigDict(extra="allow")

    metric: str
    original: float
    quantized: float
    delta: float


class Comparison(BaseModel):
    model_config = ConfigDict(extra="allow")

    size_ratio: float
    speedup_p50: float | None = None
    outputs: list[OutputFidelity] = Field(default_factory=list)
    accuracy: AccuracyComparison | None = None


class AutoTrial(BaseModel):
    """One model mode auto measured: a whole-model candidate or a mixed-precision search step."""

    model_config = ConfigDict(extra="allow")

    name: str
    stage: Literal["candidate", "step"] = "candidate"
    parent: str | None = Field(None, description="Steps: the candidate the search started from.")
    recipe: dict[str, Any] = Field(default_factory=dict)
    p50_ms: float | None = None
    float_p50_ms: float | None = None
    speedup: float | None = None
    latency_runs: int = 0
    size_bytes: int | None = None
    metric: str | None = None
    fidelity: float | None = Field(None, description="The worst budgeted output's value of `metric`.")
    accuracy_drop: float | None = None
    within_budget: bool = False
    error: dict[str, Any] | None = None


class AutoSearch(BaseModel):
    """`result.quantization.auto`: what mode auto measured and why it chose what it chose."""

    model_config = ConfigDict(extra="allow")

    verdict: Literal["quantized", "keep_float"] | None = Field(
        None, description="Null only in results of searches made before verdicts existed."
    )
    headline: str = ""
    objective: Literal["latency", "size"] = "latency"
    chosen: str
    effective_recipe: dict[str, Any] | None = Field(
        None, description="A plain static/dynamic/... recipe that reproduces the artifact (null: the float model)."
    )
    fidelity: dict[str, Any] | None = None
    candidates: list[AutoTrial] = Field(default_factory=list)
    steps: list[AutoTrial] = Field(default_factory=list)
    search_seconds: float | None = None
    time_budget_exhausted: bool = False


class QuantizationFacts(BaseModel):
    """`result.quantization`: what the engine did (free-form facts, plus mode auto's typed search)."""

    model_config = ConfigDict(extra="allow")

    auto: AutoSearch | None = None


class JobResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    quantization: QuantizationFacts | None = None
    original: ModelMetrics
    quantized: ModelMetrics
    comparison: Comparison
    warnings: list[str] = Field(default_factory=list)
    timings_s: dict[str, float] = Field(default_factory=dict)
    peak_memory_bytes: int | None = None
    preprocessing_steps: list[str] = Field(default_factory=list)
    machine: dict[str, Any] = Field(default_factory=dict)


class JobOut(OrmModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: Literal[
        "queued",
        "validating",
        "preprocessing",
        "calibrating",
        "quantizing",
        "evaluating",
        "reporting",
        "done",
    ]
    progress: float = Field(ge=0, le=1)
    progress_note: str | None = Field(
        None, description='What the running job does now, e.g. mode auto\'s "candidate 2 of 6" or "search step 3".'
    )
    model_id: str
    calibration_dataset_id: str | None
    evaluation_dataset_id: str | None
    recipe: Recipe
    evaluation: EvaluationSettings
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorInfo | None
    result: JobResult | None

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


class ArtifactOut(OrmModel):
    name: str = Field(examples=["quantized.onnx"])
    size_bytes: int
    sha256: str
    media_type: str
    url: str
