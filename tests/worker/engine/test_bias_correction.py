"""Fast bias correction: int8 rounding that shifts channel means is taken back by the biases (Conv, Gemm,
MatMul+Add; QDQ and QOperator), the model stays valid, layers left in float keep their bias, and the result
says what was done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.jobfile import DatasetSource
from core.recipe import BIAS_CORRECTION_SAMPLES, Mode, Objective, Recipe, RecipeError
from tests.worker.engine.pitfall_models import external_data_mlp
from tests.worker.engine.test_auto import OpsMeter, _run
from worker.engine import refine
from worker.engine.auto import _apply
from worker.engine.bias_correction import BiasShifts, measure_shifts
from worker.engine.calibration import calibrate
from worker.engine.candidates import candidates_for
from worker.engine.checks import model_facts
from worker.engine.data import model_inputs
from worker.engine.quantize import Reuse, prepare_for, quantize
from worker.engine.spec import no_progress


def _skewed_conv(path: Path, *, cin: int = 8, cout: int = 16, size: int = 8, seed: int = 0, head: bool = True) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Gemm whose weights are many small positive values and one big one
    per output channel: per-tensor int8 rounds the small ones to zero, and on positive inputs every channel's
    mean drops."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 0.004, (cout, cin, 3, 3)).astype(np.float32)
    w[:, 0, 1, 1] = rng.uniform(0.5, 1.0, cout)
    fc = rng.uniform(0.0, 0.004, (10, cout)).astype(np.float32)
    fc[:, 0] = 1.0
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    if not head:  # the feature map itself is the output
        nodes = nodes[:2]
        nodes[1].output[0] = "y"
    out = [1, 10] if head else [1, cout, size, size]
    graph = helper.make_graph(
        nodes,
        "skewed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), "b"),
            numpy_helper.from_array(fc, "fc"),
            numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _skewed_matmul(path: Path, *, features: int = 16, hidden: int = 24, seed: int = 0) -> Path:
    """A 3-D MatMul + Add (no Gemm fusion) with the same skew."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 0.004, (features, hidden)).astype(np.float32)
    w[0] = rng.uniform(0.5, 1.0, hidden)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "skewed_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, hidden])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(hidden, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _positive(path: Path, shape: tuple[int, ...], n: int = 24, seed: int = 1) -> DatasetSource:
    x = np.random.default_rng(seed).uniform(0.5, 1.0, (n, *shape)).astype(np.float32)
    np.savez(path, x=x)
    return DatasetSource(path, "npz")


def _error(model: Path, quantized: Path, source: DatasetSource) -> float:
    """Output error energy over signal energy, on samples the correction did not measure (seed 7)."""
    x = np.random.default_rng(7).uniform(0.5, 1.0, (16, *np.load(source.path)["x"].shape[1:])).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    err = sig = 0.0
    for sample in x:
        r, q = ref.run(None, {"x": sample})[0], got.run(None, {"x": sample})[0]
        err += float(np.sum((r - q) ** 2))
        sig += float(np.sum(r**2))
    return err / sig


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_bias_correction_takes_back_the_mean_shift_of_int8_rounding(tmp_path: Path, fmt: str) -> None:
    model = _skewed_conv(tmp_path / "m.onnx")
    data = _positive(tmp_path / "d.npz", (1, 8, 8, 8))
    plain = quantize(model, Recipe(format=fmt, bias_correction=False), tmp_path / "plain", calibration=data)
    fixed = quantize(model, Recipe(format=fmt, bias_correction=True), tmp_path / "fixed", calibration=data)
    assert plain.facts.bias_correction is None
    facts = fixed.facts.bias_correction
    assert facts is not None and facts.applied and facts.biases_changed == 2 and facts.layers_considered == 2
    assert facts.samples == BIAS_CORRECTION_SAMPLES
    before, after = _error(model, plain.model_path, data), _error(model, fixed.model_path, data)
    assert before > 1e-2 and after < before / 100
    onnx.checker.check_model(str(fixed.model_path))
    check = fixed.facts.check
    assert check is not None and check.onnx_checker and check.ran_on_sample
    # Still an int8 model of the same shape: only the biases moved.
    assert fixed.facts.quantized_op_counts == plain.facts.quantized_op_counts


def test_bias_correction_of_a_matmul_goes_to_the_add_after_it(tmp_path: Path) -> None:
    model = _skewed_matmul(tmp_path / "m.onnx")
    data = _positive(tmp_path / "d.npz", (1, 4, 16))
    plain = quantize(model, Recipe(bias_correction=False), tmp_path / "plain", calibration=data)
    fixed = quantize(model, Recipe(bias_correction=True), tmp_path / "fixed", calibration=data)
    facts = fixed.facts.bias_correction
    assert facts is not None and facts.biases_changed == 1
    assert _error(model, fixed.model_path, data) < _error(model, plain.model_path, data) / 10


def test_layers_left_in_float_keep_their_bias(tmp_path: Path) -> None:
    model = _skewed_conv(tmp_path / "m.onnx")
    data = _positive(tmp_path / "d.npz", (1, 8, 8, 8))
    out = quantize(model, Recipe(nodes_to_exclude=("conv",), bias_correction=True), tmp_path / "q", calibration=data)
    facts = out.facts.bias_correction
    assert facts is not None and facts.biases_changed == 1
    quantized = onnx.load(str(out.model_path))
    kept = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    assert np.array_equal(kept["b"], original["b"])  # the float conv's bias, untouched


