"""Tiny models reproducing the pitfalls of real exported models (built in code, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_models import matmul_mlp


def _model(graph: onnx.GraphProto, opset: int, ir_version: int = 8) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qaas-tests")
    model.ir_version = ir_version
    return model


def _save(model: onnx.ModelProto, path: Path, **kwargs) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), **kwargs)
    return path


def multi_input(path: Path, *, features: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """Three inputs: `x` [batch, F] float, `step` int64 scalar, `state` [layers, batch, F] float
    (batch on axis 1). Output `y` [batch, 4] = MatMul(Relu(x@W1 + sum(state, 0) + 0.1*step), W2)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    w2 = rng.normal(0, 0.3, size=(features, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("ReduceSum", ["state", "axes0"], ["hs"], name="reduce_state", keepdims=0),
        helper.make_node("Add", ["a", "hs"], ["b"], name="add_state"),
        helper.make_node("Cast", ["step"], ["stepf"], name="cast_step", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["stepf", "tenth"], ["stepc"], name="scale_step"),
        helper.make_node("Add", ["b", "stepc"], ["c"], name="add_step"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features]),
            helper.make_tensor_value_info("step", TensorProto.INT64, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [layers, "batch", features]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0"),
            numpy_helper.from_array(np.array(0.1, dtype=np.float32), "tenth"),
        ],
    )
    return _save(_model(graph, 13), path)


def constant_weights(path: Path, *, features: int = 16, hidden: int = 32, seed: int = 0) -> Path:
    """matmul_mlp with its weights as `Constant` nodes instead of initializers (as some exporters
    write them): plain quantize_dynamic fails with "Expected ... to be an initializer"."""
    model = onnx.load(str(matmul_mlp(path, features=features, hidden=hidden, seed=seed)))
    constants = [
        helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init)
        for init in model.graph.initializer
    ]
    del model.graph.initializer[:]
    nodes = [*constants, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.name = "constant_weights"
    return _save(model, path)


def symbolic_shape_breaker(path: Path, *, features: int = 16, seed: int = 0) -> Path:
    """`x` [batch, F] -> MatMul -> Relu -> com.microsoft ExpandDims(axis 1) -> MatMul -> `y` [batch, 1, F].
    ExpandDims is an ONNX Runtime contrib op that ORT's symbolic shape inference has no rule for
    and ONNX shape inference does not know: symbolic inference stops with "Incomplete symbolic
    shape inference" (as on many real exported models)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    w2 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("ExpandDims", ["hr", "axis"], ["hx"], name="expand", domain="com.microsoft"),
        helper.make_node("MatMul", ["hx", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "symbolic_shape_breaker",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, features])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array(1, dtype=np.int32), "axis"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
        producer_name="qaas-tests",
    )
    model.ir_version = 8
    return _save(model, path)


def if_subgraph(path: Path, *, features: int = 8, seed: int = 0) -> Path:
    """`x` [batch, F] -> MatMul -> If(sum > 0: MatMul(W2), else: MatMul(W3)) -> `y`.
    The branch weights live in the outer graph (subgraphs reference them)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    w2 = rng.normal(0, 0.3, size=(features, 4)).astype(np.float32)
    w3 = rng.normal(0, 0.3, size=(features, 4)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["then_y"], name="then_mm")],
        "then_branch",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["batch", 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w3"], ["else_y"], name="else_mm")],
        "else_branch",
        [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["batch", 4])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "if_subgraph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(w3, "w3"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return _save(_model(graph, 13), path)


def lstm(path: Path, *, features: int = 8, hidden: int = 16, seq: int = 5, seed: int = 0) -> Path:
    """LSTM over `x` [seq, batch, F] then MatMul of the last hidden state: `y` [batch, 4]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, size=(1, 4 * hidden, features)).astype(np.float32)
    r = rng.normal(0, 0.3, size=(1, 4 * hidden, hidden)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(1, 8 * hidden)).astype(np.float32)
    fc = rng.normal(0, 0.3, size=(hidden, 4)).astype(np.float32)
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["Y_h", "axes0"], ["h_last"], name="squeeze"),
        helper.make_node("MatMul", ["h_last", "fc"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, "batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(r, "R"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(fc, "fc"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0"),
        ],
    )
    return _save(_model(graph, 13), path)


def dynamic_dims(path: Path, *, features: int = 8, seed: int = 0) -> Path:
    """`x` [batch, seq, F] with both batch and seq symbolic: MatMul -> Softmax -> MatMul."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    w2 = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Softmax", ["h"], ["s"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_dims",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", features])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(_model(graph, 13), path)


