"""evaluate(): fidelity, accuracy, latency and warnings on tiny models built in code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RuleError
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.lifecycle import Stage
from core.recipe import FidelitySpec
from tests.onnx_models import conv_classifier, matmul_mlp, random_inputs
from worker.engine.evaluate import Evaluation, LatencyMeter, evaluate, size_on_disk
from worker.engine.machine import machine_info

FAST = EvaluationSpec(latency_runs=5, warmup_runs=1, max_samples=None)
N = 20
CLASSES = 10


def _json(outcome: Evaluation) -> dict[str, Any]:
    """The evaluation's part of the result, as stored."""
    return {
        "original": outcome.original.model_dump(mode="json"),
        "quantized": outcome.quantized.model_dump(mode="json"),
        "comparison": outcome.comparison.model_dump(mode="json"),
        "warnings": outcome.warnings,
        "machine": outcome.machine.model_dump(mode="json"),
        "evaluation": outcome.facts.model_dump(mode="json"),
    }


def _perturbed(src: Path, dst: Path, scale: float, seed: int = 0) -> Path:
    """A stand-in for a quantized model: the same graph with noise added to every weight."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        noisy = (arr + rng.normal(0, scale, arr.shape) * np.abs(arr).mean()).astype(arr.dtype)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(dst))
    return dst


def _matmul_chain(path: Path, n: int, dim: int = 256) -> Path:
    """`n` MatMuls by one orthogonal weight (values neither blow up nor underflow): work grows with n."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, dim)))
    nodes, prev = [], "x"
    for i in range(n):
        out = "y" if i == n - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out], name=f"mm{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(q.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _direct_scores(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    original = conv_classifier(d / "original.onnx", num_classes=CLASSES)
    return {
        "original": original,
        "close": _perturbed(original, d / "close.onnx", 0.01),
        "far": conv_classifier(d / "far.onnx", num_classes=CLASSES, seed=7),
    }


