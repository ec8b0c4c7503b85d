"""inspect_model: summaries of valid models and refusal of hostile ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import ExternalDataEscape, InvalidModel, ResourceLimit, UnsupportedOperator
from service.inspection.model import ModelLimits, inspect_model
from tests.onnx_models import conv_classifier, matmul_mlp


def _model(nodes, inputs, outputs, initializer=(), opsets=(("", 13),), ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializer))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
        producer_name="tests",
        producer_version="1.0",
    )
    model.ir_version = ir_version
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _vi(name: str, elem=TensorProto.FLOAT, shape=("n", 4)):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def _if_model() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="then_relu")], "then", [], [_vi("t")])
    else_g = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["e"], name="else_neg"),
            helper.make_node("Abs", ["e"], ["e2"], name="else_abs"),
        ],
        "else",
        [],
        [_vi("e2")],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return _model(nodes, [_vi("x"), _vi("cond", TensorProto.BOOL, [])], [_vi("y")])


# -- valid models -----------------------------------------------------------------------------


def test_conv_classifier_summary(tmp_path: Path) -> None:
    info = inspect_model(conv_classifier(tmp_path / "m.onnx"))
    assert info.ir_version == 8
    assert info.opset == 13
    assert info.producer == "qaas-tests"
    assert info.inputs == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    assert info.outputs == [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}]
    assert info.op_counts == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert info.node_names == ["conv", "relu", "pool", "flatten", "fc"]
    assert info.quantization is None
    assert info.external_data == []


def test_initializer_inputs_are_not_reported_as_inputs(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_mlp(tmp_path / "m.onnx")))
    model.graph.input.append(_vi("w1", shape=(16, 32)))  # old exporters list weights as inputs
    info = inspect_model(_save(model, tmp_path / "m2.onnx"))
    assert [i["name"] for i in info.inputs] == ["x"]


def test_subgraph_nodes_are_counted(tmp_path: Path) -> None:
    info = inspect_model(_save(_if_model(), tmp_path / "if.onnx"))
    assert info.op_counts == {"If": 1, "Relu": 1, "Neg": 1, "Abs": 1}
    assert set(info.node_names) == {"branch", "then_relu", "else_neg", "else_abs"}
    assert info.producer == "tests 1.0"
    assert info.inputs[1] == {"name": "cond", "dtype": "bool", "shape": []}


def test_qdq_and_qoperator_models_are_recognised(tmp_path: Path) -> None:
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "z")
    qdq = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
        ],
        [_vi("x")],
        [_vi("y")],
        initializer=[scale, zp],
    )
    assert inspect_model(_save(qdq, tmp_path / "qdq.onnx")).quantization == "qdq"
    w = numpy_helper.from_array(np.ones((4, 2), np.uint8), "w")
    qop = _model(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"], name="mmi")],
        [_vi("a", TensorProto.UINT8)],
        [_vi("y", TensorProto.INT32, ("n", 2))],
        initializer=[w],
    )
    assert inspect_model(_save(qop, tmp_path / "qop.onnx")).quantization == "qoperator"


def test_model_without_default_opset_reports_opset_zero(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", name="bin", threshold=0.5)],
        [_vi("x")],
        [_vi("y")],
        opsets=(("ai.onnx.ml", 3),),
    )
    info = inspect_model(_save(model, tmp_path / "ml.onnx"))
    assert info.opset == 0
    assert info.op_counts == {"Binarizer": 1}


# -- not a model --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x00\xff" * 64, b"hello, I am a text file\n"])
def test_garbage_is_not_an_onnx_model(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModel, match="not an ONNX model") as err:
        inspect_model(path)
    assert err.value.status == 422


def test_truncated_protobuf_is_refused(tmp_path: Path) -> None:
    data = conv_classifier(tmp_path / "m.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModel):
        inspect_model(path)


def test_checker_failure_is_quoted(tmp_path: Path) -> None:
    model = _model([helper.make_node("Relu", ["nowhere"], ["y"], name="r")], [_vi("x")], [_vi("y")])
    with pytest.raises(InvalidModel, match="checker") as err:
        inspect_model(_save(model, tmp_path / "bad.onnx"))
    assert "nowhere" in err.value.detail["checker"]


# -- external data ------------------------------------------------------------------------------


def _external_model(folder: Path) -> Path:
    """matmul_mlp with every initializer in `w.bin` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(matmul_mlp(folder / "plain.onnx")))
    (folder / "plain.onnx").unlink()
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