def external_data_mlp(path: Path, *, features: int = 64, hidden: int = 128, seed: int = 0) -> Path:
    """matmul_mlp saved with its weights in an external data file beside the model."""
    from tests.onnx_models import matmul_mlp

    tmp = matmul_mlp(path.with_name(path.stem + "_inline.onnx"), features=features, hidden=hidden, seed=seed)
    model = onnx.load(str(tmp))
    tmp.unlink()
    return _save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.stem + ".onnx.data",
        size_threshold=0,
    )


def wide_intermediates(path: Path, *, channels: int = 64, size: int = 32, seed: int = 0) -> Path:
    """A conv model whose intermediates are large compared with its weights (for the calibration
    memory test): `input` [batch, 3, size, size] -> Conv(3->C) -> Relu -> Conv(C->C) -> Relu ->
    GlobalAveragePool -> Flatten -> `out` [batch, C]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, size=(channels, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.05, size=(channels, channels, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["out"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_intermediates",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", channels])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(_model(graph, 13), path)


def qat_model(path: Path, *, features: int = 16, seed: int = 0) -> Path:
    """A QAT-style export: MatMul whose input and weight already go through QuantizeLinear/
    DequantizeLinear pairs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, size=(features, features)).astype(np.float32)
    w_scale = np.float32(np.abs(w).max() / 127)
    wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="dq_w"),
        helper.make_node("MatMul", ["xdq", "wdq"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "qat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[
            numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.uint8), "x_zp"),
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(np.array(w_scale, dtype=np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zp"),
        ],
    )
    return _save(_model(graph, 13), path)


