"""Mode auto: the search over recipes and the choice within the accuracy budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from tests.onnx_models import conv_classifier
from worker.engine import DatasetSource, EngineError, EvaluationSpec, QuantizationSpec
from worker.engine.auto import CANDIDATES, Candidate, Trial, auto_quantize, choose
from worker.engine.results import EvaluationOutcome
from worker.engine.spec import CandidateProgress


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


def test_auto_search_on_a_classifier(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx", hidden=16)
    samples = np.random.default_rng(0).random((8, 1, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", input=samples, __labels__=np.arange(8) % 4)
    data = DatasetSource(tmp_path / "d.npz", "npz")
    stages: list[Any] = []
    outcome, measured = auto_quantize(
        model,
        QuantizationSpec(mode="auto", accuracy_tolerance=1.0),
        tmp_path / "work",
        EvaluationSpec(latency_runs=3, warmup_runs=1),
        calibration=data,
        data=data,
        progress=lambda stage, fraction: stages.append((stage, fraction)),
        on_candidate=lambda candidate: stages.append(candidate),
    )
    search = outcome.details["auto"]
    tried = [s for s in stages if not isinstance(s, tuple)]
    n = len(CANDIDATES)
    assert tried == [CandidateProgress(i + 1, n, c.name) for i, c in enumerate(CANDIDATES)] + [None]
    stages = [s for s in stages if isinstance(s, tuple)]
    assert [c["name"] for c in search["candidates"]] == [c.name for c in CANDIDATES]
    assert search["chosen"] in [c["name"] for c in search["candidates"] if c["within_budget"]]
    assert outcome.preprocessing_steps[0] == f"auto: chose {search['chosen']}"
    onnx.checker.check_model(str(outcome.model_path))
    assert measured.comparison["accuracy"] is not None
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
