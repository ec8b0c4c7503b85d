"""Mode compare: an uploaded quantized model measured against its float reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.recipe import Recipe
from tests.onnx_models import spiky_cnn, spiky_images
from worker.engine.compare import compare_models
from worker.engine.quantize import quantize


def test_compare_scores_an_uploaded_qdq_model_against_its_reference(tmp_path: Path) -> None:
    reference = spiky_cnn(tmp_path / "float.onnx")
    np.savez(tmp_path / "d.npz", input=spiky_images(12))
    data = DatasetSource(tmp_path / "d.npz", "npz")
    qat = quantize(reference, Recipe(mode="static", per_channel=True), tmp_path / "q", calibration=data)
    outcome, measured = compare_models(
        reference,
        qat.model_path,
        Recipe(mode="compare", reference_model_id="the-float-model"),
        EvaluationSpec(latency_runs=2, warmup_runs=0),
        data=data,
    )
    verdict = measured.comparison.fidelity
    assert verdict is not None and outcome.facts.mode == "compare"
    assert outcome.files == []  # nothing quantized, nothing to hand back but the report
    assert verdict.metric == "agreement" and not verdict.within_budget
    assert outcome.warnings[0].startswith("The model is outside the fidelity budget")
    # One pass judged it: the verdict's number is the per-output row's, which the warning names.
    row = measured.comparison.outputs[0]
    assert row.top1_agreement == row.value == verdict.fidelity and row.faithful is False
