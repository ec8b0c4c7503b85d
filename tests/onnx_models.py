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
    return _save_graph(graph, path, opset)


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


def outlier_encoder(
    path: Path,
    *,
    vocab: int = 64,
    dim: int = 32,
    ffn: int = 128,
    layers: int = 1,
    outlier: float = 300.0,
    seed: int = 0,
) -> Path:
    """A small transformer encoder (opset 17): `input_ids` and `attention_mask` [batch, seq] int64
    in, `last_hidden_state` [batch, seq, dim] out. Each layer: single-head self-attention with the
    mask as an additive bias, residual + LayerNormalization, then an FFN whose up-projection drives
    one channel (the outlier) to about `outlier` while the others stay near 1. Quantizing the FFN
    down-projection's input per tensor crushes every other channel, so all-int8 loses fidelity;
    leaving the down-projections (`layer{i}.ffn_down`) in float restores it."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, name: str, fan_in: int, fan_out: int, scale: float = 1.0) -> str:
        w = rng.normal(0, scale / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0, 0.02, (fan_out,)).astype(np.float32)
        mm = node("MatMul", [x, const(f"{name}.w", w)], name)
        return node("Add", [mm, const(f"{name}.b", b)], f"{name}.bias")

    def layer_norm(x: str, name: str) -> str:
        return node(
            "LayerNormalization",
            [x, const(f"{name}.g", np.ones(dim, np.float32)), const(f"{name}.beta", np.zeros(dim, np.float32))],
            name,
            axis=-1,
        )

    emb = rng.normal(0, 1.0, (vocab, dim)).astype(np.float32)
    x = node("Gather", [const("embeddings", emb), "input_ids"], "embed")
    x = layer_norm(x, "embed_norm")
    # [batch, seq] mask -> additive bias [batch, 1, seq]: 0 where attended, -10000 on padding.
    mask_f = node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT)
    mask_3d = node("Unsqueeze", [mask_f, const("axis1", np.array([1], np.int64))], "mask_3d")
    inv = node("Sub", [const("one", np.array(1.0, np.float32)), mask_3d], "mask_inv")
    bias = node("Mul", [inv, const("neg_big", np.array(-10000.0, np.float32))], "mask_bias")
    for i in range(layers):
        p = f"layer{i}"
        q = linear(x, f"{p}.q", dim, dim)
        k = linear(x, f"{p}.k", dim, dim)
        v = linear(x, f"{p}.v", dim, dim)
        kt = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 1])
        scores = node("MatMul", [q, kt], f"{p}.scores")
        scaled = node("Mul", [scores, const(f"{p}.scale", np.array(1 / np.sqrt(dim), np.float32))], f"{p}.scaled")
        masked = node("Add", [scaled, bias], f"{p}.masked")
        probs = node("Softmax", [masked], f"{p}.probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}.context")
        attn = linear(ctx, f"{p}.attn_out", dim, dim)
        x = layer_norm(node("Add", [x, attn], f"{p}.attn_residual"), f"{p}.attn_norm")
        up_w = rng.normal(0, 1 / np.sqrt(dim), (dim, ffn)).astype(np.float32)
        up_b = np.zeros(ffn, np.float32)
        up_b[0] = outlier  # one channel far larger than the others
        up = node("MatMul", [x, const(f"{p}.ffn_up.w", up_w)], f"{p}.ffn_up")
        up = node("Add", [up, const(f"{p}.ffn_up.b", up_b)], f"{p}.ffn_up.bias")
        act = node("Relu", [up], f"{p}.ffn_act")
        down_w = rng.normal(0, 1 / np.sqrt(ffn), (ffn, dim)).astype(np.float32)
        down_w[0] = rng.normal(0, 0.3 / outlier, dim)  # the outlier's contribution stays moderate
        down = node("MatMul", [act, const(f"{p}.ffn_down.w", down_w)], f"{p}.ffn_down")
        down = node("Add", [down, const(f"{p}.ffn_down.b", np.zeros(dim, np.float32))], f"{p}.ffn_down.bias")
        x = layer_norm(node("Add", [x, down], f"{p}.ffn_residual"), f"{p}.ffn_norm")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        nodes,
        "outlier_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qaas-tests")
    model.ir_version = 8
    return _save(model, path)


def encoder_inputs(n: int, *, seq: int = 16, vocab: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """N samples of [1, seq] token ids and attention masks, stacked; each sample is padded after a
    random length (padding ids are 0), so part of every batch is masked out."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, 1, seq), dtype=np.int64)
    lengths = rng.integers(seq // 4, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)[:, None, :]
    return {"input_ids": ids * mask, "attention_mask": mask}


def spiky_cnn(path: Path, *, size: int = 16, hidden: int = 16, classes: int = 10, seed: int = 0) -> Path:
    """Conv(first_conv) -> Relu -> Conv(conv2) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(fc):
    input `input` [batch, 4, size, size], output `logits` [batch, classes]. Fed `spiky_images`, whose
    fourth channel (which the first conv all but ignores) spans +-400 while the others are N(0, 1):
    quantizing the first conv's input per tensor leaves almost nothing of the image, so the first
    conv is the sensitive node."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (hidden, 4, 3, 3)).astype(np.float32)
    w1[:, 3] *= 1e-4
    w2 = rng.normal(0, 1 / np.sqrt(hidden * 9), (hidden, hidden, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 1 / np.sqrt(hidden), (classes, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="first_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "spiky_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.zeros(hidden, np.float32), "b2"),
            numpy_helper.from_array(fc, "fc_w"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="qaas-tests")
    model.ir_version = 8
    return _save(model, path)


def spiky_images(n: int, *, size: int = 16, spike: float = 400.0, seed: int = 0) -> np.ndarray:
    """N samples [1, 4, size, size]: three channels of N(0, 1) pixels and a fourth spanning +-spike
    (bigger images average more of the rounding away, so they need a bigger spike to show it)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, 1, 4, size, size)).astype(np.float32)
    images[:, :, 3] = rng.uniform(-spike, spike, (n, 1, size, size))
    return images


