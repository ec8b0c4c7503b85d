"""Mode compare: an already quantized model (quantization-aware training, another toolkit's QDQ
export) measured against its float reference like any job's result; nothing is quantized. The verdict is
the evaluation's own (`comparison.fidelity`), judged on the recipe's fidelity budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.model import TensorSpec
from core.recipe import Recipe
from core.result import QuantizationFacts
from worker.engine.checks import model_facts
from worker.engine.data import model_inputs
from worker.engine.evaluate import Evaluation, evaluate
from worker.engine.results import QuantizationOutcome
from worker.engine.spec import ProgressCallback, no_progress


def compare_models(
    reference: Path,
    model: Path,
    spec: Recipe,
    evaluation: EvaluationSpec,
    *,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    progress: ProgressCallback = no_progress,
) -> tuple[QuantizationOutcome, Evaluation]:
    """Evaluate `model` against `reference`, judged on the recipe's fidelity budget."""
    inputs = list(inputs) if inputs is not None else model_inputs(Path(reference))
    measured = evaluate(
        reference,
        model,
        evaluation,
        data=data,
        inputs=inputs,
        budget=spec.fidelity,
        accuracy_tolerance=spec.accuracy_tolerance,
        progress=progress,
    )
    facts = model_facts(Path(model))
    warnings = []
    if not measured.score.within_budget:
        worst = measured.score.worst
        what = (
            f"{worst.metric} {worst.value:.4f} on '{worst.name}' (floor {worst.min:g})"
            if worst is not None and worst.value is not None
            else "accuracy"
        )
        warnings.append(f"The model is outside the fidelity budget against its reference: {what}.")
    if not facts.qdq_nodes:
        warnings.append("The compared model holds no QuantizeLinear/DequantizeLinear nodes; is it really quantized?")
    outcome = QuantizationOutcome(
        model_path=Path(model),
        files=[],
        warnings=warnings,
        facts=QuantizationFacts(
            mode="compare",
            quantized_op_counts={
                k: v for k, v in facts.op_counts.items() if k in ("QuantizeLinear", "DequantizeLinear")
            },
        ),
    )
    return outcome, measured
