"""The models issue #22 was filed over, built in code for mode auto's end-to-end tests and `make bench`.

Each fixture is one of the failures the issue measured on real trained models, small enough that a job on it
takes a few seconds (`bench=True`: larger, for timings that mean something):
- `rows_detector`: a detector whose output rows are (x, y, w, h, obj, cls), as YOLOX/YOLOv5 write them; its
  output must be judged as detections, not by argmax over a row;
- `wrong_shape`: a text recognizer that declares its output `[1, seqlen]` and returns `[T, 1, C]`;
- `qoperator_recognizer`: a recognizer whose neck reads a float tensor with an outlier channel through a
  LayerNormalization that removes it: ONNX Runtime's QDQ quantizer quantizes LayerNormalization's input (and
  the Squeeze/Transpose before it), its QOperator quantizer leaves both in float, so QOperator keeps what QDQ
  loses;
- `hardswish`: a PP-LCNet-style mobile classifier, HardSwish after every conv (each one a float island between
  int8 convs): int8 is slower than float on many CPUs;
- `if_branches`: a streaming audio model whose Conv and MatMul sit in the branches of an `If` on the sample rate;
- `transformer_neck`: a text recognizer, a CNN with a transformer neck and a CTC head.

The weights look trained: every conv's batch norm is folded in with statistics measured on the fixture's data
(so activations have the per-channel spread and the per-channel weight scales trained models have), and the
classification heads are fitted (softmax regression) to read what the data holds, so that like trained models
they decide most positions or cells by a margin. Nothing is downloaded.

`FIXTURES` names them with what each is built to reward (the whole-model variants `make bench` compares auto's
pick with) and the output kind its budgeted output must get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.ocr_models import _Paddle, _probe, glyph_lines, softmax_regression, text_lines
from tests.onnx_models import _save

OPSET = 17  # LayerNormalization and HardSwish as ops


def _finish(
    b: _Paddle, path: Path, graph: onnx.GraphProto, feeds: dict[str, np.ndarray], opset: int = OPSET
) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = 8
    return b.fold_batch_norm(model, feeds)


# ---------------------------------------------------------------------------------------------------
# A detector with output rows (x, y, w, h, obj, cls)

DETECTOR_STRIDE = 8


def detector_scenes(
    n: int, *, size: int, seed: int = 0
) -> tuple[np.ndarray, list[list[tuple[float, float, float, float, int]]]]:
    """N images [n, 1, 3, size, size] (0..1, a textured background) with 2 to 5 filled rectangles each, and
    each image's objects (centre x, centre y, width, height in pixels, class: 1 for a wide rectangle)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 1, 3, size, size), np.float32)
    objects: list[list[tuple[float, float, float, float, int]]] = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = rng.uniform(0.3, 0.6, 3)[:, None, None] + 0.08 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(2, 9) * yy)
        img = img + rng.normal(0, 0.03, (3, size, size))
        found = []
        for _ in range(int(rng.integers(2, 6))):
            w, h = (int(v) for v in rng.integers(size // 10, size // 3, 2))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            img[:, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, 3)[:, None, None]
            found.append((x0 + w / 2, y0 + h / 2, float(w), float(h), int(w > h)))
        images[i, 0] = np.clip(img, 0, 1)
        objects.append(found)
    return images, objects


def rows_detector(path: Path, *, size: int = 64, channels: tuple[int, int, int] = (16, 32, 48), seed: int = 0) -> Path:
    """A one-scale YOLOX-style detector: input `images` [1, 3, size, size], output `detections` [1, N, 6] with
    N = (size / 8)^2 rows (x, y, w, h, obj, cls), boxes in pixels.

    Backbone: three stride-2 3x3 convs with Relu and a 3x3 conv at 1/8, batch norm folded. Head: a 1x1 conv
    to six channels per cell, Reshape [1, 6, N] and Transpose [1, N, 6]; x and y are (cell + Sigmoid) * 8,
    w and h Sigmoid * 32; objectness and class Sigmoid. The objectness and class channels are fitted to the
    rectangles of `detector_scenes` (objectness: the cells a rectangle covers; the one class: the cells near
    its centre), so a few rows per image score high, as a trained detector's do."""
    b = _Paddle(seed)
    c0, c1, c2 = channels
    x = b.op("Relu", [b.conv("images", 3, c0, stride=2, layer="stem")])
    x = b.op("Relu", [b.conv(x, c0, c1, stride=2, layer="dark2")])
    x = b.op("Relu", [b.conv(x, c1, c2, stride=2, layer="dark3")])
    feat = b.op("Relu", [b.conv(x, c2, c2, layer="neck")])
    grid = size // DETECTOR_STRIDE
    cells = grid * grid
    head_w = b.rng.normal(0, 0.5 / np.sqrt(c2), (6, c2, 1, 1)).astype(np.float32)
    raw = b.op("Conv", [feat, b.init("head.w", head_w), b.init("head.b", np.zeros(6, np.float32))], "head")
    flat = b.op("Reshape", [raw, b.init("rows_shape", np.array([0, 6, cells], np.int64))])
    rows = b.op("Transpose", [flat], perm=[0, 2, 1])
    gy, gx = np.mgrid[0:grid, 0:grid]
    offset = np.zeros((1, cells, 4), np.float32)
    offset[0, :, 0], offset[0, :, 1] = gx.ravel() * DETECTOR_STRIDE, gy.ravel() * DETECTOR_STRIDE
    scale = np.array([DETECTOR_STRIDE, DETECTOR_STRIDE, 4 * DETECTOR_STRIDE, 4 * DETECTOR_STRIDE], np.float32)
    axis = b.init("axis2", np.array([2], np.int64))
    box = b.op("Slice", [rows, b.init("zero", np.array([0], np.int64)), b.init("four", np.array([4], np.int64)), axis])
    box = b.op(
        "Add",
        [b.op("Mul", [b.op("Sigmoid", [box]), b.init("box_scale", scale.reshape(1, 1, 4))]), b.init("grid", offset)],
    )
    score = b.op(
        "Slice", [rows, b.init("four_", np.array([4], np.int64)), b.init("six", np.array([6], np.int64)), axis]
    )
    b.op("Concat", [box, b.op("Sigmoid", [score])], "detections", axis=2)
    images, objects = detector_scenes(48, size=size, seed=seed + 1000)
    graph = helper.make_graph(
        b.nodes,
        "rows_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", cells, 6])],
        initializer=b.inits,
    )
    model = _finish(b, path, graph, {"images": images[:16, 0]})
    # Fit objectness and class on the head's input, cell by cell, image by image.
    features, obj, centre = [], [], []
    cells_at = (np.stack([gx.ravel(), gy.ravel()], axis=1) + 0.5) * DETECTOR_STRIDE
    for i in range(len(images)):
        features.append(_probe(model, feat, {"images": images[i]})[0].reshape(c2, cells).T)
        o, c = np.zeros(cells, np.int64), np.zeros(cells, np.int64)
        for cx, cy, bw, bh, _ in objects[i]:  # objectness: cells the box covers; class: its central half
            dx, dy = np.abs(cells_at[:, 0] - cx), np.abs(cells_at[:, 1] - cy)
            o[(dx < bw / 2) & (dy < bh / 2)] = 1
            c[(dx < bw / 4 + DETECTOR_STRIDE / 2) & (dy < bh / 4 + DETECTOR_STRIDE / 2)] = 1
        obj.append(o)
        centre.append(c)
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits["head.w"]).copy()
    bias = np.zeros(6, np.float32)
    for channel, labels in ((4, np.concatenate(obj)), (5, np.concatenate(centre))):
        fitted, fitted_bias = softmax_regression(np.concatenate(features), labels, 2, steps=400)
        w[channel, :, 0, 0] = fitted[:, 1] - fitted[:, 0]
        bias[channel] = fitted_bias[1] - fitted_bias[0]
    inits["head.w"].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "head.w"))
    inits["head.b"].CopyFrom(numpy_helper.from_array(bias, "head.b"))
    return _save(model, path)