def hardswish_net(path: Path, *, channels: int = 32, size: int = 56, blocks: int = 3, seed: int = 0) -> Path:
    """A PP-LCNet-style mobile classifier: a stem conv, then blocks of depthwise 3x3 and pointwise 1x1 convs,
    each followed by HardSwish (which ONNX Runtime's quantizer leaves in float: every one is a float island
    between int8 convs), then GlobalAveragePool, Flatten, Gemm. Input `x` [1, 3, size, size], output `logits`."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, c_in: int, c_out: int, name: str, *, kernel: int, groups: int = 1, stride: int = 1) -> str:
        w = rng.normal(0, np.sqrt(2 / (c_in // groups * kernel * kernel)), (c_out, c_in // groups, kernel, kernel))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), f"{name}.b"))
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [f"{name}.out"],
                name=name,
                pads=[pad] * 4,
                strides=[stride, stride],
                group=groups,
            )
        )
        nodes.append(helper.make_node("HardSwish", [f"{name}.out"], [f"{name}.act"], name=f"{name}.hardswish"))
        return f"{name}.act"

    x = conv("x", 3, channels, "stem", kernel=3, stride=2)
    for i in range(blocks):
        x = conv(x, channels, channels, f"dw{i}", kernel=3, groups=channels)
        x = conv(x, channels, channels, f"pw{i}", kernel=1)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (10, channels)).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "hardswish_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    return _save_graph(graph, path, 14)


def conv_matmul_recognizer(
    path: Path, *, channels: int = 16, height: int = 8, width: int = 32, dim: int = 32, classes: int = 12, seed: int = 0
) -> Path:
    """A text recognizer in miniature: a conv backbone (two 3x3 convs with Relu) pooled over the height to a
    sequence [B, T, C], then a MatMul neck (MatMul + Add, Relu) and a MatMul head with per-step Softmax:
    input `x` [1, 3, height, width], output `probs` [1, width, classes]. Conv and MatMul both: the model a
    hybrid (static Conv, dynamic MatMul) is for."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("ReduceMean", ["r2"], ["pooled"], name="pool_height", axes=[2], keepdims=0),
        helper.make_node("Transpose", ["pooled"], ["seq"], name="to_sequence", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["seq", "neck.w"], ["neck_mm"], name="neck"),
        helper.make_node("Add", ["neck_mm", "neck.b"], ["neck_out"], name="neck_bias"),
        helper.make_node("Relu", ["neck_out"], ["neck_act"], name="neck_relu"),
        helper.make_node("MatMul", ["neck_act", "head.w"], ["head_mm"], name="head"),
        helper.make_node("Add", ["head_mm", "head.b"], ["logits"], name="head_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_matmul_recognizer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, width, classes])],
        initializer=[
            init("c1.w", channels, 3, 3, 3),
            init("c1.b", channels, scale=0.1),
            init("c2.w", channels, channels, 3, 3, scale=0.15),
            init("c2.b", channels, scale=0.1),
            init("neck.w", channels, dim),
            init("neck.b", dim, scale=0.1),
            init("head.w", dim, classes),
            init("head.b", classes, scale=0.1),
        ],
    )
    return _save_graph(graph, path, 13)
