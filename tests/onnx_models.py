"""Tiny ONNX models built in code, shared by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save_graph(graph: onnx.GraphProto, path: Path, opset: int = 13) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = 8
    return _save(model, path)


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
) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: input `input` [batch,C,H,W] float32,
    output `logits` [batch, num_classes]. The batch dimension is symbolic ("batch")."""
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
    graph = helper.make_graph(
        nodes,
        "conv_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[
            numpy_helper.from_array(w, "conv_w"),
            numpy_helper.from_array(b, "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
        ],
    )
    return _save_graph(graph, path, opset)


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
    return _save_graph(graph, path, opset)


def cancelling_matmuls(
    path: Path, *, features: int = 64, num_classes: int = 10, difference: float = 0.03, seed: int = 0
) -> Path:
    """A classifier whose answer lies in the small difference of two large products: `x` [batch,
    features] -> MatMul(w1) - MatMul(w2) -> `logits` [batch, num_classes], where w2 = w1 + noise of
    `difference` times w1's scale. Any int8 weight or activation quantization rounds away more than
    that difference (top-1 falls by a third or more); float16 keeps it (top-1 unchanged, cosine
    above 0.9999). So for an accuracy budget of a few points, the only honest answers keep the
    weights in float: float16, or the float model itself."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, size=(features, num_classes)).astype(np.float32)
    w2 = (w1 + rng.normal(0, difference, size=w1.shape)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm_b"),
        helper.make_node("Sub", ["a", "b"], ["logits"], name="difference"),
    ]
    graph = helper.make_graph(
        nodes,
        "cancelling_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save_graph(graph, path)


def labelled_by_the_model(model: Path, inputs: np.ndarray, input_name: str) -> np.ndarray:
    """Labels equal to the float model's own top-1 on each sample: its accuracy is exactly 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.array([int(np.argmax(session.run(None, {input_name: x})[0])) for x in inputs], dtype=np.int64)


INTEGER_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "MatMulNBits",
    }
)


def random_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """N samples stacked on a new leading axis, float32 in [0, 1)."""
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