def detector_data(n: int, *, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return {"images": detector_scenes(n, size=size, seed=seed)[0]}


# ---------------------------------------------------------------------------------------------------
# Text recognizers: a wrong declared shape; QOperator keeps what QDQ loses


def _recognizer(
    path: Path,
    *,
    height: int,
    width: int,
    channels: tuple[int, int, int],
    dim: int,
    time_first: bool,
    outlier: float,
    neck: bool,
    block: bool = True,
    classes: int = 40,
    seed: int = 0,
) -> Path:
    """A CRNN-style recognizer, input `x` [1, 3, height, width], T = width / 4 steps, `classes` classes (0 the
    CTC blank). Backbone: a stride-2 stem conv and two stride-(2, 1) convs with HardSwish, then a conv over the
    remaining height and two columns to height 1 (as CRNN's last conv), HardSwish. Squeeze, Transpose to a
    sequence [1, T, C].

    `outlier`: a BatchNormalization after the last HardSwish (not foldable into the conv) shifts channel 0 by
    this much (a massive activation, as trained networks have before a normalisation); with `neck` a
    LayerNormalization over the channels (its weight for channel 0 near zero: trained to ignore it) and a
    pre-LN transformer block (single-head attention, a HardSwish MLP) follow, then a final LayerNormalization.
    ONNX Runtime's QOperator quantizer has no quantized BatchNormalization, HardSwish or LayerNormalization and
    leaves that stretch (and the Squeeze and Transpose between) in float, so the outlier is gone before
    anything is quantized; its QDQ quantizer quantizes the normalisations' inputs and outputs: one int8 range
    for the outlier and every other channel. Head: MatMul + Add fitted to the glyphs of
    `glyph_lines`, Softmax over the classes.

    `time_first`: the probabilities come out [T, 1, C] (Transpose after the head) while the model declares
    `[1, seqlen]`, as one real recognizer does."""
    b = _Paddle(seed)
    c0, c1, c2 = channels
    x = b.op("HardSwish", [b.conv("x", 3, c0, stride=2, layer="conv0")])
    x = b.op("HardSwish", [b.conv(x, c0, c1, stride=(2, 1), layer="conv1")])
    x = b.op("HardSwish", [b.conv(x, c1, c1, stride=(2, 1), layer="conv2")])
    last = (height // 8, 2)
    x = b.op("HardSwish", [b.conv(x, c1, c2, kernel=last, stride=last, pad=False, layer="conv3")])
    if outlier:
        shift = b.rng.normal(0, 0.3, c2).astype(np.float32)
        shift[0] = outlier
        norm = [
            b.init("bn.scale", b.rng.uniform(0.5, 1.5, c2).astype(np.float32)),
            b.init("bn.shift", shift),
            b.init("bn.mean", np.full(c2, 0.5, np.float32)),
            b.init("bn.var", np.ones(c2, np.float32)),
        ]
        x = b.op("BatchNormalization", [x, *norm], epsilon=1e-5)
    seq = b.op("Transpose", [b.op("Squeeze", [x, b.init("axes2", np.array([2], np.int64))])], perm=[0, 2, 1])
    if neck:

        def layer_norm(h: str, n: int, name: str, ignore_first: bool = False) -> str:
            gamma = b.rng.uniform(0.8, 1.2, n).astype(np.float32)
            if ignore_first:
                gamma[0] = 1e-3
            beta_ = b.rng.normal(0, 0.05, n).astype(np.float32)
            return b.op(
                "LayerNormalization", [h, b.init(f"{name}.w", gamma), b.init(f"{name}.b", beta_)], axis=-1, epsilon=1e-5
            )

        h = b.linear(layer_norm(seq, c2, "ln_in", ignore_first=True), c2, dim, "proj")
    if neck and block:
        n = layer_norm(h, dim, "ln0")
        q, k, v = (b.linear(n, dim, dim, f"attn_{t}") for t in "qkv")
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
        scores = b.op("Mul", [scores, b.init("attn_scale", np.array(1 / np.sqrt(dim), np.float32))])
        attn = b.op("MatMul", [b.op("Softmax", [scores], axis=2), v])
        h = b.op("Add", [h, b.linear(attn, dim, dim, "attn_out", gain=0.3)])
        n = layer_norm(h, dim, "ln1")
        mlp = b.linear(b.op("HardSwish", [b.linear(n, dim, 2 * dim, "mlp_in")]), 2 * dim, dim, "mlp_out", gain=0.3)
        h = b.op("Add", [h, mlp])
    if neck and block:
        seq = layer_norm(h, dim, "ln_out")
    elif neck:
        seq = b.op("Relu", [h])
    width_of = dim if neck else c2
    logits = b.head(seq, width_of, classes, "head")
    steps = width // 4
    if time_first:
        b.op("Softmax", [b.op("Transpose", [logits], perm=[1, 0, 2])], "probs", axis=-1)
        declared: list[int | str] = [1, "seqlen"]
    else:
        b.op("Softmax", [logits], "probs", axis=-1)
        declared = ["batch", steps, classes]
    images, labels = glyph_lines(max(48, 2048 // steps), height=height, width=width, glyphs=6, seed=seed + 1000)
    graph = helper.make_graph(
        b.nodes,
        "recognizer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, declared)],
        initializer=b.inits,
    )
    model = _finish(b, path, graph, {"x": images[:32, 0]})
    model = b.fit_heads(model, {"x": images[:, 0]}, labels)
    return _save(model, path)


def wrong_shape_recognizer(path: Path, *, bench: bool = False) -> Path:
    """A conv recognizer whose probabilities come out [T, 1, C] while it declares `[1, seqlen]`."""
    width = 256 if bench else 128
    channels = (32, 64, 128) if bench else (16, 32, 64)
    return _recognizer(
        path, height=32, width=width, channels=channels, dim=0, time_first=True, outlier=0.0, neck=False, seed=1
    )


def qoperator_recognizer(path: Path, *, bench: bool = False) -> Path:
    """A recognizer with a transformer neck whose LayerNormalization removes an outlier channel that QDQ
    quantizes before it (see `_recognizer`)."""
    width = 256 if bench else 128
    channels = (32, 64, 128) if bench else (16, 32, 64)
    return _recognizer(
        path,
        height=32,
        width=width,
        channels=channels,
        dim=64 if bench else 48,
        time_first=False,
        outlier=200.0,
        neck=True,
        block=False,
        seed=2,
    )


def recognizer_data(n: int, *, bench: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": text_lines(n, height=32, width=256 if bench else 128, glyphs=6, seed=seed)}


def transformer_neck(path: Path, *, bench: bool = False) -> Path:
    """A CNN with a transformer neck (a pre-LN block: single-head attention and a HardSwish MLP) and a CTC head."""
    width = 256 if bench else 128
    channels = (32, 64, 128) if bench else (16, 32, 64)
    return _recognizer(
        path,
        height=32,
        width=width,
        channels=channels,
        dim=64 if bench else 48,
        time_first=False,
        outlier=0.0,
        neck=True,
        seed=5,
    )


# ---------------------------------------------------------------------------------------------------
# HardSwish everywhere


def hardswish_classifier(path: Path, *, bench: bool = False, seed: int = 3) -> Path:
    """PP-LCNet in miniature: a stride-2 stem conv, then depthwise 3x3 + pointwise 1x1 blocks (every second
    depthwise with stride 2), each conv followed by the HardSwish op, then GlobalAveragePool, Flatten and a
    fitted Gemm classifier over 10 classes. Input `x` [1, 3, size, size], output `probs` (Softmax)."""
    size = 96 if bench else 64
    widths = (16, 32, 32, 64, 64) if bench else (16, 24, 32, 48)
    b = _Paddle(seed)
    x = b.op("HardSwish", [b.conv("x", 3, widths[0], stride=2, layer="stem")])
    c = widths[0]
    for i, out in enumerate(widths[1:]):
        x = b.op("HardSwish", [b.conv(x, c, c, groups=c, stride=2 if i % 2 else 1, layer=f"dw{i}")])
        x = b.op("HardSwish", [b.conv(x, c, out, kernel=1, layer=f"pw{i}")])
        c = out
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    fc = b.init("fc.w", np.zeros((10, c), np.float32))
    fc_b = b.init("fc.b", np.zeros(10, np.float32))
    b.op("Softmax", [b.op("Gemm", [pooled, fc, fc_b], transB=1)], "probs", axis=-1)
    images, labels = _classes(128, size, seed + 1000)
    graph = helper.make_graph(
        b.nodes,
        "hardswish_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=b.inits,
    )
    model = _finish(b, path, graph, {"x": images[:16, 0]})
    feats = np.concatenate([_probe(model, pooled, {"x": images[i]}) for i in range(len(images))])
    w, bias = softmax_regression(feats, labels, 10, steps=400)
    inits = {t.name: t for t in model.graph.initializer}
    inits["fc.w"].CopyFrom(numpy_helper.from_array(w.T.astype(np.float32), "fc.w"))
    inits["fc.b"].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "fc.b"))
    return _save(model, path)


def _classes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N images [n, 1, 3, size, size] of ten kinds (a stripe frequency and a tint each) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, 1, 3, size, size), np.float32)
    for i, k in enumerate(labels):
        tint = np.array([0.2 + 0.06 * k, 0.8 - 0.06 * k, 0.5], np.float32)[:, None, None]
        stripes = 0.25 * np.sin((3 + 2 * k) * np.pi * (xx * np.cos(k) + yy * np.sin(k)) + rng.uniform(0, 6))
        images[i, 0] = np.clip(tint + stripes[None] + rng.normal(0, 0.08, (3, size, size)), 0, 1)
    return (images - 0.5) / 0.25, labels


def hardswish_data(n: int, *, bench: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": _classes(n, 96 if bench else 64, seed)[0]}


# ---------------------------------------------------------------------------------------------------
# Compute inside If branches


def if_branches(path: Path, *, bench: bool = False, seed: int = 4) -> Path:
    """A streaming voice-activity model as PyTorch exports it at opset 15: inputs `audio` [1, samples], `state`
    [1, hidden] and `sr` (int64 scalar). Everything that computes sits in the branches of an `If` on
    `sr == 16000`: each branch holds a stack of 1-D convs with Relu (the first strided 2 at 16 kHz), a mean over
    time and a MatMul with the state, weights in `Constant` nodes as the exporter writes them. Outputs `prob`
    [1, 1] (Sigmoid) and `state_out` [1, hidden]. Conv weights are He-scaled with per-channel gains, as trained
    weights after batch norm folding."""
    rng = np.random.default_rng(seed)
    channels, hidden, layers = (64, 64, 4) if bench else (32, 32, 3)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name)
        )

    def branch(tag: str, stride: int) -> onnx.GraphProto:
        p = f"/_model/{tag}"
        nodes: list[onnx.NodeProto] = []
        x, c_in = "/Unsqueeze_output_0", 1
        for i in range(layers):
            kernel = 5 if i == 0 else 3
            gain = rng.uniform(0.5, 1.5, (channels, 1, 1))
            w = (rng.normal(0, np.sqrt(2 / (c_in * kernel)), (channels, c_in, kernel)) * gain).astype(np.float32)
            bias = rng.normal(0, 0.1, channels).astype(np.float32)
            nodes += [const(f"{p}/conv{i}.weight", w), const(f"{p}/conv{i}.bias", bias)]
            nodes.append(
                helper.make_node(
                    "Conv",
                    [x, f"{p}/conv{i}.weight", f"{p}/conv{i}.bias"],
                    [f"{p}/Conv_{i}_output_0"],
                    name=f"{p}/Conv_{i}",
                    strides=[stride if i == 0 else 1],
                    pads=[kernel // 2, kernel // 2],
                )
            )
            nodes.append(
                helper.make_node("Relu", [f"{p}/Conv_{i}_output_0"], [f"{p}/Relu_{i}_output_0"], name=f"{p}/Relu_{i}")
            )
            x, c_in = f"{p}/Relu_{i}_output_0", channels
        proj = rng.normal(0, np.sqrt(1 / (channels + hidden)), (channels + hidden, hidden)).astype(np.float32)
        nodes += [
            const(f"{p}/proj.weight", proj),
            helper.make_node("ReduceMean", [x], [f"{p}/feat"], name=f"{p}/ReduceMean", axes=[2], keepdims=0),
            helper.make_node("Concat", [f"{p}/feat", "state"], [f"{p}/joined"], name=f"{p}/Concat", axis=1),
            helper.make_node(
                "MatMul", [f"{p}/joined", f"{p}/proj.weight"], [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"
            ),
            helper.make_node("Tanh", [f"{p}/MatMul_output_0"], [f"{p}/state"], name=f"{p}/Tanh"),
        ]
        return helper.make_graph(
            nodes, f"{tag}_branch", [], [helper.make_tensor_value_info(f"{p}/state", TensorProto.FLOAT, [1, hidden])]
        )

    out_w = rng.normal(0, np.sqrt(1 / hidden), (hidden, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["audio", "axes1"], ["/Unsqueeze_output_0"], name="/Unsqueeze"),
        helper.make_node("Equal", ["sr", "sr16k"], ["/Equal_output_0"], name="/Equal"),
        helper.make_node(
            "If",
            ["/Equal_output_0"],
            ["state_out"],
            name="/If",
            then_branch=branch("sr16k", 2),
            else_branch=branch("sr8k", 1),
        ),
        helper.make_node("MatMul", ["state_out", "out.weight"], ["/out/MatMul_output_0"], name="/out/MatMul"),
        helper.make_node("Sigmoid", ["/out/MatMul_output_0"], ["prob"], name="/out/Sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "if_branches",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, hidden]),
        ],
        initializer=[
            numpy_helper.from_array(out_w, "out.weight"),
            numpy_helper.from_array(np.array([1], np.int64), "axes1"),
            numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="pytorch")
    model.ir_version = 8
    return _save(model, path)


def audio_data(n: int, *, bench: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """N chunks of speech-like audio (a few harmonics under an envelope, and noise), and states; every other
    chunk says 16 kHz, the rest 8 kHz, so that calibration reaches both branches."""
    rng = np.random.default_rng(seed)
    samples = 4096 if bench else 1024
    hidden = 64 if bench else 32
    t = np.arange(samples) / 16000
    audio = np.empty((n, 1, samples), np.float32)
    for i in range(n):
        f0 = rng.uniform(90, 250)
        voice = sum(rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 5))
        envelope = np.abs(np.sin(np.pi * t * rng.uniform(2, 8)))
        audio[i, 0] = (rng.uniform(0, 1) * voice * envelope + rng.normal(0, 0.02, samples)).astype(np.float32)
    return {
        "audio": audio,
        "state": np.tanh(rng.normal(0, 0.5, (n, 1, hidden))).astype(np.float32),
        "sr": np.array([16000, 8000] * (n // 2) + [16000] * (n % 2), np.int64),  # both branches run
    }


# ---------------------------------------------------------------------------------------------------
# The set


@dataclass(frozen=True)
class Fixture:
    name: str
    build: Callable[..., Path]  # (path, bench=...) -> the model
    data: Callable[..., dict[str, np.ndarray]]  # (samples, bench=..., seed=...) -> arrays by input, stacked
    rewards: tuple[str, ...]  # whole-model variants it is built to reward: qdq, qoperator, s8s8, dynamic, float
    kind: str  # the kind its budgeted output must get
    why: str


def _detector(path: Path, *, bench: bool = False) -> Path:
    return rows_detector(path, size=128 if bench else 64, channels=(24, 48, 96) if bench else (16, 32, 48))


def _detector_data(n: int, *, bench: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    return detector_data(n, size=128 if bench else 64, seed=seed)


FIXTURES = (
    Fixture(
        "rows_detector",
        _detector,
        _detector_data,
        ("qdq", "qoperator"),
        "detection",
        "output rows (x, y, w, h, obj, cls)",
    ),
    Fixture(
        "wrong_shape",
        wrong_shape_recognizer,
        recognizer_data,
        ("qdq", "qoperator"),
        "sequence",
        "declares [1, seqlen], returns [T, 1, C]",
    ),
    Fixture(
        "qoperator_recognizer",
        qoperator_recognizer,
        recognizer_data,
        ("qoperator",),
        "sequence",
        "QOperator keeps what QDQ loses",
    ),
    Fixture(
        "hardswish",
        hardswish_classifier,
        hardswish_data,
        ("float",),
        "classification",
        "HardSwish islands: int8 can lose to float",
    ),
    Fixture(
        "if_branches", if_branches, audio_data, ("qdq", "qoperator"), "regression", "Conv and MatMul inside If branches"
    ),
    Fixture(
        "transformer_neck",
        transformer_neck,
        recognizer_data,
        ("qdq", "qoperator", "dynamic"),
        "sequence",
        "a CNN with a transformer neck",
    ),
)


def fixture(name: str) -> Fixture:
    return next(f for f in FIXTURES if f.name == name)
