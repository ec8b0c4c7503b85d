"""The job's result: the one type the engine builds, the worker stores, the API serves (`Job.result`,
`GET /v1/jobs/{id}/report`) and the HTML report reads. Its JSON schema in `/openapi.json` is this type's.

Every verdict in it (is this output faithful, is this drop within tolerance, is this model within budget)
was made by `core.judge` in the engine and is recorded here; nothing that reads a result decides again.
Unknown keys are ignored on reading, so results stored by older versions still load; `upgrade_stored` is the
one reader of stored rows: it gives results stored before the verdicts were recorded the verdicts their
engine made, and leaves results of this version as they are."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ErrorInfo
from core.judge import beyond_tolerance, ships_quantized


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LatencyStats(_Shape):
    """Milliseconds per run, over the measured runs (warm-up runs discarded)."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float


class ModelMetrics(_Shape):
    size_bytes: int = Field(description="On disk, external data included.")
    latency_ms: LatencyStats | None = None
    throughput_per_s: float | None = Field(None, description="Samples per second at `batch_size`.")
    accuracy: float | None = Field(None, description="Top-1 on the labelled evaluation data; null without labels.")
    top5_accuracy: float | None = None
    session_create_ms: float | None = Field(None, description="Time to load the model into ONNX Runtime.")
    batch_size: int | None = None
    runs: int | None = Field(None, description="Latency runs measured.")


OutputKindName = Literal["classification", "detection", "sequence", "embedding", "dense", "regression"]
# The kinds results stored before v3 name (read from an output's values alone), and their v3 names.
LEGACY_KINDS: dict[str, OutputKindName] = {
    "class_scores": "classification",
    "sequence_scores": "sequence",
    "tokens": "embedding",
    "tensor": "regression",
}


class DetectionAgreement(_Shape):
    """A detection output's detections in both models: rows scoring above `score_threshold`, matched one to one
    (same class, IoU at least `iou_threshold`). `OutputFidelity.value` is their F1, 2 matched / (float rows +
    quantized rows)."""

    score_threshold: float
    iou_threshold: float
    layout: Literal["rows", "columns"] = Field(description="rows [B, N, K] or columns [B, K, N].")
    reference_rows: int = Field(description="Detections of the float model, over all samples.")
    candidate_rows: int = Field(description="Detections of the quantized model, over all samples.")
    matched: int = Field(description="Pairs of detections that match.")
    mean_iou: float | None = Field(None, description="Mean IoU of the matched pairs.")
    box_error: float | None = Field(
        None,
        description="Mean absolute error of the matched boxes' coordinates relative to the float box's size "
        "(its width for x, its height for y): 0.05 is 5% of the box.",
    )


class OutputFidelity(_Shape):
    """How close the quantized model's output is to the float model's on the same inputs, and the judge's
    verdict on it: `value` of `metric` (chosen by the output's `kind`) against the floor `min`."""

    name: str = Field(examples=["logits"])
    kind: OutputKindName | None = Field(
        None,
        description="What the output holds, which decides its metric: classification (class scores [B, C] or "
        "class ids), detection (rows of boxes and scores), sequence (scores per position), embedding, dense "
        "(maps [B, C, H, W]) or regression (any other values).",
    )
    kind_source: Literal["given", "inferred"] | None = Field(
        None, description="`given` by the recipe's `fidelity`, or `inferred` from the graph and the data."
    )
    kind_reason: str | None = Field(
        None,
        description="Why the output got its kind, in one sentence.",
        examples=["produced by Softmax over the last axis of [1, 1000]"],
    )
    metric: Literal["agreement", "cosine", "sqnr", "detection_f1"] | None = Field(
        None,
        description="What the output is judged by: argmax agreement, detection F1, mean per-sample cosine, or "
        "SQNR (dB).",
    )
    value: float | None = Field(None, description="The output's value of `metric`.")
    min: float | None = Field(None, description="The floor `value` must reach.")
    budgeted: bool = Field(False, description="Whether this output counts toward the fidelity budget.")
    faithful: bool | None = Field(
        None, description="The verdict: `value` reaches `min`. Null: the output could not be compared."
    )
    cosine: float | None = Field(
        None, description="Cosine similarity over all samples taken together, 1.0 = same direction.", examples=[0.9991]
    )
    mean_cosine: float | None = Field(None, description="Mean of the per-sample (per-token) cosines.")
    sqnr_db: float | None = Field(None, description="Signal-to-quantization-noise ratio in dB.", examples=[31.4])
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    top1_agreement: float | None = Field(
        None, description="Share of samples (positions, for sequence scores) whose argmax agrees."
    )
    problem: str | None = Field(None, description="Why the output could not be compared.")
    detection: DetectionAgreement | None = Field(None, description="Detection outputs: their detections.")