def _set_external(path: Path, **entries: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    current = {e.key: e.value for e in tensor.external_data}
    current.update(entries)
    del tensor.external_data[:]
    for key, value in current.items():
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def test_valid_external_data_is_listed(tmp_path: Path) -> None:
    info = inspect_model(_external_model(tmp_path))
    assert info.external_data == ["w.bin"]


@pytest.mark.parametrize(
    "location",
    ["/etc/passwd", "../w.bin", "sub/../../w.bin", "..", "missing.bin", "C:/w.bin", "a\\..\\w.bin"],
)
def test_external_location_outside_folder_or_missing(tmp_path: Path, location: str) -> None:
    path = _external_model(tmp_path / "m")
    (tmp_path / "w.bin").write_bytes(b"\x00" * 4096)  # a real file one level up
    _set_external(path, location=location)
    with pytest.raises(ExternalDataEscape) as err:
        inspect_model(path)
    assert err.value.detail["location"] == location


def test_external_symlink_to_system_file(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    (tmp_path / "link.bin").symlink_to("/etc/passwd")
    _set_external(path, location="link.bin", offset="0", length="4")
    with pytest.raises(ExternalDataEscape, match="symbolic link"):
        inspect_model(path)


def test_external_through_symlinked_folder(tmp_path: Path) -> None:
    path = _external_model(tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes((tmp_path / "m" / "w.bin").read_bytes())
    (tmp_path / "m" / "sub").symlink_to(outside)
    _set_external(path, location="sub/w.bin")
    with pytest.raises(ExternalDataEscape, match="not a plain file name"):  # a folder at all, linked or not
        inspect_model(path)


def test_external_hardlink(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    os.link(tmp_path / "w.bin", tmp_path / "hard.bin")
    _set_external(path, location="hard.bin")
    with pytest.raises(ExternalDataEscape, match="hard link"):
        inspect_model(path)


def test_external_fifo(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    os.mkfifo(tmp_path / "pipe.bin")
    _set_external(path, location="pipe.bin")
    with pytest.raises(ExternalDataEscape, match="regular file"):
        inspect_model(path)


@pytest.mark.parametrize(
    "entries",
    [{"offset": "1000000"}, {"offset": "0", "length": "1000000"}, {"offset": "-4"}, {"length": "x"}],
)
def test_external_offset_length_beyond_file(tmp_path: Path, entries: dict[str, str]) -> None:
    path = _external_model(tmp_path)
    _set_external(path, **entries)
    with pytest.raises(ExternalDataEscape):
        inspect_model(path)


def test_external_data_in_subgraph_constant(tmp_path: Path) -> None:
    model = _if_model()
    const = helper.make_tensor("c", TensorProto.FLOAT, [4], [0.0] * 4)
    const.data_location = TensorProto.EXTERNAL
    const.ClearField("float_data")
    const.external_data.add(key="location", value="../../secret")
    then_g = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    then_g.node.insert(0, helper.make_node("Constant", [], ["unused"], name="c", value=const))
    with pytest.raises(ExternalDataEscape, match="outside"):
        inspect_model(_save(model, tmp_path / "m.onnx"))


# -- operators and limits -----------------------------------------------------------------------


def test_custom_domain_operator_is_unsupported(tmp_path: Path) -> None:
    model = _model(
        [
            helper.make_node("Evil", ["x"], ["y"], domain="com.evil", name="evil"),
            helper.make_node("NotAnOp", ["y"], ["z"], name="fake"),
        ],
        [_vi("x")],
        [_vi("z")],
        opsets=(("", 13), ("com.evil", 1)),
    )
    with pytest.raises(UnsupportedOperator) as err:
        inspect_model(_save(model, tmp_path / "m.onnx"))
    assert "Evil (com.evil)" in err.value.message
    assert "NotAnOp (ai.onnx)" in err.value.message
    assert {o["op_type"] for o in err.value.detail["operators"]} == {"Evil", "NotAnOp"}


def test_too_many_nodes(tmp_path: Path) -> None:
    path = matmul_mlp(tmp_path / "m.onnx")
    with pytest.raises(ResourceLimit, match="more than 3 nodes") as err:
        inspect_model(path, ModelLimits(max_nodes=3))
    assert err.value.detail["node"] == "mm2"
    assert err.value.status == 422


def test_subgraphs_nested_too_deep(tmp_path: Path) -> None:
    inner = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="deep")], "b", [], [_vi("t")])
    for level in range(3):
        inner = helper.make_graph(
            [helper.make_node("If", ["cond"], [f"o{level}"], name=f"if{level}", then_branch=inner, else_branch=inner)],
            f"l{level}",
            [],
            [_vi(f"o{level}")],
        )
    model = _model(list(inner.node), [_vi("x"), _vi("cond", TensorProto.BOOL, [])], [_vi("o2")])
    path = _save(model, tmp_path / "m.onnx")
    assert inspect_model(path).op_counts["If"] == 1 + 2 + 4
    with pytest.raises(ResourceLimit, match="nested"):
        inspect_model(path, ModelLimits(max_subgraph_depth=2))


@pytest.mark.parametrize("from_constant_node", [False, True])
def test_huge_constant_of_shape(tmp_path: Path, from_constant_node: bool) -> None:
    shape = numpy_helper.from_array(np.array([100_000, 100_000, 1_000], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["y"], name="bomb")]
    initializer = [shape]
    if from_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], name="c", value=shape))
        initializer = []
    model = _model(nodes, [], [_vi("y", shape=None)], initializer=initializer)
    with pytest.raises(ResourceLimit, match="bomb") as err:
        inspect_model(_save(model, tmp_path / "m.onnx"))
    assert err.value.detail["shape"] == [100_000, 100_000, 1_000]


