"""Pre-processing steps, their fallbacks, and the recipe checks the service calls at submission."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import worker.engine.preprocess as prep
from core.errors import RuleError
from core.recipe import Recipe
from tests.onnx_models import conv_classifier
from tests.worker.engine import pitfall_models as pm
from worker.engine.checks import check_recipe, check_recipe_for_model, model_facts, model_size
from worker.engine.fp16 import remove_cast_round_trips, restore_output_types


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_fold_constants_keeps_results(tmp_path: Path) -> None:
    src = pm.constant_weights(tmp_path / "cw.onnx")
    model = onnx.load(str(src))
    assert prep.fold_constants(model) == 3
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    assert {i.name for i in model.graph.initializer} == {"w1", "b1", "w2"}
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "folded.onnx"))
    feed = {"x": np.random.default_rng(0).random((2, 16), dtype=np.float32)}
    np.testing.assert_allclose(_run(tmp_path / "folded.onnx", feed), _run(src, feed), rtol=1e-6)


def test_prepare_upgrades_opset_and_records_steps(tmp_path: Path) -> None:
    src = conv_classifier(tmp_path / "c11.onnx", opset=11)
    seen: list[float] = []
    out = prep.prepare_model(src, tmp_path / "prep", target_opset=13, optimize=True, progress=seen.append)
    assert out.opset == 13 and out.path.parent == tmp_path / "prep"
    assert any("Upgraded the opset from 11 to 13" in s for s in out.steps)
    assert any("quant_pre_process" in s for s in out.steps)
    loaded = onnx.load(str(out.path))
    assert next(i.version for i in loaded.opset_import if i.domain == "") == 13
    assert loaded.graph.value_info  # shapes were inferred
    assert seen[-1] == 1.0
    feed = {"input": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}
    np.testing.assert_allclose(_run(out.path, feed), _run(src, feed), rtol=1e-5, atol=1e-6)


def test_shape_inference_fallback_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = conv_classifier(tmp_path / "c.onnx")

    def fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(prep, "_quant_pre_process", fails)
    out = prep.prepare_model(src, tmp_path / "a")
    steps = " ".join(out.steps)
    assert "Symbolic shape inference failed (Incomplete symbolic shape inference); retried without it." in steps
    assert "failed too" in steps and "Ran plain ONNX shape inference." in steps
    assert out.path.name == "model.inferred.onnx" and out.path.is_file()

    def infer_fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[ShapeInferenceError] boom")

    monkeypatch.setattr(prep, "_infer_shapes", infer_fails)
    out = prep.prepare_model(src, tmp_path / "b")
    assert "ONNX shape inference failed ([ShapeInferenceError] boom)" in " ".join(out.steps)
    assert out.warnings and out.path.is_file()


def test_optimisation_failure_is_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    src = conv_classifier(tmp_path / "c.onnx")
    real = prep._quant_pre_process

    def logs_error(src_path, dst, **kwargs):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            logging.getLogger("onnxruntime.quantization.shape_inference").error(
                "ONNX Runtime Model Optimization Failed! Consider rerun with option `--skip_optimization'."
            )
            return real_qpp(*a, **k)

        import onnxruntime.quantization.shape_inference as si

        real_qpp = si.quant_pre_process
        monkeypatch.setattr(si, "quant_pre_process", run)
        try:
            return real(src_path, dst, **kwargs)
        finally:
            monkeypatch.setattr(si, "quant_pre_process", real_qpp)

    monkeypatch.setattr(prep, "_quant_pre_process", logs_error)
    out = prep.prepare_model(src, tmp_path / "p", optimize=True)
    assert any("ORT graph optimisation failed (ONNX Runtime Model Optimization Failed!" in s for s in out.steps)


def test_opset_upgrade_failure_is_quantization_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = conv_classifier(tmp_path / "c.onnx", opset=11)

    def fails(model, target):  # type: ignore[no-untyped-def]
        raise RuntimeError("No Adapter For Foo")

    monkeypatch.setattr(prep, "upgrade_opset", fails)
    with pytest.raises(RuleError) as err:
        prep.prepare_model(src, tmp_path / "p", target_opset=13)
    assert err.value.code == "quantization_failed" and err.value.detail["step"] == "opset_upgrade"
    assert "No Adapter For Foo" in err.value.message


def test_external_data_kept_through_every_step(tmp_path: Path) -> None:
    src = pm.external_data_mlp(tmp_path / "src" / "ext.onnx")
    out = prep.prepare_model(src, tmp_path / "p", target_opset=14, optimize=True)
    assert out.external
    proto = onnx.load(str(out.path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    feed = {"x": np.random.default_rng(0).random((2, 64), dtype=np.float32)}
    np.testing.assert_allclose(_run(out.path, feed), _run(src, feed), rtol=1e-5, atol=1e-6)


def test_model_facts(tmp_path: Path) -> None:
    facts = model_facts(pm.if_subgraph(tmp_path / "if.onnx"))
    assert facts.has_subgraphs and {"then_mm", "else_mm", "mm1"} <= set(facts.node_names)
    assert facts.op_counts["MatMul"] == 3 and facts.opset == 13 and not facts.external_files
    path = pm.external_data_mlp(tmp_path / "e" / "ext.onnx")
    ext = model_facts(path)
    assert ext.external_files == ("ext.onnx.data",)
    assert model_size(path, ext) > path.stat().st_size
    assert model_facts(pm.qat_model(tmp_path / "qat.onnx")).qdq_nodes == 3


def test_check_recipe_for_submission() -> None:
    check_recipe(Recipe(mode="auto"))  # auto is accepted at submission
    check_recipe(Recipe(mode="weight_only", weight_type="int4", block_size=32))
    check_recipe(Recipe(activation_type="uint16", weight_type="int16"))
    for bad in (
        {"format": "qoperator", "activation_type": "int16"},
        {"weight_type": "uint4"},
        {"mode": "dynamic", "weight_type": "int16"},
        {"mode": "dynamic", "activation_type": "int8"},
        {"mode": "weight_only", "weight_type": "int16"},
        {"mode": "weight_only", "op_types_to_quantize": ["Conv"]},
        {"calibration_batch_size": 0},
        {"max_calibration_samples": 0},
        {"percentile": 120.0},
    ):
        with pytest.raises(RuleError) as err:
            check_recipe(Recipe.from_mapping(bad))
        assert err.value.code == "invalid_recipe", bad
        assert err.value.detail.get("field"), bad


def test_check_recipe_for_model_warnings(tmp_path: Path) -> None:
    facts = model_facts(conv_classifier(tmp_path / "c.onnx"))
    warnings = check_recipe_for_model(Recipe(op_types_to_quantize=["Conv", "MatMul"]), facts, has_calibration=True)
    assert warnings == ["op_types_to_quantize lists MatMul, which the model does not contain."]


def test_fp16_cleanups_remove_round_trips_and_restore_outputs() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Exp", ["x"], ["e32"], name="exp"),
        helper.make_node("Cast", ["e32"], ["e16"], name="c16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["e16"], ["e32b"], name="c32", to=TensorProto.FLOAT),
        helper.make_node("Log", ["e32b"], ["l32"], name="log"),
        helper.make_node("Cast", ["l32"], ["y"], name="out16", to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    assert remove_cast_round_trips(model, {"exp", "log"}, set()) == 2
    assert [n.name for n in model.graph.node] == ["exp", "log", "out16"]
    assert list(model.graph.node[1].input) == ["e32"]
    assert restore_output_types(model, {"y": TensorProto.FLOAT}) == 1
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([12.0, 13.0], np.float32)}
    )[0]
    np.testing.assert_allclose(out, [12.0, 13.0], rtol=1e-6)  # exp(13) = 4.4e5 never went through float16