class FidelityVerdict(_Shape):
    """The quantized model against the fidelity budget, as the judge decided it."""

    within_budget: bool
    metric: str = Field(description="What decided: the worst budgeted output's metric, or `top1_drop`.")
    fidelity: float | None = Field(None, description="The worst budgeted output's value of its metric.")
    accuracy_drop: float | None = Field(None, description="Top-1 drop as a fraction (with labels).")
    accuracy_tolerance: float = Field(description="The largest top-1 drop the recipe accepts.")
    samples: int = 0
    notes: list[str] = Field(default_factory=list)


class AccuracyComparison(_Shape):
    metric: str = Field(examples=["top1"])
    original: float | None
    quantized: float | None
    delta: float | None = Field(description="quantized - original; negative is a loss.")
    within_tolerance: bool | None = Field(
        None, description="The judge's verdict: the drop is at most the recipe's `accuracy_tolerance`."
    )
    top5_original: float | None = None
    top5_quantized: float | None = None
    samples: int | None = None
    output: str | None = Field(None, description="The output read as class scores.")


class Comparison(_Shape):
    size_ratio: float | None = Field(None, description="quantized size / original size.", examples=[0.27])
    speedup_p50: float | None = Field(None, description="original p50 / quantized p50; above 1 is faster.")
    outputs: list[OutputFidelity] = Field(default_factory=list, description="Fidelity per model output.")
    fidelity: FidelityVerdict | None = Field(None, description="The model against the fidelity budget.")
    accuracy: AccuracyComparison | None = Field(None, description="With a labelled evaluation dataset only.")


class Machine(_Shape):
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
    worker_class: str | None = Field(
        None,
        description="The class of the worker that measured (its architecture and best int8 instructions, or "
        "what its operator set; see GET /v1/targets). Null in results of older versions.",
        examples=["x86_64-avx512vnni"],
    )
    pool: str | None = Field(None, description="The pool of that worker, when its operator set one.")


class SessionSettings(_Shape):
    intra_op_num_threads: int
    inter_op_num_threads: int
    execution_mode: str
    graph_optimization_level: str
    allow_spinning: bool


class EvaluationFacts(_Shape):
    """How the measurement was made."""

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
    session_options: SessionSettings | None = None


class AutoTrial(_Shape):
    """One model mode auto measured: a whole-model candidate or a mixed-precision search step."""

    name: str
    stage: Literal["candidate", "step"] = "candidate"
    parent: str | None = Field(None, description="Steps: the candidate the search started from.")
    recipe: dict[str, Any] = Field(default_factory=dict, description="The recipe that reproduces this trial.")
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
    error: ErrorInfo | None = Field(None, description="Why the trial could not be produced or measured.")
    predicted_speedup: float | None = Field(
        None,
        description="What the pre-flight predicted for this recipe from its per-layer timings (null: no prediction).",
    )


class SensitiveNode(_Shape):
    node: str
    op_type: str | None = None
    score: float | None = Field(None, description="Share of the signal quantizing the node's input loses (0-1).")


class SensitivitySummary(_Shape):
    """The nodes of one candidate that lose the most to quantization, most sensitive first (the whole
    ranking is the `sensitivity.json` artifact)."""

    candidate: str
    method: str | None = None
    top: list[SensitiveNode] = Field(default_factory=list)


Int8Kind = Literal["qdq", "qoperator", "s8s8", "dynamic"]


class PreflightOp(_Shape):
    """One op type of the model in the pre-flight: its nodes' float time, and each int8 kind's speedup on them
    (above 1: faster) with int8 neighbours: an op type the quantizer leaves in float pays the conversions."""

    op_type: str = Field(examples=["HardSwish"])
    nodes: int = Field(description="Nodes of this op type that were timed.")
    float_ms: float = Field(description="Their summed float time, one-node models on this CPU.")
    share: float = Field(description="Their share of the timed float time (0-1).")
    speedups: dict[Int8Kind, float | None] = Field(default_factory=dict, examples=[{"qdq": 0.7, "dynamic": 1.0}])
    free_in: list[Int8Kind] = Field(
        default_factory=list,
        description="Kinds in which the quantizer folds these nodes (a Relu or Clip) into the quantized node before "
        "them: they cost nothing there.",
    )


class PrunedCandidate(_Shape):
    name: str
    predicted_speedup: float | None = None
    reason: str