@pytest.fixture(scope="module")
def labelled(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """20 samples; labels are the original's argmax for the first 15 and wrong for the last 5."""
    x = random_inputs((3, 8, 8), N, seed=3)
    pred = _direct_scores(models["original"], x).argmax(axis=1)
    labels = pred.copy()
    labels[15:] = (pred[15:] + 1) % CLASSES
    d = tmp_path_factory.mktemp("data")
    stacked = d / "stacked.npz"  # (N, 1, 3, 8, 8): one sample per feed
    np.savez(stacked, input=x[:, None], __labels__=labels)
    batched = d / "batched.npz"  # (N, 3, 8, 8): split into batches of batch_size
    np.savez(batched, input=x, __labels__=labels)
    return {
        "x": x,
        "labels": labels,
        "stacked": DatasetSource(stacked, "npz"),
        "batched": DatasetSource(batched, "npz"),
    }


@pytest.mark.parametrize(("form", "batch_size"), [("stacked", 1), ("batched", 4)])
def test_accuracy_is_exact_and_equals_a_direct_onnxruntime_run(
    models: dict[str, Path], labelled: dict[str, object], form: str, batch_size: int
) -> None:
    spec = EvaluationSpec(latency_runs=5, warmup_runs=1, batch_size=batch_size, max_samples=None)
    outcome = evaluate(models["original"], models["close"], spec, data=labelled[form])  # type: ignore[arg-type]
    result = _json(outcome)
    x, labels = labelled["x"], labelled["labels"]
    assert isinstance(x, np.ndarray) and isinstance(labels, np.ndarray)

    assert result["original"]["accuracy"] == 0.75  # exact by construction
    for which in ("original", "close"):
        scores = _direct_scores(models[which], x)
        top1 = float(np.mean(scores.argmax(axis=1) == labels))
        top5 = float(np.mean((np.argsort(-scores, axis=1)[:, :5] == labels[:, None]).any(axis=1)))
        key = "original" if which == "original" else "quantized"
        assert result[key]["accuracy"] == pytest.approx(top1, abs=1e-12)
        assert result[key]["top5_accuracy"] == pytest.approx(top5, abs=1e-12)
    acc = result["comparison"]["accuracy"]
    assert acc["metric"] == "top1"
    assert acc["original"] == 0.75
    assert acc["delta"] == pytest.approx(acc["quantized"] - acc["original"])
    assert acc["top5_original"] == result["original"]["top5_accuracy"]
    assert acc["samples"] == N
    assert result["evaluation"]["samples"] == N
    assert result["original"]["batch_size"] == batch_size
    assert result["quantized"]["batch_size"] == batch_size


def test_identical_models_give_perfect_fidelity_and_contract_shaped_json(
    models: dict[str, Path], labelled: dict[str, object]
) -> None:
    outcome = evaluate(models["original"], models["original"], FAST, data=labelled["stacked"])  # type: ignore[arg-type]
    result = _json(outcome)
    json.dumps(result, allow_nan=False)  # plain JSON: no numpy types, no NaN/inf
    assert set(result) == {"original", "quantized", "comparison", "warnings", "machine", "evaluation"}
    for key in ("original", "quantized"):
        metrics = result[key]
        assert {"size_bytes", "latency_ms", "throughput_per_s", "accuracy"} <= set(metrics)
        assert set(metrics["latency_ms"]) == {"p50", "p90", "p99", "mean", "std", "min", "max"}
        lat = metrics["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert metrics["throughput_per_s"] == pytest.approx(metrics["batch_size"] * 1000 / lat["mean"])
        assert metrics["runs"] == 5 and metrics["session_create_ms"] > 0
        assert metrics["size_bytes"] == models["original"].stat().st_size
    comparison = result["comparison"]
    assert set(comparison) == {"size_ratio", "speedup_p50", "outputs", "fidelity", "accuracy"}
    assert comparison["size_ratio"] == 1.0
    assert comparison["outputs"] == [
        {
            "name": "logits",
            "kind": "classification",
            "kind_source": "inferred",
            "kind_reason": "produced by Gemm, no Softmax: [1, 10] read as class scores",
            "metric": "agreement",
            "value": 1.0,
            "min": 0.99,
            "budgeted": False,  # labelled data and no fidelity floor in the recipe: the top-1 drop decides
            "faithful": True,
            "cosine": 1.0,
            "mean_cosine": 1.0,
            "sqnr_db": 200.0,
            "max_abs_error": 0.0,
            "mean_abs_error": 0.0,
            "top1_agreement": 1.0,
            "problem": None,
            "detection": None,
        }
    ]
    assert comparison["fidelity"]["within_budget"] is True
    assert comparison["accuracy"]["delta"] == 0.0
    assert not any("outside the fidelity budget" in w or "accuracy dropped" in w for w in result["warnings"])
    assert any("not smaller than the original" in w for w in result["warnings"])  # the same file twice
    machine = result["machine"]
    assert machine["onnxruntime"] == ort.__version__
    assert machine["execution_provider"] == "CPUExecutionProvider"
    assert "avx2" in machine["cpu_features"] or "asimd" in machine["cpu_features"]
    assert result["evaluation"]["interleaved"] is True
    assert set(outcome.timings_s) >= {"evaluation_sessions", "evaluation_data", "evaluation_latency"}


def test_a_different_model_is_flagged_for_fidelity_and_accuracy(
    models: dict[str, Path], labelled: dict[str, object]
) -> None:
    data = labelled["stacked"]
    assert isinstance(data, DatasetSource)
    outcome = evaluate(models["original"], models["far"], FAST, data=data, accuracy_tolerance=0.01)
    out = outcome.comparison.outputs[0]
    assert out.cosine is not None and out.cosine < 0.99
    assert out.top1_agreement is not None and out.top1_agreement < 0.99 and out.faithful is False
    # With labels and no fidelity floor, the top-1 drop is the budget: the output is shown, not counted.
    assert not out.budgeted and outcome.comparison.fidelity is not None
    assert outcome.comparison.fidelity.metric == "top1_drop" and not outcome.comparison.fidelity.within_budget
    assert not any("Output 'logits' is outside" in w for w in outcome.warnings)
    floor = evaluate(models["original"], models["far"], FAST, data=data, budget=FidelitySpec(), accuracy_tolerance=1)
    assert floor.comparison.outputs[0].budgeted and floor.comparison.outputs[0].faithful is False
    assert any("Output 'logits' is outside the fidelity budget: agreement" in w for w in floor.warnings)
    assert outcome.comparison.accuracy is not None and outcome.comparison.accuracy.within_tolerance is False
    delta = outcome.comparison.accuracy.delta
    assert delta is not None and delta < -0.01
    assert any("accuracy dropped" in w and "75.0%" in w for w in outcome.warnings)


def test_random_inputs_reused_calibration_and_progress(models: dict[str, Path]) -> None:
    seen: list[tuple[Stage, float]] = []
    outcome = evaluate(
        models["original"],
        models["close"],
        EvaluationSpec(latency_runs=3, warmup_runs=1, batch_size=2, max_samples=8),
        data=None,
        reused_calibration=True,
        progress=lambda stage, fraction: seen.append((stage, fraction)),
    )
    result = _json(outcome)
    assert result["evaluation"]["inputs"] == "random"
    assert result["evaluation"]["samples"] == 8
    assert result["original"]["batch_size"] == 2
    assert result["original"]["accuracy"] is None and result["comparison"]["accuracy"] is None
    assert result["comparison"]["outputs"][0]["cosine"] > 0.99
    assert any("random inputs" in w for w in result["warnings"])
    assert any("reused the calibration samples" in w for w in result["warnings"])
    assert {s for s, _ in seen} == {Stage.EVALUATING}
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0


def test_max_samples_bounds_the_data_pass(models: dict[str, Path], labelled: dict[str, object]) -> None:
    spec = EvaluationSpec(latency_runs=2, warmup_runs=0, max_samples=8)
    outcome = evaluate(models["original"], models["original"], spec, data=labelled["stacked"])  # type: ignore[arg-type]
    assert outcome.facts.samples == 8
    assert outcome.comparison.accuracy is not None and outcome.comparison.accuracy.samples == 8


def test_runs_of_both_models_are_interleaved(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = ort.InferenceSession

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: str, *args: object, **kwargs: object) -> None:
            super().__init__(path, *args, **kwargs)
            self.spy_name = Path(path).stem

        def run(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            calls.append(self.spy_name)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    spec = EvaluationSpec(latency_runs=4, warmup_runs=2, max_samples=3)
    evaluate(models["original"], models["close"], spec, data=None)
    # Data pass: both models on each of the 3 feeds; then 6 rounds alternating their order.
    assert calls[:6] == ["original", "close"] * 3
    o, c = "original", "close"
    assert calls[6:] == [o, c, c, o, o, c, c, o, o, c, c, o]


def test_a_model_doing_twenty_times_the_work_is_slower(tmp_path: Path) -> None:
    light = _matmul_chain(tmp_path / "light.onnx", 2)
    heavy = _matmul_chain(tmp_path / "heavy.onnx", 40)
    spec = EvaluationSpec(latency_runs=50, warmup_runs=3, batch_size=8, max_samples=4)
    outcome = evaluate(light, heavy, spec, data=None)
    assert outcome.original.latency_ms is not None and outcome.quantized.latency_ms is not None
    p50_light = outcome.original.latency_ms.p50
    p50_heavy = outcome.quantized.latency_ms.p50
    # 20x the work; even with Python overhead and a busy machine it is several times slower.
    assert p50_heavy > 3 * p50_light
    assert outcome.comparison.speedup_p50 is not None and outcome.comparison.speedup_p50 < 1 / 3
    assert (outcome.original.throughput_per_s or 0) > (outcome.quantized.throughput_per_s or 0)
    assert any(w.startswith("The quantized model is slower than the original") for w in outcome.warnings)
    assert outcome.original.batch_size == 8


def test_the_time_bound_is_respected_and_reported(tmp_path: Path) -> None:
    heavy = _matmul_chain(tmp_path / "heavy.onnx", 40)
    machine_info()  # the CPU probe is cached per process; keep its one-time cost out of the timing
    spec = EvaluationSpec(latency_runs=1_000_000, warmup_runs=2, max_samples=4, max_seconds=1.0)
    started = time.perf_counter()
    outcome = evaluate(heavy, heavy, spec, data=None)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0
    runs = outcome.facts.latency_runs
    assert runs is not None and 1 <= runs < 1_000_000
    assert outcome.original.runs == runs == outcome.quantized.runs
    assert outcome.facts.stopped_early is True
    assert any("time limit" in w and f"{runs} of 1000000 timed runs" in w for w in outcome.warnings)


def test_a_model_onnxruntime_cannot_load_fails_with_its_message(models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(RuleError) as info:
        evaluate(models["original"], broken, FAST, data=None)
    assert info.value.code == "evaluation_failed"
    assert "quantized model" in info.value.message
    assert info.value.detail["ort_message"] in info.value.message


def test_size_on_disk_counts_external_data(tmp_path: Path) -> None:
    src = conv_classifier(tmp_path / "src.onnx")
    model = onnx.load(str(src))
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(
        model,
        str(ext),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    weights = ext.parent / "w.bin"
    assert weights.stat().st_size > 0
    assert size_on_disk(ext) == ext.stat().st_size + weights.stat().st_size
    assert size_on_disk(src) == src.stat().st_size


def test_latency_meter_times_several_candidates_in_one_loop(tmp_path: Path) -> None:
    """compare_many gives one p50 per candidate, in order, each from the same interleaved loop as
    float's: a model doing about 500 times the work measures slower than float, the float model
    itself about as fast, whatever their order."""
    small = matmul_mlp(tmp_path / "small.onnx", features=64, hidden=16)
    big = matmul_mlp(tmp_path / "big.onnx", features=64, hidden=8192)
    feed = {"x": np.random.default_rng(0).random((8, 64), dtype=np.float32)}
    meter = LatencyMeter(small, feed, threads=1, warmup_runs=2)
    ref, (p_big, p_same) = meter.compare_many([big, small], 30)
    assert p_big > 5 * ref and p_big > 5 * p_same
    ref, (p_same, p_big) = meter.compare_many([small, big], 30)
    assert p_big > 5 * ref and p_big > 5 * p_same
    assert meter.compare(big, 10)[1] > meter.compare(small, 10)[1]
