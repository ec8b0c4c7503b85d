"""Wire shape of a job's result (`Job.result`, `GET /v1/jobs/{id}/report`), typed field by field so
the OpenAPI document says what a client gets. Every model allows extra keys: the engine may add
facts before this file names them, and a client must not break on them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class LatencyStats(_Open):
    """Milliseconds per run, over the measured runs (warm-up runs discarded)."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float


class ModelMetrics(_Open):
    size_bytes: int = Field(description="On disk, external data included.")
    latency_ms: LatencyStats | None = None
    throughput_per_s: float | None = Field(None, description="Samples per second at `batch_size`.")
    accuracy: float | None = Field(None, description="Top-1 on the labelled evaluation data; null without labels.")
    top5_accuracy: float | None = None
    session_create_ms: float | None = Field(None, description="Time to load the model into ONNX Runtime.")
    batch_size: int | None = None
    runs: int | None = Field(None, description="Latency runs measured.")


class OutputFidelity(_Open):
    """How close the quantized model's output is to the float model's, on the same inputs."""

    name: str = Field(examples=["logits"])
    cosine: float | None = Field(None, description="Cosine similarity, 1.0 = same direction.", examples=[0.9991])
    sqnr_db: float | None = Field(None, description="Signal-to-quantization-noise ratio in dB.", examples=[31.4])
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    top1_agreement: float | None = Field(
        None, description="Share of samples whose argmax agrees (class-score outputs only)."
    )


class AccuracyComparison(_Open):
    metric: str = Field(examples=["top1"])
    original: float | None
    quantized: float | None
    delta: float | None = Field(description="quantized - original; negative is a loss.")
    top5_original: float | None = None
    top5_quantized: float | None = None
    samples: int | None = None
    output: str | None = Field(None, description="The output read as class scores.")


class Comparison(_Open):
    size_ratio: float | None = Field(None, description="quantized size / original size.", examples=[0.27])
    speedup_p50: float | None = Field(None, description="original p50 / quantized p50; above 1 is faster.")
    outputs: list[OutputFidelity] = Field(default_factory=list, description="Fidelity per model output.")
    accuracy: AccuracyComparison | None = Field(None, description="With a labelled evaluation dataset only.")


class Machine(_Open):
    """Where the latencies were measured: the facts that decide whether int8 is faster there."""

    cpu_model: str | None = None
    architecture: str | None = None
    logical_cores: int | None = None
    physical_cores: int | None = None
    cpu_features: dict[str, bool] = Field(default_factory=dict, examples=[{"avx2": True, "avx512_vnni": False}])
    int8_acceleration: str | None = None
    memory_bytes: int | None = None
    os: str | None = None
    python: str | None = None
    onnxruntime: str | None = None
    execution_provider: str | None = None
    threads: int | None = None
    cpu_info_source: str | None = None


class EvaluationFacts(_Open):
    """How the measurement was made."""

    inputs: Literal["dataset", "random"] | None = None
    samples: int | None = None
    batch_size: int | None = None
    threads: int | None = None
    warmup_runs: int | None = None
    latency_runs: int | None = None
    latency_runs_requested: int | None = None
    interleaved: bool | None = None
    stopped_early: bool | None = None
    reused_calibration: bool | None = Field(None, description="Evaluated on the calibration data itself.")


class AutoTrial(_Open):
    """One model mode auto measured: a whole-model candidate or a mixed-precision search step."""

    name: str
    stage: Literal["candidate", "step"] = "candidate"
    parent: str | None = Field(None, description="Steps: the candidate the search started from.")
    recipe: dict[str, Any] = Field(default_factory=dict, description="What this trial changed in the recipe.")
    p50_ms: float | None = None
    float_p50_ms: float | None = None
    speedup: float | None = Field(None, description="float p50 / this p50, timed interleaved; above 1 is faster.")
    latency_runs: int = 0
    size_bytes: int | None = None
    metric: str | None = None
    fidelity: float | None = Field(None, description="The worst budgeted output's value of `metric`.")
    accuracy_drop: float | None = None
    within_budget: bool = False
    error: dict[str, Any] | None = Field(None, description="Why the trial could not be produced or measured.")


class AutoSearch(_Open):
    """`result.quantization.auto`: what mode auto measured and why it chose what it chose."""

    verdict: Literal["quantized", "keep_float"] | None = Field(
        None,
        description="`keep_float` when no candidate is worth shipping over the float model; null only in results "
        "of searches made before verdicts existed.",
    )
    headline: str = ""
    objective: Literal["latency", "size"] = "latency"
    chosen: str
    effective_recipe: dict[str, Any] | None = Field(
        None, description="A plain static/dynamic/... recipe that reproduces the artifact (null: the float model)."
    )
    fidelity: dict[str, Any] | None = None
    candidates: list[AutoTrial] = Field(default_factory=list, description="The whole-model candidates, in order.")
    steps: list[AutoTrial] = Field(default_factory=list, description="The mixed-precision search's steps.")
    search_seconds: float | None = None
    time_budget_exhausted: bool = False


class QuantizationFacts(_Open):
    """`result.quantization`: what the engine did (free-form facts, plus mode auto's typed search)."""

    calibration_samples: int | None = None
    op_counts: dict[str, int] = Field(default_factory=dict, description="Operators of the quantized model.")
    quantized_op_counts: dict[str, int] = Field(default_factory=dict)
    auto: AutoSearch | None = Field(None, description="Mode auto only.")


class JobResult(_Open):
    original: ModelMetrics
    quantized: ModelMetrics
    comparison: Comparison
    warnings: list[str] = Field(default_factory=list, description="What a person should know before shipping it.")
    timings_s: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, and `total`.")
    peak_memory_bytes: int | None = Field(None, description="Peak resident memory of the job's process.")
    preprocessing_steps: list[str] = Field(default_factory=list)
    machine: Machine = Field(default_factory=Machine)
    evaluation: EvaluationFacts | None = None
    quantization: QuantizationFacts | None = None