class Preflight(_Shape):
    """What mode auto measured on the worker's CPU before searching: float against int8 per layer of the model
    (one-node models per distinct op type, shapes and attributes; cached per CPU model and ONNX Runtime
    version), the whole model's predicted int8 speedup per kind, and the candidates it did not try."""

    verdict: str = Field(examples=["Conv 2.1x; HardSwish blocks 0.7x: int8 will not help here (best QDQ 0.93x)"])
    int8_helps: bool = Field(
        description="Some int8 kind is predicted faster than float for the whole model, or near enough that the "
        "search measures it; false: no int8 candidate was tried."
    )
    speedups: dict[Int8Kind, float | None] = Field(
        default_factory=dict,
        description="Predicted whole-model speedup over float per int8 kind: qdq (this CPU's static int8 types), "
        "qoperator, s8s8 (int8 activations), dynamic.",
    )
    ops: list[PreflightOp] = Field(default_factory=list, description="Per op type, largest float share first.")
    pruned: list[PrunedCandidate] = Field(default_factory=list, description="Candidates not tried, and why.")
    nodes: int = Field(0, description="Top-level nodes of the prepared model.")
    nodes_timed: int = Field(0, description="Nodes whose layer was timed (or found in the cache).")
    layers: int = Field(0, description="Distinct layers (op type, shapes, attributes) timed or found in the cache.")
    layers_cached: int = Field(0, description="Of those, found in the cache: not timed again.")
    complete: bool = Field(True, description="False: the pre-flight's time ran out and some layers went untimed.")
    cpu_model: str | None = None
    onnxruntime: str | None = None
    threads: int | None = None
    seconds: float | None = None


class AutoSearch(_Shape):
    """`result.quantization.auto`: what mode auto measured and why it chose what it chose. The chosen
    model's fidelity is the result's `comparison.fidelity` (measured on the whole evaluation data)."""

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
    interleaved: bool = Field(
        True,
        description="False: a big model's search held one session at a time, so each trial and float were timed "
        "one after the other, not interleaved.",
    )
    sensitivity: list[SensitivitySummary] = Field(default_factory=list)
    preflight: Preflight | None = Field(
        None, description="Objective latency: int8 against float per layer on this CPU, before the search."
    )


class CalibrationFacts(_Shape):
    method: str
    samples: int
    feeds: int
    batch_size: int
    collect_calls: int | None = None
    max_feeds_per_call: int | None = None
    passes: int | None = None


class BiasCorrectionFacts(_Shape):
    """Fast bias correction of a static model (recipe `bias_correction`)."""

    applied: bool = Field(description="Some bias was changed.")
    biases_changed: int = Field(0, description="Biases shifted (Conv, Gemm, or the Add after a MatMul).")
    layers_considered: int = Field(0, description="Quantized layers with a bias of their own that were measured.")
    samples: int = 0
    seconds: float | None = None
    output_error: float | None = Field(
        None, description="Output noise-to-signal ratio of the corrected QDQ model on a few calibration batches."
    )
    baseline_error: float | None = Field(None, description="The same without the correction (kept only if lower).")
    skipped: str | None = Field(None, description="Why no bias was changed, when so.")


class TensorRangeChoice(_Shape):
    tensor: str
    method: str = Field(description="The range kept: minmax or percentile (with its value).")
    output_error: float | None = Field(None, description="Output noise-to-signal ratio with that range.")
    baseline_error: float | None = Field(None, description="The same with the recipe's own range.")


class RangeChoiceFacts(_Shape):
    """Calibration method chosen per tensor (recipe `calibration_per_tensor`)."""

    tensors_tried: int = 0
    tensors_changed: int = Field(0, description="Tensors whose range is not the recipe's method's.")
    choices: list[TensorRangeChoice] = Field(default_factory=list)
    samples: int = 0
    seconds: float | None = None
    skipped: str | None = None


class WeightOnlyFacts(_Shape):
    bits: int
    block_size: int
    symmetric: bool
    op_types: list[str]


class Fp16Facts(_Shape):
    op_block_list: list[str] = Field(default_factory=list)
    nodes_kept_float32: list[str] = Field(default_factory=list)
    range_check_on: str | None = None


class ModelCheck(_Shape):
    """The quantized model: onnx.checker, loaded and run in ONNX Runtime on one sample."""

    onnx_checker: bool
    ort_session: bool
    ran_on_sample: bool
    cosine_on_sample: dict[str, float | None] = Field(default_factory=dict)


class OriginalFacts(_Shape):
    opset: int | None = None
    op_counts: dict[str, int] = Field(default_factory=dict)
    external_data: bool = False


