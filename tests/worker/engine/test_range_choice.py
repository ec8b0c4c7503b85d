"""The calibration method per tensor: on a tensor whose rare outliers barely matter downstream, a Percentile
range beats MinMax on the output, and the choice takes it for that tensor only; histograms give the
percentile range without keeping activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from core.jobfile import DatasetSource
from core.recipe import CalibrationMethod, Objective, Recipe
from worker.engine.candidates import candidates_for
from worker.engine.quantize import quantize
from worker.engine.range_choice import _Histogram

SAMPLES = 16


def _outlier_model(path: Path, *, cin: int = 4, mid: int = 16, cout: int = 8, seed: int = 0) -> Path:
    """conv1 -> Add(s) -> conv2: the Add's output `a` holds, through input `s`, one rare spike per sample in
    channel 0, which conv2 all but ignores. Its MinMax range is the spike's and crushes every other value."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (mid, cin, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (cout, mid, 3, 3)).astype(np.float32)
    w2[:, 0] *= 0.01
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **conv),
        helper.make_node("Add", ["c1", "s"], ["a"], name="add"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", **conv),
    ]
    graph = helper.make_graph(
        nodes,
        "outliers",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 16, 16]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, mid, 16, 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 16, 16])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(mid, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _data(path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (SAMPLES, 1, 4, 16, 16)).astype(np.float32)
    s = np.zeros((SAMPLES, 1, 16, 16, 16), np.float32)
    for i in range(SAMPLES):
        s[i, 0, 0, rng.integers(16), rng.integers(16)] = 200.0
    np.savez(path, x=x, s=s)
    return {"x": x, "s": s}


def _error(model: Path, quantized: Path, data: dict[str, np.ndarray]) -> float:
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    err = sig = 0.0
    for i in range(SAMPLES):
        feeds = {k: v[i] for k, v in data.items()}
        r, q = ref.run(None, feeds)[0], got.run(None, feeds)[0]
        err += float(np.sum((r - q) ** 2))
        sig += float(np.sum(r**2))
    return err / sig


def test_percentile_is_chosen_for_the_outlier_tensor_only(tmp_path: Path) -> None:
    model = _outlier_model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d.npz")
    source = DatasetSource(tmp_path / "d.npz", "npz")
    # Op types Conv only: `s` feeds no quantized node, `a` is conv2's quantized input.
    base = {"op_types_to_quantize": ("Conv",), "percentile": 99.9, "bias_correction": False}
    minmax = quantize(model, Recipe(**base), tmp_path / "minmax", calibration=source)
    chosen = quantize(model, Recipe(**base, calibration_per_tensor=True), tmp_path / "chosen", calibration=source)
    facts = chosen.facts.range_choice
    assert minmax.facts.range_choice is None and facts is not None
    assert facts.tensors_changed == 1 and facts.tensors_tried >= 2
    changed = [c for c in facts.choices if c.method != "minmax"]
    assert [c.tensor for c in changed] == ["a"] and changed[0].method == "percentile 99.9"
    assert all(c.method == "minmax" for c in facts.choices if c.tensor != "a")
    assert _error(model, chosen.model_path, data) < _error(model, minmax.model_path, data) / 5
    check = chosen.facts.check
    assert check is not None and check.onnx_checker and check.ran_on_sample


def test_histogram_percentile_range() -> None:
    hist = _Histogram(-1.0, 100.0)
    rng = np.random.default_rng(0)
    for _ in range(10):  # batch by batch: only counts are kept
        x = rng.uniform(-1.0, 1.0, 10_000).astype(np.float32)
        x[:3] = 100.0  # 0.03 % outliers
        hist.add(x)
    lo, hi = hist.percentile_range(99.9)
    assert -1.0 <= lo < -0.9 and 0.9 < hi < 1.2
    assert hist.percentile_range(99.999)[1] > 99.0


def test_auto_starts_minmax_candidates_from_ranges_chosen_per_tensor() -> None:
    found = candidates_for(
        {"Conv": 4, "Relu": 4, "Add": 2}, token_inputs=False, int8="vnni", objective=Objective.LATENCY
    )
    static = [c for c in found if c.changes.get("mode") == "static"]
    minmax = [c for c in static if c.changes.get("calibration_method", CalibrationMethod.MINMAX) == "minmax"]
    assert minmax and all(c.changes.get("calibration_per_tensor") for c in minmax)
    assert all(c.changes.get("bias_correction") for c in static)  # every static candidate corrects biases
