"""graph_order: every (sub)graph sorted with outer-scope reads counted; what bodies read; where nodes sit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.worker.engine import pitfall_models as pm
from worker.engine.graph_order import (
    outer_read_producers,
    sort_graph,
    sort_model_file,
    subgraph_nodes,
    topological_order,
)

F = TensorProto.FLOAT


def _vi(name: str, elem: int = F, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [2] if shape is None else shape)


def _model(nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [_vi(i) for i in inputs], [_vi(o) for o in outputs], **kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_vi(output)])


def _names(graph: onnx.GraphProto) -> list[str]:
    return [n.name for n in graph.node]


def _checker_error(model: onnx.ModelProto) -> str:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return str(exc)
    return ""


def _if_reading(outer_name: str, then_nodes: list[onnx.NodeProto] | None = None) -> onnx.NodeProto:
    then = _branch("then", then_nodes or [helper.make_node("Neg", [outer_name], ["t"], name="then/neg")], "t")
    other = _branch("else", [helper.make_node("Abs", ["x"], ["e"], name="else/abs")], "e")
    return helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)


def test_a_sorted_graph_keeps_its_order() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="n0"),
        helper.make_node("Relu", ["x"], ["b"], name="n1"),
        helper.make_node("Add", ["a", "b"], ["y"], name="n2"),
    ]
    model = _model(nodes, ["x"], ["y"])
    assert topological_order(model.graph) == [0, 1, 2]
    assert sort_graph(model.graph) == 0
    assert _names(model.graph) == ["n0", "n1", "n2"]


def test_a_subgraph_reading_an_outer_name_made_after_the_if_gets_its_producer_first() -> None:
    """What ONNX Runtime's quantizers write: the If ahead of the node that makes what its branch reads."""
    nodes = [
        helper.make_node("Greater", ["x0", "zero"], ["c"], name="cond"),
        _if_reading("late"),
        helper.make_node("Sigmoid", ["x"], ["late"], name="late_producer"),
    ]
    model = _model(nodes, ["x", "x0"], ["y"], initializer=[numpy_helper.from_array(np.float32(0), "zero")])
    model.graph.input[1].CopyFrom(_vi("x0", shape=[]))
    assert "topologically sorted" in _checker_error(model)
    assert "late" in _checker_error(model)

    assert sort_graph(model.graph) == 2
    assert _names(model.graph) == ["cond", "late_producer", "if"]
    assert _checker_error(model) == ""


def test_nodes_inside_a_subgraph_are_sorted_with_outer_names_inputs_initializers_and_empty_inputs_available() -> None:
    """Inside the branch: `x` (graph input), `w` (outer initializer), `o` (made by an outer node
    before the If), `bound` (the branch's own initializer) and an empty optional Clip input are all
    there from the start; only `h` waits for its producer."""
    then_nodes = [
        helper.make_node("Clip", ["h", "", "bound"], ["t"], name="then/clip"),
        helper.make_node("Add", ["m", "o"], ["h"], name="then/add"),
        helper.make_node("Mul", ["x", "w"], ["m"], name="then/mul"),
    ]
    then = helper.make_graph(
        then_nodes, "then", [], [_vi("t")], initializer=[numpy_helper.from_array(np.float32(3), "bound")]
    )
    other = _branch("else", [helper.make_node("Abs", ["x"], ["e"], name="else/abs")], "e")
    nodes = [
        helper.make_node("Exp", ["x"], ["o"], name="outer"),
        helper.make_node("Greater", ["x0", "zero"], ["c"], name="cond"),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other),
    ]
    model = _model(
        nodes,
        ["x", "x0"],
        ["y"],
        initializer=[numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.ones(2, "f"), "w")],
    )
    model.graph.input[1].CopyFrom(_vi("x0", shape=[]))
    assert "topologically sorted" in _checker_error(model)

    assert sort_graph(model.graph) == 2  # mul and clip swap; the outer graph was already in order
    assert _names(model.graph) == ["outer", "cond", "if"]
    then_after = next(a.g for a in model.graph.node[2].attribute if a.name == "then_branch")
    assert _names(then_after) == ["then/mul", "then/add", "then/clip"]
    assert _checker_error(model) == ""
    feeds = {"x": np.array([0.5, 2.0], np.float32), "x0": np.array(1.0, np.float32)}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, np.minimum(feeds["x"] + np.exp(feeds["x"]), 3.0), rtol=1e-6)


def test_a_read_two_levels_down_counts_for_the_outer_node() -> None:
    """A Loop whose body holds an If whose branch reads a top-level name made after the Loop."""
    inner_if = _if_reading("late")
    inner_if.input[0] = "c_in"
    body = helper.make_graph(
        [inner_if, helper.make_node("Identity", ["c_in"], ["c_out"], name="body/cond")],
        "body",
        [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, [])],
        [_vi("c_out", TensorProto.BOOL, []), _vi("y")],
    )
    nodes = [
        helper.make_node("Loop", ["n", "true"], ["y_final"], name="loop", body=body),
        helper.make_node("Sigmoid", ["x"], ["late"], name="late_producer"),
    ]
    model = _model(
        nodes,
        ["x"],
        [],
        initializer=[numpy_helper.from_array(np.int64(1), "n"), numpy_helper.from_array(np.array(True), "true")],
    )
    model.graph.output.append(_vi("y_final", shape=[1, 2]))
    assert [n.name for n in outer_read_producers(model.graph)] == ["late_producer"]
    assert sort_graph(model.graph) == 2
    assert _names(model.graph) == ["late_producer", "loop"]
    assert _checker_error(model) == ""


def test_a_cycle_keeps_every_node() -> None:
    nodes = [
        helper.make_node("Relu", ["b"], ["a"], name="n0"),
        helper.make_node("Relu", ["a"], ["b"], name="n1"),
        helper.make_node("Relu", ["x"], ["y"], name="n2"),
    ]
    model = _model(nodes, ["x"], ["y"])
    assert topological_order(model.graph) == [2, 0, 1]


def test_subgraph_nodes_name_the_subgraph_they_sit_in(tmp_path: Path) -> None:
    model = onnx.load(str(pm.streaming_audio(tmp_path / "audio.onnx")))
    where = {n.name: (w, n.op_type) for w, n in subgraph_nodes(model.graph)}
    assert where["/_model/sr16k/Conv"] == ("/If.then_branch", "Conv")
    assert where["/_model/sr8k/MatMul"] == ("/If.else_branch", "MatMul")
    loop = onnx.load(str(pm.loop_body(tmp_path / "loop.onnx")))
    assert {n.name: w for w, n in subgraph_nodes(loop.graph)}["loop/MatMul"] == "loop.body"


@pytest.mark.parametrize("build", [pm.streaming_audio, pm.loop_body], ids=["if", "loop"])
def test_onnx_runtime_quantizers_break_the_order_and_sort_model_file_repairs_it(tmp_path: Path, build) -> None:
    """The failure as users met it: ORT's own quantize_dynamic writes a model ORT runs and
    onnx.checker refuses; after sort_model_file the checker passes and the outputs are unchanged."""
    from onnxruntime.quantization import quantize_dynamic

    model = build(tmp_path / "float.onnx")
    out = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(model), str(out))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.ones([d if isinstance(d, int) else 16 for d in i.shape], np.float32)
        if i.type == "tensor(float)"
        else np.array(16000, np.int64)
        for i in session.get_inputs()
    }
    before = session.run(None, feeds)

    assert sort_model_file(out) > 0
    onnx.checker.check_model(str(out))
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sort_model_file(out) == 0  # sorted now: the file is left alone