class Opsets(_Shape):
    original: int | None = None
    quantized: int | None = None


class FloatNode(_Shape):
    name: str
    op_type: str
    subgraph: str


class QuantizedNode(FloatNode):
    """A Conv/MatMul/Gemm inside an If/Loop/Scan body that static quantization quantized (QDQ: the node
    itself, reading DequantizeLinear outputs; QOperator: the QLinearConv/QLinearMatMul/... made of it)."""


class QuantizationFacts(_Shape):
    """`result.quantization`: what the engine did."""

    mode: str | None = Field(None, description="The mode that made the artifact (`float`: the float model).")
    calibration_samples: int | None = None
    original: OriginalFacts | None = None
    qat_qdq_nodes: int | None = Field(None, description="Q/DQ nodes the uploaded model already held.")
    calibration: CalibrationFacts | None = None
    weight_only: WeightOnlyFacts | None = None
    bias_correction: BiasCorrectionFacts | None = None
    range_choice: RangeChoiceFacts | None = None
    fp16: Fp16Facts | None = None
    check: ModelCheck | None = None
    op_counts: dict[str, int] = Field(default_factory=dict, description="Operators of the quantized model.")
    quantized_op_counts: dict[str, int] = Field(default_factory=dict)
    opset: Opsets | None = None
    external_data: bool | None = None
    float_in_subgraphs: list[FloatNode] = Field(default_factory=list)
    quantized_in_subgraphs: list[QuantizedNode] = Field(
        default_factory=list, description="Conv/MatMul/Gemm nodes inside If/Loop/Scan bodies quantized to int8."
    )
    auto: AutoSearch | None = Field(None, description="Mode auto only.")


class MeasuredOn(_Shape):
    """`result.measured_on[]`, one per class or pool a job's `target` lists (a job with one target, or
    `any`, has none): the float and quantized models measured side by side on a worker there, and the model
    to ship there. The first is where the job ran, from its own evaluation; each other is a follow-up on a
    worker of that target, recorded as it arrives (`pending` until then)."""

    target: str = Field(description="The class or pool as the job's `target` names it.", examples=["x86_64-avx2"])
    status: Literal["pending", "measured", "failed"] = Field(
        description="`pending` until a worker of the target has measured (the job itself has already succeeded)."
    )
    worker_class: str | None = Field(None, description="The class of the worker that measured.")
    pool: str | None = None
    original: ModelMetrics | None = Field(None, description="The float model there (mode compare: the reference).")
    quantized: ModelMetrics | None = Field(None, description="The job's artifact there (mode compare: the model).")
    speedup_p50: float | None = Field(None, description="original p50 / quantized p50 there; above 1 is faster.")
    within_budget: bool | None = Field(None, description="The fidelity budget's verdict on the outputs computed there.")
    chosen: Literal["quantized", "float"] | None = Field(
        None,
        description="The model to ship on this class: the quantized one when it is within budget and, for the "
        "latency objective, faster than float beyond noise there (mode auto, where the job ran: the search's "
        "verdict); else the float model.",
    )
    machine: Machine | None = None
    requests: int = Field(0, description="Follow-up messages sent to the target's workers so far.")
    requested_at: datetime | None = None
    measured_at: datetime | None = None
    error: ErrorInfo | None = Field(None, description="Why the measurement failed.")

    @classmethod
    def pending(cls, target: str) -> MeasuredOn:
        return cls(target=target, status="pending")

    @classmethod
    def measured(
        cls,
        target: str,
        machine: Machine,
        original: ModelMetrics,
        quantized: ModelMetrics,
        comparison: Comparison,
        *,
        objective: str,
        auto: AutoSearch | None = None,
        at: datetime | None = None,
    ) -> MeasuredOn:
        """An entry from one evaluation on `machine`. The model to ship there is the quantized one when
        `core.judge.ships_quantized` says so, or, given mode auto's search (where the job ran), as it decided."""
        within = None if comparison.fidelity is None else comparison.fidelity.within_budget
        if auto is not None and auto.verdict is not None:
            ships = auto.verdict == "quantized"
        else:
            ships = ships_quantized(within, comparison.speedup_p50, objective=objective)
        return cls(
            target=target,
            status="measured",
            worker_class=machine.worker_class,
            pool=machine.pool,
            original=original,
            quantized=quantized,
            speedup_p50=comparison.speedup_p50,
            within_budget=within,
            chosen="quantized" if ships else "float",
            machine=machine,
            measured_at=at or datetime.now(UTC),
        )

    @classmethod
    def where_it_ran(cls, target: str, result: JobResult, *, objective: str, at: datetime | None) -> MeasuredOn:
        """The entry of the class or pool a job ran on, from its own result."""
        auto = None if result.quantization is None else result.quantization.auto
        return cls.measured(
            target,
            result.machine,
            result.original,
            result.quantized,
            result.comparison,
            objective=objective,
            auto=auto,
            at=at,
        )

    @classmethod
    def failed(cls, target: str, error: ErrorInfo) -> MeasuredOn:
        return cls(target=target, status="failed", error=error, measured_at=datetime.now(UTC))


