"""Tiny ONNX models whose outputs hold known kinds (detections, scores per position behind a wrong declared
shape, embeddings, maps), built in code for the fidelity judge's tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGE = 32  # detector input side, pixels
STRIDE = 2  # one row per cell of a 16 x 16 grid: 256 rows


def _save(graph: onnx.GraphProto, path: Path, opset: int = 13) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _const(name: str, values: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def row_detector(
    path: Path,
    *,
    columns: bool = False,
    score_bias: float = 0.0,
    x_shift: float = 0.0,
    seed: int = 0,
) -> Path:
    """A one-class detector head: Conv -> Relu -> Conv (6 channels per cell) -> Reshape [B, 6, N] -> Transpose
    [B, N, 6]; the first four columns -> Sigmoid -> times [32, 32, 8, 8] (centre x, y in pixels, width and
    height up to 8 pixels), the last two -> Sigmoid (objectness, class score); Concat -> `detections`
    [B, N, 6], rows (x, y, w, h, obj, cls) as YOLOX/YOLOv5 write them. Per-row argmax over such a row is the
    x or y column nearly always, whatever the scores and boxes do.

    `columns`: the YOLOv8 layout instead, boxes [B, 4, N] and class scores [B, 1, N] concatenated on axis 1
    into `detections` [B, 5, N] (no objectness). `score_bias` (added to the objectness logit, or the class
    logit in columns) and `x_shift` (pixels added to x) damage the output the way quantization can (scores
    shrink, boxes move) on the same weights: a candidate with known errors."""
    rng = np.random.default_rng(seed)
    hidden = 8
    w1 = rng.normal(0, 0.6, size=(hidden, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.6, size=(6, hidden, 1, 1)).astype(np.float32)
    b2 = np.array([0, 0, 0, 0, 1.0, 1.0], np.float32)  # scores around 0.5: about half the rows pass 0.3
    cells = (IMAGE // STRIDE) ** 2
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[STRIDE, STRIDE]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["head"], name="head"),
        helper.make_node("Reshape", ["head", "head_shape"], ["flat"], name="to_rows"),  # [B, 6, N]
    ]
    if columns:  # boxes are channels 0-3 of [B, 6, N], the class score channel 5
        axis, source, score_start, out_shape = 1, "flat", 5, ["batch", 5, cells]
        along = [1, 4, 1]
        bias = np.full((1, 1, 1), score_bias)
    else:
        axis, source, score_start, out_shape = 2, "rows", 4, ["batch", cells, 6]
        along = [1, 1, 4]
        bias = np.reshape([score_bias, 0.0], (1, 1, 2))
        nodes.append(helper.make_node("Transpose", ["flat"], ["rows"], name="transpose", perm=[0, 2, 1]))
    nodes += [
        helper.make_node("Slice", [source, "zero", "four", "axis"], ["raw_boxes"], name="box_columns"),
        helper.make_node("Sigmoid", ["raw_boxes"], ["unit_boxes"], name="box_sigmoid"),
        helper.make_node("Mul", ["unit_boxes", "box_scale"], ["scaled_boxes"], name="box_pixels"),
        helper.make_node("Add", ["scaled_boxes", "box_shift"], ["boxes"], name="box_shift"),
        helper.make_node("Slice", [source, "score_start", "six", "axis"], ["raw_scores"], name="score_columns"),
        helper.make_node("Add", ["raw_scores", "score_bias"], ["biased_scores"], name="score_bias"),
        helper.make_node("Sigmoid", ["biased_scores"], ["scores"], name="score_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["detections"], name="concat", axis=axis),
    ]
    graph = helper.make_graph(
        nodes,
        "row_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, out_shape)],
        initializer=[
            _const("w1", w1),
            _const("w2", w2),
            _const("b2", b2),
            _const("head_shape", [0, 6, cells], np.int64),
            _const("zero", [0], np.int64),
            _const("four", [4], np.int64),
            _const("score_start", [score_start], np.int64),
            _const("six", [6], np.int64),
            _const("axis", [axis], np.int64),
            _const("box_scale", np.reshape([IMAGE, IMAGE, 8.0, 8.0], along)),
            _const("box_shift", np.reshape([x_shift, 0.0, 0.0, 0.0], along)),
            _const("score_bias", bias),
        ],
    )
    return _save(graph, path)


def detector_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` samples for `row_detector`, stacked [n, 1, 3, 32, 32]."""
    return np.random.default_rng(seed).random((n, 1, 3, IMAGE, IMAGE), dtype=np.float32)


def sequence_first_recognizer(path: Path, *, steps: int = 8, features: int = 16, classes: int = 10) -> Path:
    """A text recognizer's head that lies about its output: `x` [1, T, F] -> MatMul -> [1, T, C] -> Transpose
    -> [T, 1, C] -> Softmax over the last axis -> `probs`, which the model declares [1, seqlen] (as one real
    recognizer does; ONNX Runtime runs it and returns [T, 1, C])."""
    w = np.random.default_rng(1).normal(0, 1, size=(features, classes)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="classifier"),
        helper.make_node("Transpose", ["logits"], ["time_first"], name="time_first", perm=[1, 0, 2]),
        helper.make_node("Softmax", ["time_first"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence_first_recognizer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, steps, features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, "seqlen"])],
        initializer=[_const("w", w)],
    )
    return _save(graph, path)


def kinds_zoo(path: Path, *, classes: int = 5, hidden: int = 8) -> Path:
    """One image model [B, 3, 8, 8] with an output of every other kind:
    - `probs` [B, C]: Gemm -> Softmax (classification);
    - `class_id` [B]: ArgMax of the logits (classification, class ids);
    - `embedding` [B, H]: GlobalAveragePool -> Flatten (a pooled vector);
    - `unit_embedding` [B, H]: that vector divided by its ReduceL2 norm (a normalised vector);
    - `features` [B, H, 8, 8]: Conv -> Relu (a map);
    - `segmentation` [B, C, 8, 8]: Conv -> Softmax over the channels (per-pixel class scores);
    - `value` [B, 1]: Gemm (one number per sample, nothing says what)."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten"),
        helper.make_node("ReduceL2", ["embedding"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node("Div", ["embedding", "norm"], ["unit_embedding"], name="normalise"),
        helper.make_node("Gemm", ["embedding", "fc", "fc_b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        helper.make_node("ArgMax", ["logits"], ["class_id"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Conv", ["features", "w_seg"], ["seg_logits"], name="seg_conv"),
        helper.make_node("Softmax", ["seg_logits"], ["segmentation"], name="seg_softmax", axis=1),
        helper.make_node("Gemm", ["embedding", "reg"], ["value"], name="regressor"),
    ]
    graph = helper.make_graph(
        nodes,
        "kinds_zoo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("class_id", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("unit_embedding", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", hidden, 8, 8]),
            helper.make_tensor_value_info("segmentation", TensorProto.FLOAT, ["batch", classes, 8, 8]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[
            _const("w1", rng.normal(0, 0.5, size=(hidden, 3, 3, 3))),
            _const("fc", rng.normal(0, 1.0, size=(hidden, classes))),
            _const("fc_b", np.zeros(classes)),
            _const("w_seg", rng.normal(0, 1.0, size=(classes, hidden, 1, 1))),
            _const("reg", rng.normal(0, 1.0, size=(hidden, 1))),
        ],
    )
    return _save(graph, path)