def test_huge_declared_initializer(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_mlp(tmp_path / "m.onnx")))
    huge = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    model.graph.initializer.append(huge)
    with pytest.raises(ResourceLimit, match="huge"):
        inspect_model(_save(model, tmp_path / "huge.onnx"))


def test_microsoft_ops_and_local_functions_are_allowed(tmp_path: Path) -> None:
    double = helper.make_function(
        "local.fn",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Double", ["x"], ["d"], domain="local.fn", name="double"),
        helper.make_node("FusedMatMul", ["d", "d"], ["y"], domain="com.microsoft", name="fused"),
    ]
    model = _model(
        nodes,
        [_vi("x", shape=(4, 4))],
        [_vi("y", shape=(4, 4))],
        opsets=(("", 17), ("local.fn", 1), ("com.microsoft", 1)),
    )
    model.functions.append(double)
    info = inspect_model(_save(model, tmp_path / "m.onnx"))
    assert info.op_counts == {"Double": 1, "FusedMatMul": 1}


def test_custom_op_inside_local_function_is_unsupported(tmp_path: Path) -> None:
    sneaky = helper.make_function(
        "local.fn",
        "Sneaky",
        ["a"],
        ["b"],
        [helper.make_node("Evil", ["a"], ["b"], domain="com.evil")],
        [helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)],
    )
    model = _model(
        [helper.make_node("Sneaky", ["x"], ["y"], domain="local.fn", name="s")],
        [_vi("x")],
        [_vi("y")],
        opsets=(("", 17), ("local.fn", 1), ("com.evil", 1)),
    )
    model.functions.append(sneaky)
    with pytest.raises(UnsupportedOperator, match="Evil"):
        inspect_model(_save(model, tmp_path / "m.onnx"))


def test_non_tensor_input_is_reported_without_dims(tmp_path: Path) -> None:
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, None)
    model = _model(
        [helper.make_node("SequenceLength", ["xs"], ["n"], name="len")],
        [seq],
        [_vi("n", TensorProto.INT64, [])],
    )
    info = inspect_model(_save(model, tmp_path / "m.onnx"))
    assert info.inputs == [{"name": "xs", "dtype": "sequence", "shape": []}]
