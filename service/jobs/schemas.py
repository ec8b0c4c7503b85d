"""Wire shapes of jobs: the recipe, the evaluation settings, the job, its result and artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from service.jobs.results import JobResult
from service.schemas import ErrorInfo, OrmModel

Mode = Literal["static", "dynamic", "weight_only", "fp16", "auto"]
SIXTEEN_BIT = ("uint16", "int16")
FOUR_BIT = ("int4", "uint4")


class Recipe(BaseModel):
    """How to quantize. Defaults give static MinMax QDQ, uint8 activations, int8 weights."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"mode": "static", "calibration_method": "minmax", "per_channel": True}]},
    )

    mode: Mode = "static"
    format: Literal["qdq", "qoperator"] = Field("qdq", description="Static only.")
    activation_type: Literal["uint8", "int8", "uint16", "int16"] = "uint8"
    weight_type: Literal["int8", "uint8", "int16", "uint16", "int4", "uint4"] | None = Field(
        None, description="Default int8; int4 for `weight_only`."
    )
    calibration_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    percentile: float = Field(99.999, gt=0, le=100, description="For `percentile` calibration.")
    per_channel: bool = False
    reduce_range: bool = False
    symmetric_activations: bool = False
    symmetric_weights: bool | None = Field(None, description="Default: symmetric for signed weight types.")
    op_types_to_quantize: list[str] | None = Field(None, examples=[["Conv", "MatMul", "Gemm"]])
    nodes_to_exclude: list[str] | None = None
    calibration_batch_size: int = Field(1, ge=1, le=4096)
    max_calibration_samples: int | None = Field(None, ge=1)
    block_size: int = Field(128, ge=16, le=4096, description="`weight_only`: weights per quantization block.")
    accuracy_tolerance: float = Field(
        0.01, ge=0, le=1, description="Largest allowed top-1 drop as a fraction (0.01 = one point)."
    )

    @model_validator(mode="after")
    def _rules(self) -> Recipe:
        """Combinations ONNX Runtime cannot honour, refused before anything is queued."""
        if self.weight_type is None:
            self.weight_type = "int4" if self.mode == "weight_only" else "int8"
        if self.mode == "weight_only" and self.weight_type not in FOUR_BIT:
            raise ValueError("weight_only quantization produces MatMulNBits and needs weight_type int4 or uint4")
        if self.mode != "weight_only" and self.weight_type in FOUR_BIT:
            raise ValueError(f"weight_type {self.weight_type} is only available with mode weight_only")
        if (
            self.format == "qoperator"
            and self.mode == "static"
            and (self.activation_type in SIXTEEN_BIT or self.weight_type in SIXTEEN_BIT)
        ):
            raise ValueError("16-bit activation or weight types need format qdq; qoperator supports 8-bit only")
        if self.mode == "dynamic" and self.weight_type not in ("int8", "uint8"):
            raise ValueError("dynamic quantization supports weight_type int8 or uint8 only")
        if self.mode == "weight_only" and self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128, ...)")
        return self


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
    recipe: Recipe = Field(default_factory=lambda: Recipe())
    evaluation: EvaluationSettings = Field(default_factory=lambda: EvaluationSettings())


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
}


JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobStage = Literal[
    "queued",
    "validating",
    "preprocessing",
    "calibrating",
    "quantizing",
    "evaluating",
    "reporting",
    "done",
]


class CandidateProgress(BaseModel):
    """Mode auto: the candidate recipe being tried now, `index` of `total` (from 1)."""

    index: int = Field(ge=1, examples=[2])
    total: int = Field(ge=1, examples=[5])
    name: str = Field(examples=["static QDQ, per-channel, Percentile"])


class JobEvent(BaseModel):
    """The `data` of a `status` or `progress` event on `GET /v1/jobs/{id}/events`."""

    job_id: str
    status: JobStatusName
    stage: JobStage
    progress: float = Field(ge=0, le=1)
    attempts: int
    candidate: CandidateProgress | None = None


class JobOut(OrmModel):
    id: str
    status: JobStatusName
    stage: JobStage
    progress: float = Field(ge=0, le=1)
    progress_detail: dict[str, Any] | None = Field(None, exclude=True)
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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def candidate(self) -> CandidateProgress | None:
        """Mode auto, while it tries candidate recipes: which one, of how many."""
        found = (self.progress_detail or {}).get("candidate")
        return CandidateProgress.model_validate(found) if isinstance(found, dict) else None


class ArtifactOut(OrmModel):
    name: str = Field(examples=["quantized.onnx"])
    size_bytes: int
    sha256: str
    media_type: str
    url: str
