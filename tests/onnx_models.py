"""Tiny ONNX models built in code, shared by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def conv_classifier(
    path: Path,
    *,
    opset: int = 13,
    channels: int = 3,
    size: int = 8,
    num_classes: int = 4,
    hidden: int = 8,
    seed: int = 0,
    input_shape: list[int | str | None] | None = None,
    matmul_head: bool = False,
) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: input `input` [batch,C,H,W] float32,
    output `logits` [batch, num_classes]. The batch dimension is symbolic ("batch") unless
    `input_shape` declares the input otherwise (pooling takes any height and width); `matmul_head`
    ends in MatMul + Add instead of Gemm, as many exporters write it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, size=(hidden, channels, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(hidden,)).astype(np.float32)
    fc_w = rng.normal(0, 0.5, size=(num_classes, hidden)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, size=(num_classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"], name="pool"),
        helper.make_node("Flatten", ["pool_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    if matmul_head:
        fc_w = fc_w.T.copy()
        nodes[-1:] = [
            helper.make_node("MatMul", ["flat", "fc_w"], ["fc_mm"], name="fc"),
            helper.make_node("Add", ["fc_mm", "fc_b"], ["logits"], name="fc_bias"),
        ]
    graph = helper.make_graph(
        nodes,
        "conv_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape or ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[
            numpy_helper.from_array(w, "conv_w"),
            numpy_helper.from_array(b, "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = 8
    return _save(model, path)


def paddle_classifier(path: Path, *, seed: int = 0) -> Path:
    """The classifier as Paddle2ONNX exports it: unknown dims written as dim_value -1 and 0 (input
    [-1, 3, 0, -1]; ONNX Runtime takes -1 as unknown and refuses data for 0), MatMul + Add head."""
    return conv_classifier(path, seed=seed, input_shape=[-1, 3, 0, -1], matmul_head=True)


def matmul_mlp(path: Path, *, opset: int = 13, features: int = 16, hidden: int = 32, seed: int = 0) -> Path:
    """MatMul -> Add -> Relu -> MatMul: input `x` [batch, features], output `y` [batch, features]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(features, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, size=(hidden,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, size=(hidden, features)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu1"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = 8
    return _save(model, path)


def random_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """N samples stacked on a new leading axis, float32 in [0, 1)."""
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
