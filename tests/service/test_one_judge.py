"""One judge of fidelity (issue #21): the search, the evaluation's per-output rows, the warnings, the
HTML report and the API say the same thing about one model, because one accumulator scored it and
`core.judge` decided, once.

- A pick that agrees with float on top-1 for every sample while its whole-tensor cosine is 0.985: within
  budget for the search, faithful in its row, no warning, "within" on the page (the page once called such
  an output "poor" by a cosine threshold of its own).
- A top-1 drop of exactly the tolerance (0.80 -> 0.79 at 0.01, which is 0.010000000000000009 in floats):
  within tolerance for the engine, the API and the page (the page once drew it as a red card).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.result import AutoSearch, JobResult, QuantizationFacts
from service.database import transaction
from service.jobs import state
from service.reports.html import render_report_html
from tests.service.helpers import conv_model_and_data
from worker.engine.data import model_inputs
from worker.engine.evaluate import Evaluation, evaluate
from worker.engine.fidelity import FidelityEvaluator

CLASSES = 10
SAMPLES = 100
SPEC = EvaluationSpec(latency_runs=3, warmup_runs=0, max_samples=None)


def _model(path: Path, nodes: list[onnx.NodeProto], inputs: int, initializers: list[onnx.TensorProto]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def _result(measured: Evaluation, verdict: str | None = None) -> JobResult:
    auto = None
    if verdict is not None:
        auto = AutoSearch(verdict=verdict, chosen="static QDQ, per-channel, MinMax", objective="latency")  # type: ignore[arg-type]
    return JobResult(
        original=measured.original,
        quantized=measured.quantized,
        comparison=measured.comparison,
        warnings=measured.warnings,
        machine=measured.machine,
        evaluation=measured.facts,
        quantization=QuantizationFacts(mode="static", auto=auto),
    )


def _page(result: JobResult, recipe: dict[str, Any]) -> str:
    return render_report_html(
        {"id": "j", "status": "succeeded", "stage": "done", "recipe": recipe, "result": result.model_dump(mode="json")}
    )


def _accuracy_card(page: str) -> str:
    found = re.search(r'Accuracy \(top1\)</div>(<div class="big[^"]*">[^<]*</div>)', page)
    assert found, "no accuracy card"
    return found.group(1)


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DatasetSource]:
    """Float: the identity on class scores with a wide top-1 margin. The "quantized" model adds a fixed
    offset per class, scaled so that the whole-tensor cosine is 0.985 and no argmax moves."""
    tmp = tmp_path_factory.mktemp("agreeing")
    rng = np.random.default_rng(0)
    x = rng.random((SAMPLES, CLASSES), dtype=np.float32)
    x[np.arange(SAMPLES), rng.integers(0, CLASSES, SAMPLES)] += 9.0
    direction = rng.normal(size=CLASSES).astype(np.float32)
    direction /= np.abs(direction).max()

    def cosine(scale: float) -> float:
        y = x + scale * direction
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))

    lo, hi = 0.0, 4.0  # cosine falls as the offset grows: bisect for 0.985
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cosine(mid) > 0.985 else (lo, mid)
    offset = numpy_helper.from_array((lo * direction).reshape(1, CLASSES), "offset")
    reference = _model(tmp / "float.onnx", [helper.make_node("Identity", ["x"], ["logits"])], CLASSES, [])
    candidate = _model(tmp / "q.onnx", [helper.make_node("Add", ["x", "offset"], ["logits"])], CLASSES, [offset])
    np.savez(tmp / "eval.npz", x=x[:, None, :])
    return reference, candidate, DatasetSource(tmp / "eval.npz", "npz")


def test_a_pick_that_agrees_on_top1_with_cosine_0985_is_within_budget_everywhere(
    agreeing: tuple[Path, Path, DatasetSource],
) -> None:
    reference, candidate, data = agreeing
    searched = FidelityEvaluator(reference, data, model_inputs(reference), None, 0.01, max_samples=SAMPLES).score(
        candidate
    )
    measured = evaluate(reference, candidate, SPEC, data=data)
    row = measured.comparison.outputs[0]
    assert row.cosine == pytest.approx(0.985, abs=0.001)  # a whole-tensor cosine under 0.99 ...
    assert row.kind == "classification" and row.metric == "agreement" and row.value == 1.0  # ... every top-1 agrees
    assert row.budgeted and row.faithful is True
    # The search and the evaluation judged it the same, from the same accumulator.
    assert searched.within_budget and searched.outputs[0] == row
    assert measured.comparison.fidelity is not None and measured.comparison.fidelity.within_budget
    assert not any("fidelity" in w or "'logits'" in w for w in measured.warnings), measured.warnings
    page = _page(_result(measured, "quantized"), {"mode": "auto"})
    assert "Quantized.</strong> Chose static QDQ, per-channel, MinMax" in page and "within budget" in page
    assert "outside budget" not in page and "poor" not in page
    assert '<span class="good">within</span>' in page and "0.985" in page  # the cosine is shown, not judged


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DatasetSource]:
    """One input holds two sets of class scores: float reads the first (80 of 100 labels right), the
    "quantized" model the second (79 right)."""
    tmp = tmp_path_factory.mktemp("edge")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, SAMPLES)
    right = np.zeros((SAMPLES, CLASSES), np.float32)
    right[np.arange(SAMPLES), labels] = 1.0
    wrong = np.roll(right, 1, axis=1)
    first = np.where(np.arange(SAMPLES)[:, None] < 80, right, wrong)
    second = np.where(np.arange(SAMPLES)[:, None] < 79, right, wrong)
    x = np.concatenate([first, second], axis=1)[:, None, :]

    def half(start: int) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array(np.array([start], np.int64), "starts"),
            numpy_helper.from_array(np.array([start + CLASSES], np.int64), "ends"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ]

    def sliced(path: Path, start: int) -> Path:
        node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["logits"])
        return _model(path, [node], 2 * CLASSES, half(start))

    np.savez(tmp / "eval.npz", x=x, __labels__=labels)
    return sliced(tmp / "float.onnx", 0), sliced(tmp / "q.onnx", CLASSES), DatasetSource(tmp / "eval.npz", "npz")


def test_a_drop_of_exactly_the_tolerance_is_within_it_for_the_engine_the_page_and_the_api(
    edge: tuple[Path, Path, DatasetSource], client: TestClient, tmp_path: Path
) -> None:
    reference, candidate, data = edge
    measured = evaluate(reference, candidate, SPEC, data=data, accuracy_tolerance=0.01)
    accuracy = measured.comparison.accuracy
    assert accuracy is not None and (accuracy.original, accuracy.quantized) == (0.80, 0.79)
    assert -(accuracy.delta or 0) > 0.01  # 0.010000000000000009: a naive comparison calls it beyond
    assert accuracy.within_tolerance is True
    assert measured.score.within_budget and measured.comparison.fidelity is not None
    assert measured.comparison.fidelity.within_budget and measured.comparison.fidelity.metric == "top1_drop"
    assert not any("accuracy dropped" in w for w in measured.warnings)
    searched = FidelityEvaluator(reference, data, model_inputs(reference), None, 0.01, max_samples=SAMPLES).score(
        candidate
    )
    assert searched.within_budget
    result = _result(measured)
    page = _page(result, {"mode": "static", "accuracy_tolerance": 0.01})
    assert _accuracy_card(page) == '<div class="big">79.00%</div>'  # not the red card of a drop beyond it

    # The API serves the stored result with the same verdicts, and the page it renders agrees.
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]}).json()
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        attempt = state.claim(session, job["id"], 60)
        assert attempt is not None and state.succeed(session, job["id"], attempt, result.model_dump(mode="json"))
    served = client.get(f"/v1/jobs/{job['id']}").json()["result"]
    assert served == result.model_dump(mode="json")
    assert served["comparison"]["accuracy"]["within_tolerance"] is True
    assert served["comparison"]["fidelity"]["within_budget"] is True
    html = client.get(f"/v1/jobs/{job['id']}/report.html").text
    assert _accuracy_card(html) == '<div class="big">79.00%</div>'