def overflow_fp16(path: Path, *, features: int = 8) -> Path:
    """x -> Mul(x, 1e3) -> Mul(., 1e3) -> ReduceSum... values above 65504 overflow in fp16.
    Here `Exp` of large inputs: Exp(x*12) overflows float16 for x > ~0.93."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Exp", ["h"], ["e"], name="exp"),
        helper.make_node("ReduceSum", ["e"], ["s"], name="sum", keepdims=1),
        helper.make_node("Div", ["e", "s"], ["y"], name="div"),
    ]
    w = np.eye(features, dtype=np.float32) * 12.0
    graph = helper.make_graph(
        nodes,
        "overflow_fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return _save(_model(graph, 13), path)


def embedding_mlp(path: Path, *, vocab: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """Token ids `ids` [batch, seq] int64 -> Gather(embedding [vocab, dim]) -> MatMul -> `y`
    [batch, seq, dim]: the shape of a language model's input layers (weight-only Gather + MatMul)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.5, size=(vocab, dim)).astype(np.float32)
    w = rng.normal(0, 0.3, size=(dim, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding_mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        initializer=[numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")],
    )
    return _save(_model(graph, 13), path)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A `Constant` node the way PyTorch writes weights inside `If` branches."""
    return helper.make_node("Constant", [], [name], name=name + "/Constant", value=numpy_helper.from_array(value))


def streaming_audio(path: Path, *, hidden: int = 16, channels: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """A streaming audio model exported by PyTorch at opset 15 (the shape of a voice-activity
    detector): inputs `audio` [batch, samples] float, `state` [layers, batch, hidden] float (batch
    on axis 1) and `sr` int64 scalar. The body sits in the branches of an `If` on `sr == 16000`;
    each branch holds a Conv (stride 2 at 16 kHz, 1 otherwise) and a MatMul with its weights as
    `Constant` nodes, and reads `/Pad_output_0`, made by a chain of outer nodes. Outputs `prob`
    [batch, 1] and `state_out` [layers, batch, hidden].

    ONNX Runtime's quantizers re-sort the outer graph by explicit inputs only, which puts the If
    ahead of the chain its branches read: the result runs in ONNX Runtime but fails onnx.checker."""
    rng = np.random.default_rng(seed)

    def branch(tag: str, stride: int) -> onnx.GraphProto:
        p = f"/_model/{tag}"
        wc = rng.normal(0, 0.5, size=(channels, 1, 5)).astype(np.float32)
        wm = rng.normal(0, 0.3, size=(channels + hidden, hidden)).astype(np.float32)
        nodes = [
            _const(f"{p}/conv.weight", wc),
            _const(f"{p}/proj.weight", wm),
            _const(f"{p}/axes0", np.array([0], np.int64)),
            helper.make_node(
                "Conv",
                ["/Pad_output_0", f"{p}/conv.weight"],
                [f"{p}/Conv_output_0"],
                name=f"{p}/Conv",
                strides=[stride],
            ),
            helper.make_node("Relu", [f"{p}/Conv_output_0"], [f"{p}/Relu_output_0"], name=f"{p}/Relu"),
            helper.make_node(
                "ReduceMean", [f"{p}/Relu_output_0"], [f"{p}/feat"], name=f"{p}/ReduceMean", axes=[2], keepdims=0
            ),
            helper.make_node("ReduceMean", ["state"], [f"{p}/h"], name=f"{p}/StateMean", axes=[0], keepdims=0),
            helper.make_node("Concat", [f"{p}/feat", f"{p}/h"], [f"{p}/Concat_output_0"], name=f"{p}/Concat", axis=1),
            helper.make_node(
                "MatMul", [f"{p}/Concat_output_0", f"{p}/proj.weight"], [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"
            ),
            helper.make_node("Tanh", [f"{p}/MatMul_output_0"], [f"{p}/out"], name=f"{p}/Tanh"),
            helper.make_node("Unsqueeze", [f"{p}/out", f"{p}/axes0"], [f"{p}/out3"], name=f"{p}/Unsqueeze"),
            helper.make_node("Add", ["state", f"{p}/out3"], [f"{p}/state"], name=f"{p}/Add"),
        ]
        return helper.make_graph(
            nodes,
            f"{tag}_branch",
            [],
            [
                helper.make_tensor_value_info(f"{p}/out", TensorProto.FLOAT, ["batch", hidden]),
                helper.make_tensor_value_info(f"{p}/state", TensorProto.FLOAT, [layers, "batch", hidden]),
            ],
        )

    wout = rng.normal(0, 0.3, size=(hidden, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["audio", "gain"], ["/Mul_output_0"], name="/Mul"),
        helper.make_node("Unsqueeze", ["/Mul_output_0", "axes1"], ["/Unsqueeze_output_0"], name="/Unsqueeze"),
        helper.make_node("Pad", ["/Unsqueeze_output_0", "pads"], ["/Pad_output_0"], name="/Pad", mode="reflect"),
        helper.make_node("Equal", ["sr", "sr16k"], ["/Equal_output_0"], name="/Equal"),
        helper.make_node(
            "If",
            ["/Equal_output_0"],
            ["/If_output_0", "state_out"],
            name="/If",
            then_branch=branch("sr16k", 2),
            else_branch=branch("sr8k", 1),
        ),
        helper.make_node("MatMul", ["/If_output_0", "out.weight"], ["/out/MatMul_output_0"], name="/out/MatMul"),
        helper.make_node("Sigmoid", ["/out/MatMul_output_0"], ["prob"], name="/out/Sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "streaming_audio",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [layers, "batch", hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [layers, "batch", hidden]),
        ],
        initializer=[
            numpy_helper.from_array(wout, "out.weight"),
            numpy_helper.from_array(np.array(4.0, np.float32), "gain"),
            numpy_helper.from_array(np.array([1], np.int64), "axes1"),
            numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 2], np.int64), "pads"),
            numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
        ],
    )
    return _save(_model(graph, 15), path)


def loop_body(path: Path, *, features: int = 8, trips: int = 3, seed: int = 0) -> Path:
    """`x` [batch, F] -> Loop (3 trips) whose body holds a MatMul: h <- Tanh(h @ W + b), with `b`
    = Relu(x @ W_in) computed in the outer graph and read by the body from the outer scope. Then
    MatMul -> `y` [batch, F]. Like the If model, ONNX Runtime's quantizers put the Loop ahead of
    the Relu its body reads."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop/cond"),
            helper.make_node("MatMul", ["h_in", "w_loop"], ["loop/mm"], name="loop/MatMul"),
            helper.make_node("Add", ["loop/mm", "b"], ["loop/add"], name="loop/Add"),
            helper.make_node("Tanh", ["loop/add"], ["h_out"], name="loop/Tanh"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", features]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", features]),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["a"], name="in/MatMul"),
        helper.make_node("Relu", ["a"], ["b"], name="in/Relu"),
        helper.make_node("Loop", ["trips", "true", "x"], ["h_final"], name="loop", body=body),
        helper.make_node("MatMul", ["h_final", "w_out"], ["y"], name="out/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_body",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.3, size=(features, features)).astype(np.float32), "w_in"),
            numpy_helper.from_array(rng.normal(0, 0.3, size=(features, features)).astype(np.float32), "w_loop"),
            numpy_helper.from_array(rng.normal(0, 0.3, size=(features, features)).astype(np.float32), "w_out"),
            numpy_helper.from_array(np.array(trips, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    return _save(_model(graph, 15), path)


def fp16_truncated_weights(path: Path, *, tensors: int = 6, features: int = 8) -> Path:
    """`x` [batch, F] -> Mul by each of `tensors` weight vectors -> Concat -> `y` [batch, tensors*F].
    Every vector holds float32 values that float16 conversion truncates: beyond ±1e4 (largest
    magnitude 1.1e4 + 1000 * (tensors - 1)) and nearer zero than 1e-7 (smallest magnitude 2e-10).
    onnxconverter-common warns once per tensor and sign, 4 * `tensors` times in all. The products
    stay below half of float16's range, so the range check keeps no node in float32."""
    inits, nodes = [], []
    for i in range(tensors):
        w = np.full(features, 0.5, np.float32)
        w[:4] = [11000.0 + 1000.0 * i, -10500.0, 1e-9 * (i + 1), -2e-10]
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Mul", ["x", f"w{i}"], [f"m{i}"], name=f"mul{i}"))
    nodes.append(helper.make_node("Concat", [f"m{i}" for i in range(tensors)], ["y"], name="concat", axis=1))
    graph = helper.make_graph(
        nodes,
        "fp16_truncated_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", tensors * features])],
        initializer=inits,
    )
    return _save(_model(graph, 13), path)


