"""Mode compare: an already quantized model (quantization-aware training, another toolkit's QDQ
export) measured against its float reference like any job's result; nothing is quantized."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from worker.engine.checks import model_facts
from worker.engine.data import model_inputs
from worker.engine.evaluate import evaluate
from worker.engine.fidelity import FidelityEvaluator
from worker.engine.results import EvaluationOutcome, QuantizationOutcome
from worker.engine.spec import (
    DatasetSource,
    EvaluationSpec,
    ProgressCallback,
    QuantizationSpec,
    TensorSpec,
    no_progress,
)


def compare_models(
    reference: Path,
    model: Path,
    spec: QuantizationSpec,
    evaluation: EvaluationSpec,
    *,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[QuantizationOutcome, EvaluationOutcome]:
    """Evaluate `model` against `reference` and score it on the recipe's fidelity budget."""
    inputs = list(inputs) if inputs is not None else model_inputs(Path(reference))
    measured = evaluate(
        reference,
        model,
        evaluation,
        data=data,
        inputs=inputs,
        accuracy_tolerance=spec.accuracy_tolerance,
        progress=progress,
    )
    score = FidelityEvaluator(
        reference,
        data,
        inputs,
        spec.fidelity,
        spec.accuracy_tolerance,
        batch_size=evaluation.batch_size,
        max_samples=evaluation.max_samples or 256,
        threads=evaluation.threads,
    ).score(Path(model))
    facts = model_facts(Path(model))
    warnings = []
    if not score.within_budget:
        worst = score.worst
        what = f"{worst.metric} {worst.value:.4f} on '{worst.name}' (floor {worst.floor:g})" if worst else "accuracy"
        warnings.append(f"The model is outside the fidelity budget against its reference: {what}.")
    if not facts.qdq_nodes:
        warnings.append("The compared model holds no QuantizeLinear/DequantizeLinear nodes; is it really quantized?")
    outcome = QuantizationOutcome(
        model_path=Path(model),
        files=[],
        warnings=warnings,
        details={
            "mode": "compare",
            "compare": {"within_budget": score.within_budget, "fidelity": score.to_dict()},
            "quantized_op_counts": {
                k: v for k, v in facts.op_counts.items() if k in ("QuantizeLinear", "DequantizeLinear")
            },
        },
    )
    return outcome, measured
