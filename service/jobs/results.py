"""Wire shape of a job's result (`Job.result`, `GET /v1/jobs/{id}/report`), typed field by field so
the OpenAPI document says what a client gets. Every model allows extra keys: the engine may add
facts before this file names them, and a client must not break on them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)


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


class FidelityThresholds(_Open):
    """What the engine judged fidelity by, as it recorded it: the report has no thresholds of its own."""

    cosine: float | None = Field(None, description="An output is poor below this cosine ...", examples=[0.99])
    sqnr_db: float | None = Field(None, description="... or below this SQNR.", examples=[20.0])
    sqnr_cap_db: float | None = Field(None, description="The SQNR reported for identical outputs.", examples=[200.0])


class EvaluationFacts(_Open):
    """How the measurement was made, and the thresholds the result was judged by (in the engine's order)."""

    inputs: Literal["dataset", "random"] | None = None
    samples: int | None = None
    feeds: int | None = Field(None, description="Batches run through both models for fidelity and accuracy.")
    batch_size: int | None = None
    batch_size_requested: int | None = None
    threads: int | None = None
    threads_requested: int | None = None
    threads_clamped: bool | None = None
    execution_provider: str | None = None
    warmup_runs: int | None = None
    latency_runs_requested: int | None = None
    latency_runs: int | None = None
    interleaved: bool | None = None
    stopped_early: bool | None = None
    max_seconds: float | None = None
    max_samples: int | None = None
    reused_calibration: bool | None = Field(None, description="Evaluated on the calibration data itself.")
    accuracy_output: str | None = Field(None, description="The output read as class scores.")
    accuracy_tolerance: float | None = Field(
        None, description="A larger top-1 drop (a fraction) is beyond what the recipe accepts."
    )
    session_options: dict[str, Any] | None = None
    fidelity_thresholds: FidelityThresholds | None = None


class TrialError(_Open):
    code: str | None = None
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


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
    not_slower_checks: list[float] = Field(
        default_factory=list,
        description="keep_float: this trial's speedups in the full-count timings that had to show it no slower "
        "than float; it is handed back only if every one is at least 1.",
    )
    error: TrialError | None = Field(None, description="Why the trial could not be produced or measured.")


class OutputBudget(_Open):
    """One output's fidelity against the fidelity budget."""

    name: str
    kind: str | None = None
    metric: str | None = None
    value: float | None = None
    min: float | None = Field(None, description="The budget's floor for `metric`.")
    budgeted: bool = Field(False, description="Whether this output counts toward the budget.")
    mean_cosine: float | None = None
    sqnr_db: float | None = None
    agreement: float | None = None
    problem: str | None = None


class FidelityScore(_Open):
    """A model's fidelity against its float reference, and whether it is within the budget."""

    metric: str | None = None
    fidelity: float | None = Field(None, description="The worst budgeted output's value of `metric`.")
    within_budget: bool | None = None
    accuracy_drop: float | None = None
    accuracy_tolerance: float | None = None
    samples: int | None = None
    outputs: list[OutputBudget] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class SensitiveNode(_Open):
    node: str
    op_type: str | None = None
    score: float | None = Field(None, description="Share of the signal quantizing the node's input loses (0-1).")


class Sensitivity(_Open):
    """The nodes of one candidate that lose the most to quantization, most sensitive first."""

    candidate: str
    method: str | None = None
    top: list[SensitiveNode] = Field(default_factory=list)


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
    fidelity: FidelityScore | None = Field(None, description="The chosen model's fidelity.")
    candidates: list[AutoTrial] = Field(default_factory=list, description="The whole-model candidates, in order.")
    steps: list[AutoTrial] = Field(default_factory=list, description="The mixed-precision search's steps.")
    search_seconds: float | None = None
    time_budget_exhausted: bool = False
    search_latency_runs: int | None = Field(None, description="Runs per timing of candidates and steps.")
    final_latency_runs: int | None = Field(
        None, description="Runs per timing of the finalists and of a keep_float artifact (the full count)."
    )
    finalists: list[str] = Field(
        default_factory=list,
        description=(
            "Trials re-timed together with float in one interleaved loop with the full count to decide "
            "the verdict; the winner, if any, is among them."
        ),
    )
    sensitivity: list[Sensitivity] = Field(default_factory=list)


class CompareFacts(_Open):
    """`result.quantization.compare`: mode compare's verdict on the uploaded model against its reference."""

    within_budget: bool = False
    fidelity: FidelityScore | None = None


class QuantizationFacts(_Open):
    """`result.quantization`: what the engine did (free-form facts, plus mode auto's typed search)."""

    calibration_samples: int | None = None
    op_counts: dict[str, int] = Field(default_factory=dict, description="Operators of the quantized model.")
    quantized_op_counts: dict[str, int] = Field(default_factory=dict)
    auto: AutoSearch | None = Field(None, description="Mode auto only.")
    compare: CompareFacts | None = Field(None, description="Mode compare only.")


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
    # Set by `stored_result` on a result that does not validate: (the result as stored, why not).
    _as_stored: tuple[dict[str, Any], ValidationError] | None = PrivateAttr(None)

    @property
    def untyped(self) -> tuple[dict[str, Any], ValidationError] | None:
        """For a stored result of another shape: (it as stored, why it does not validate)."""
        return self._as_stored

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays JobResult's own
        return self._as_stored[0] if self._as_stored is not None else handler(self)


def stored_result(value: Any) -> Any:
    """A stored result as JobResult; one that this version's JobResult refuses (written by an older
    or newer worker) is served as it was stored rather than failing every read of the job."""
    if not isinstance(value, dict):
        return value
    try:
        return JobResult.model_validate(value)
    except ValidationError as exc:
        nothing: dict[str, Any] = {}  # no field is set: readers check `untyped` first
        odd = JobResult.model_construct(**nothing)
        odd._as_stored = (value, exc)
        return odd