def shape_if_streaming(path: Path, *, hidden: int = 16, channels: int = 8, trips: int = 2, seed: int = 0) -> Path:
    """A streaming model whose every Conv and MatMul sits in `If` branches chosen by a shape (chunks
    of more than 32 samples take the `long` branch), as exporters write a chunk-size switch, at opset 13.
    Input `audio` [batch, samples]; output `y` [batch, hidden]. Both branches read the outer `/Pad`
    output and outer-scope weights (main-graph initializers); the `long` branch holds a Conv and a
    MatMul and, nested in it, a `Loop` refining its state with a MatMul (outer weights again); the
    `short` branch a Conv and a MatMul with weights of its own."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.4) -> np.ndarray:
        return rng.normal(0, scale, size=shape).astype(np.float32)

    loop = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/long/loop/cond"),
            helper.make_node("MatMul", ["h_in", "loop.weight"], ["/long/loop/mm"], name="/long/loop/MatMul"),
            helper.make_node("Add", ["/long/loop/mm", "/long/feat_proj"], ["/long/loop/add"], name="/long/loop/Add"),
            helper.make_node("Tanh", ["/long/loop/add"], ["h_out"], name="/long/loop/Tanh"),
        ],
        "long_loop",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", hidden]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", hidden]),
        ],
    )
    long_branch = helper.make_graph(
        [
            helper.make_node("Conv", ["/Pad_output_0", "conv.weight"], ["/long/conv"], name="/long/Conv", strides=[2]),
            helper.make_node("Relu", ["/long/conv"], ["/long/relu"], name="/long/Relu"),
            helper.make_node(
                "ReduceMean", ["/long/relu"], ["/long/feat"], name="/long/ReduceMean", axes=[2], keepdims=0
            ),
            helper.make_node("MatMul", ["/long/feat", "proj.weight"], ["/long/feat_proj"], name="/long/MatMul"),
            helper.make_node("Loop", ["trips", "", "/long/feat_proj"], ["/long/out"], name="/long/Loop", body=loop),
        ],
        "long_branch",
        [],
        [helper.make_tensor_value_info("/long/out", TensorProto.FLOAT, ["batch", hidden])],
    )
    short_branch = helper.make_graph(
        [
            helper.make_node("Conv", ["/Pad_output_0", "short.conv"], ["/short/conv"], name="/short/Conv"),
            helper.make_node("Relu", ["/short/conv"], ["/short/relu"], name="/short/Relu"),
            helper.make_node(
                "ReduceMean", ["/short/relu"], ["/short/feat"], name="/short/ReduceMean", axes=[2], keepdims=0
            ),
            helper.make_node("MatMul", ["/short/feat", "short.proj"], ["/short/mm"], name="/short/MatMul"),
            helper.make_node("Tanh", ["/short/mm"], ["/short/out"], name="/short/Tanh"),
        ],
        "short_branch",
        [],
        [helper.make_tensor_value_info("/short/out", TensorProto.FLOAT, ["batch", hidden])],
        initializer=[
            numpy_helper.from_array(w(channels, 1, 3), "short.conv"),
            numpy_helper.from_array(w(channels, hidden), "short.proj"),
        ],
    )
    nodes = [
        helper.make_node("Unsqueeze", ["audio", "axes1"], ["/Unsqueeze_output_0"], name="/Unsqueeze"),
        helper.make_node("Pad", ["/Unsqueeze_output_0", "pads"], ["/Pad_output_0"], name="/Pad", mode="reflect"),
        helper.make_node("Shape", ["audio"], ["/Shape_output_0"], name="/Shape"),
        helper.make_node("Gather", ["/Shape_output_0", "one"], ["/samples"], name="/Gather", axis=0),
        helper.make_node("Greater", ["/samples", "limit"], ["/long_chunk"], name="/Greater"),
        helper.make_node(
            "If", ["/long_chunk"], ["/If_output_0"], name="/If", then_branch=long_branch, else_branch=short_branch
        ),
        helper.make_node("MatMul", ["/If_output_0", "out.weight"], ["/out/MatMul_output_0"], name="/out/MatMul"),
        helper.make_node("Tanh", ["/out/MatMul_output_0"], ["y"], name="/out/Tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_if_streaming",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        initializer=[
            numpy_helper.from_array(w(channels, 1, 5), "conv.weight"),
            numpy_helper.from_array(w(channels, hidden), "proj.weight"),
            numpy_helper.from_array(w(hidden, hidden, scale=0.3), "loop.weight"),
            numpy_helper.from_array(w(hidden, hidden, scale=0.3), "out.weight"),
            numpy_helper.from_array(np.array([1], np.int64), "axes1"),
            numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 2], np.int64), "pads"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.array(32, np.int64), "limit"),
            numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        ],
    )
    return _save(_model(graph, 13), path)


def scan_body(path: Path, *, features: int = 8, hidden: int = 16, seed: int = 0) -> Path:
    """An RNN written as a `Scan` over `x` [seq, batch, F]: h <- Tanh(x_t @ Wx + h @ Wh), both
    MatMuls in the body (weights from the outer scope), every h a scan output; then a MatMul over
    the sequence -> `y` [seq, batch, F]. Initial state `h0` [batch, H]."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "wx"], ["scan/xw"], name="scan/MatMul_x"),
            helper.make_node("MatMul", ["h_in", "wh"], ["scan/hw"], name="scan/MatMul_h"),
            helper.make_node("Add", ["scan/xw", "scan/hw"], ["scan/sum"], name="scan/Add"),
            helper.make_node("Tanh", ["scan/sum"], ["h_out"], name="scan/Tanh"),
            helper.make_node("Identity", ["h_out"], ["y_t"], name="scan/Identity"),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", features]),
        ],
        [
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["batch", hidden]),
        ],
    )
    nodes = [
        helper.make_node("Scan", ["h0", "x"], ["h_last", "hs"], name="scan", body=body, num_scan_inputs=1),
        helper.make_node("MatMul", ["hs", "w_out"], ["y"], name="out/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "scan_body",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", features]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", hidden]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", "batch", features])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.4, size=(features, hidden)).astype(np.float32), "wx"),
            numpy_helper.from_array(rng.normal(0, 0.3, size=(hidden, hidden)).astype(np.float32), "wh"),
            numpy_helper.from_array(rng.normal(0, 0.3, size=(hidden, features)).astype(np.float32), "w_out"),
        ],
    )
    return _save(_model(graph, 13), path)


def growing_loop(path: Path, *, features: int = 8, trips: int = 3, seed: int = 0) -> Path:
    """A `Loop` whose carried state grows: h <- Concat(h, Tanh(h @ W)) on axis 0, so the MatMul in the body
    reads more rows at every iteration (a decoder appending to its history), then a MatMul.
    `x` [rows, F] -> `y` [rows * 2**trips, F]."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="grow/cond"),
            helper.make_node("MatMul", ["h_in", "w_grow"], ["grow/mm"], name="grow/MatMul"),
            helper.make_node("Tanh", ["grow/mm"], ["grow/new"], name="grow/Tanh"),
            helper.make_node("Concat", ["h_in", "grow/new"], ["h_out"], name="grow/Concat", axis=0),
        ],
        "grow_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["rows", features]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["more_rows", features]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "", "x"], ["grown"], name="grow", body=body),
            helper.make_node("MatMul", ["grown", "w_out"], ["y"], name="out/MatMul"),
        ],
        "growing_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["all_rows", features])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.4, size=(features, features)).astype(np.float32), "w_grow"),
            numpy_helper.from_array(rng.normal(0, 0.4, size=(features, features)).astype(np.float32), "w_out"),
            numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        ],
    )
    return _save(_model(graph, 13), path)