class JobResult(_Shape):
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
    measured_on: list[MeasuredOn] = Field(
        default_factory=list,
        description="A job whose `target` lists several classes or pools: its models measured on each, side by side.",
    )

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> JobResult:
        """A stored result, also one written before the verdicts were recorded (raises ValidationError when
        it has another shape altogether)."""
        return cls.model_validate(upgrade_stored(data))


def upgrade_stored(data: dict[str, Any]) -> dict[str, Any]:
    """A result stored before this version (no `comparison.fidelity`) with the verdicts its engine made:
    the budget verdict from `quantization.auto.fidelity` or `quantization.compare.fidelity`, and each output
    judged by the thresholds that engine recorded (`evaluation.fidelity_thresholds`: cosine and SQNR); and output
    kinds stored under their pre-v3 names (`class_scores`) under their v3 names (`classification`)."""
    comparison = data.get("comparison")
    if not isinstance(comparison, dict):
        return data
    data = _v3_kinds(data, comparison)
    comparison = data["comparison"]
    if "fidelity" in comparison:
        return data
    quantization = _mapping(data.get("quantization"))
    evaluation = _mapping(data.get("evaluation"))
    old = next(
        (
            part["fidelity"]
            for part in (quantization.get("auto"), quantization.get("compare"))
            if isinstance(part, dict) and isinstance(part.get("fidelity"), dict)
        ),
        None,
    )
    thresholds = _mapping(evaluation.get("fidelity_thresholds"))
    cos_min, sqnr_min = _number(thresholds.get("cosine")), _number(thresholds.get("sqnr_db"))
    outputs = []
    for row in comparison.get("outputs") or []:
        if not isinstance(row, dict) or "faithful" in row:
            outputs.append(row)
            continue
        cos, sqnr = _number(row.get("cosine")), _number(row.get("sqnr_db"))
        judged = cos is not None and cos_min is not None
        poor = (cos is not None and cos_min is not None and cos < cos_min) or (
            sqnr is not None and sqnr_min is not None and sqnr < sqnr_min
        )
        outputs.append(
            {
                **row,
                "metric": "cosine",
                "value": cos,
                "min": cos_min,
                "budgeted": judged,
                "faithful": (not poor) if judged else None,
            }
        )
    accuracy = comparison.get("accuracy")
    tolerance = evaluation.get("accuracy_tolerance")
    if isinstance(accuracy, dict) and "within_tolerance" not in accuracy and isinstance(tolerance, int | float):
        delta = accuracy.get("delta")
        drop = -delta if isinstance(delta, int | float) else None
        accuracy = {**accuracy, "within_tolerance": None if drop is None else not beyond_tolerance(drop, tolerance)}
    verdict = None
    if isinstance(old, dict) and isinstance(old.get("within_budget"), bool):
        verdict = {
            "within_budget": old["within_budget"],
            "metric": old.get("metric") or "none",
            "fidelity": old.get("fidelity"),
            "accuracy_drop": old.get("accuracy_drop"),
            "accuracy_tolerance": old.get("accuracy_tolerance", tolerance if tolerance is not None else 0.01),
            "samples": old.get("samples") or 0,
            "notes": old.get("notes") or [],
        }
    return {**data, "comparison": {**comparison, "outputs": outputs, "accuracy": accuracy, "fidelity": verdict}}


def _v3_kinds(data: dict[str, Any], comparison: dict[str, Any]) -> dict[str, Any]:
    """The result with its output rows' pre-v3 kinds renamed (the same object when it has none)."""
    rows = comparison.get("outputs")
    if not isinstance(rows, list) or not any(isinstance(r, dict) and r.get("kind") in LEGACY_KINDS for r in rows):
        return data
    renamed = [
        {
            **row,
            "kind": LEGACY_KINDS[row["kind"]],
            "kind_source": "inferred",
            "kind_reason": f"read from its values by an earlier version (stored as {row['kind']})",
        }
        if isinstance(row, dict) and row.get("kind") in LEGACY_KINDS
        else row
        for row in rows
    ]
    return {**data, "comparison": {**comparison, "outputs": renamed}}


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
