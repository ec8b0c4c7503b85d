"""Mode auto: the search over recipes and the choice within the accuracy budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.onnx_models import INTEGER_QUANTIZED_OPS, cancelling_matmuls, conv_classifier, labelled_by_the_model
from worker.engine import DatasetSource, EngineError, EvaluationSpec, QuantizationSpec
from worker.engine.auto import CANDIDATES, Candidate, Trial, auto_quantize, choose
from worker.engine.quantize import quantize
from worker.engine.results import EvaluationOutcome


def _trial(name: str, *, p50: float, size: int, delta: float | None = None, cosine: float = 1.0) -> Trial:
    measured = EvaluationOutcome(
        original={"size_bytes": 100},
        quantized={"size_bytes": size, "latency_ms": {"p50": p50}},
        comparison={
            "outputs": [{"name": "y", "cosine": cosine, "sqnr_db": 40.0 if cosine > 0.99 else 5.0}],
            "accuracy": None
            if delta is None
            else {"metric": "top1", "original": 0.9, "quantized": 0.9 + delta, "delta": delta},
        },
    )
    return Trial(Candidate(name, {}), QuantizationSpec(), measured=measured)


def test_the_fastest_candidate_within_budget_wins() -> None:
    trials = [
        _trial("fast but inaccurate", p50=1.0, size=10, delta=-0.05),
        _trial("slower, within", p50=3.0, size=10, delta=-0.005),
        _trial("fastest within", p50=2.0, size=20, delta=0.0),
        Trial(Candidate("broken", {}), QuantizationSpec(), error={"code": "quantization_failed"}),
    ]
    best, warnings = choose(trials, tolerance=0.01)
    assert best.candidate.name == "fastest within" and warnings == []


def test_without_labels_fidelity_is_the_budget() -> None:
    best, _ = choose([_trial("poor", p50=1.0, size=1, cosine=0.5), _trial("good", p50=2.0, size=1)], 0.01)
    assert best.candidate.name == "good"


def test_nothing_within_budget_returns_the_most_faithful_with_a_warning() -> None:
    best, warnings = choose(
        [_trial("bad", p50=1.0, size=1, delta=-0.2), _trial("less bad", p50=5.0, size=1, delta=-0.03)], 0.01
    )
    assert best.candidate.name == "less bad"
    assert "No candidate stayed within" in warnings[0]


def test_all_candidates_failing_is_an_error() -> None:
    with pytest.raises(EngineError) as info:
        choose([Trial(Candidate("x", {}), QuantizationSpec(), error={"code": "quantization_failed"})], 0.01)
    assert info.value.code == "quantization_failed"


def _top1(model: Path, samples: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return float(
        np.mean([np.argmax(session.run(None, {"x": x})[0]) == y for x, y in zip(samples, labels, strict=True)])
    )


def test_auto_keeps_the_weights_in_float_where_every_int8_recipe_breaks_the_budget(tmp_path: Path) -> None:
    """A model where the right answer is known by construction (see `cancelling_matmuls`): int8
    recipes lose about a third of top-1, float16 loses nothing. With a budget of 5 points, a search
    that honours the budget must hand back a model without integer quantization, and that model must
    measure within the budget. This holds whether the search picks float16 or keeps the float model
    (a search that never returns a slower model may do either), and whatever the candidates or
    their order; a search that hands back an int8 model here, or one outside the budget, fails."""
    model = cancelling_matmuls(tmp_path / "m.onnx")
    samples = np.random.default_rng(0).normal(0, 1, (64, 1, 64)).astype(np.float32)
    labels = labelled_by_the_model(model, samples, "x")
    np.savez(tmp_path / "d.npz", x=samples, __labels__=labels)
    data = DatasetSource(tmp_path / "d.npz", "npz")
    # The premise, measured apart from the search: int8 breaks a 5-point budget on this model.
    int8 = quantize(model, QuantizationSpec(mode="dynamic"), tmp_path / "int8").model_path
    assert _top1(int8, samples, labels) < 0.9, "the model no longer defeats int8; the test proves nothing"
    stages: list[Any] = []
    outcome, measured = auto_quantize(
        model,
        QuantizationSpec(mode="auto", accuracy_tolerance=0.05),
        tmp_path / "work",
        EvaluationSpec(latency_runs=3, warmup_runs=1),
        calibration=data,
        data=data,
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )
    chosen_ops = {n.op_type for n in onnx.load(str(outcome.model_path)).graph.node}
    assert not chosen_ops & INTEGER_QUANTIZED_OPS, chosen_ops
    accuracy = measured.comparison["accuracy"]
    assert accuracy["original"] == 1.0 and accuracy["delta"] >= -0.05, accuracy
    search = outcome.details["auto"]
    assert [c["name"] for c in search["candidates"]] == [c.name for c in CANDIDATES]
    assert outcome.preprocessing_steps[0] == f"auto: chose {search['chosen']}"
    onnx.checker.check_model(str(outcome.model_path))
    fractions = [f for s, f in stages if s == "quantizing"]
    assert fractions == sorted(fractions) and fractions[-1] > 0.9
    # Only the chosen candidate's files are kept.
    assert len(list((tmp_path / "work").iterdir())) == 1


def test_auto_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        auto_quantize(
            conv_classifier(tmp_path / "m.onnx"),
            QuantizationSpec(mode="auto"),
            tmp_path,
            EvaluationSpec(),
            calibration=None,
            data=None,
        )
    assert info.value.code == "invalid_recipe"