def test_twins_and_search_steps_share_one_measurement(tmp_path: Path) -> None:
    model = _skewed_conv(tmp_path / "m.onnx")
    data = _positive(tmp_path / "d.npz", (1, 8, 8, 8))
    spec = Recipe(per_channel=True, bias_correction=True)
    prepared = prepare_for(model, spec, model_facts(model), tmp_path / "prep", no_progress)
    ranges = calibrate(prepared.path, spec, data, model_inputs(model), tmp_path / "calib")
    memo: dict[object, object] = {}
    first = quantize(model, spec, tmp_path / "a", calibration=data, reuse=Reuse(prepared, ranges, memo))
    assert len(memo) == 1
    twin = Recipe(per_channel=True, format="qoperator", nodes_to_exclude=("fc",), bias_correction=True)
    second = quantize(model, twin, tmp_path / "b", calibration=data, reuse=Reuse(prepared, ranges, memo))
    assert len(memo) == 1  # measured once
    assert first.facts.bias_correction is not None and first.facts.bias_correction.biases_changed == 2
    assert second.facts.bias_correction is not None and second.facts.bias_correction.biases_changed == 1


def test_bias_correction_is_a_static_option() -> None:
    assert Recipe(bias_correction=True).corrects_bias and Recipe(mode="auto", bias_correction=True).corrects_bias
    assert not Recipe().corrects_bias  # a plain static job gives quantize_static's model unless asked
    assert not Recipe(mode=Mode.DYNAMIC).corrects_bias
    with pytest.raises(RecipeError) as info:
        Recipe(mode="dynamic", bias_correction=True)
    assert info.value.info.detail["field"] == "bias_correction"


def test_mode_auto_corrects_biases_unless_the_job_says_not_to() -> None:
    first = candidates_for({"Conv": 2, "Relu": 2}, token_inputs=False, int8="vnni", objective=Objective.LATENCY)[0]
    assert _apply(Recipe(), first).corrects_bias
    assert not _apply(Recipe(bias_correction=False), first).corrects_bias


def test_models_with_external_weights_are_quantized_without_refining(tmp_path: Path) -> None:
    model = external_data_mlp(tmp_path / "mlp.onnx", features=16, hidden=16)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((4, 1, 16), dtype=np.float32))
    spec = Recipe(bias_correction=True, calibration_per_tensor=True)
    out = quantize(model, spec, tmp_path / "q", calibration=DatasetSource(tmp_path / "d.npz", "npz"))
    bias, ranges = out.facts.bias_correction, out.facts.range_choice
    assert bias is not None and not bias.applied and bias.skipped is not None and "external data" in bias.skipped
    assert ranges is not None and ranges.skipped is not None and "external data" in ranges.skipped


def test_a_correction_that_does_not_lower_the_output_error_is_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _skewed_conv(tmp_path / "m.onnx")
    data = _positive(tmp_path / "d.npz", (1, 8, 8, 8))

    def wrong(*args: object, **kwargs: object) -> BiasShifts:  # shifts measured on the wrong data, say
        shifts = measure_shifts(*args, **kwargs)  # type: ignore[arg-type]
        shifts.biases = {name: bias - 10.0 for name, bias in shifts.biases.items()}
        return shifts

    monkeypatch.setattr(refine, "measure_shifts", wrong)
    plain = quantize(model, Recipe(), tmp_path / "plain", calibration=data)
    out = quantize(model, Recipe(bias_correction=True), tmp_path / "q", calibration=data)
    facts = out.facts.bias_correction
    assert facts is not None and not facts.applied and facts.biases_changed == 0
    assert facts.output_error is not None and facts.baseline_error is not None
    assert facts.output_error > facts.baseline_error and facts.skipped is not None
    assert _error(model, out.model_path, data) == pytest.approx(_error(model, plain.model_path, data))


def test_mode_auto_tries_a_start_with_its_biases_as_calibrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correction that helps on the calibration data's output error may still cost the budget (an argmax
    a hair from a tie): the search tries the start as calibrated before any mixed precision."""
    model = _skewed_conv(tmp_path / "m.onnx", head=False)
    measured = refine._measured_shifts

    def misleading(*args: Any, **kwargs: Any) -> Any:
        shifts, _, _, ranges = measured(*args, **kwargs)
        shifts.biases = {name: bias - 10.0 for name, bias in shifts.biases.items()}
        return shifts, 1.0, 0.5, ranges  # reported as helping

    monkeypatch.setattr(refine, "_measured_shifts", misleading)
    data = {"x": np.random.default_rng(1).uniform(0.5, 1.0, (16, 1, 8, 8, 8)).astype(np.float32)}
    outcome, _, search = _run(tmp_path, model, data, OpsMeter())
    static = [c for c in search["candidates"] if c["recipe"]["mode"] == "static" and not c["error"]]
    assert static and not any(c["within_budget"] for c in static)
    assert search["verdict"] == "quantized" and search["chosen"].endswith("biases as calibrated")
    assert search["effective_recipe"]["bias_correction"] is False
    assert outcome.facts.bias_correction is None
