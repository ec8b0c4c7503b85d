"""The shared fit rules (core.model, core.npy, core.images, core.datasets): every accepted form and every
mismatch, as the API applies them at job creation to the shapes it stored at upload."""

from __future__ import annotations

from typing import Any

import pytest

from core.datasets import DatasetPlan, plan_dataset
from core.errors import RuleError
from core.model import TensorSpec


def check_dataset_fits_model(
    fmt: str, tensors: dict[str, Any], inputs: list[dict[str, Any]], batch_size: int, **preprocess: Any
) -> DatasetPlan:
    """Plan a stored dataset; image datasets are described by their preprocess (their one tensor's
    name and layout give it here)."""
    pp = None
    num_samples = next((t["shape"][0] for t in tensors.values() if t["shape"]), 1)
    if fmt == "images":
        ((name, tensor),) = tensors.items()
        nhwc = tensor["shape"][-1] == 3
        size = tensor["shape"][1:3] if nhwc else tensor["shape"][2:4]
        pp = {"input": name, "size": size, "layout": "NHWC" if nhwc else "NCHW", **preprocess}
    return plan_dataset(
        fmt,
        {k: v for k, v in tensors.items() if k != "__labels__"},
        [TensorSpec.from_mapping(i) for i in inputs],
        batch_size,
        num_samples=num_samples,
        has_labels="__labels__" in tensors,
        preprocess=pp,
    )


def _in(name: str, dtype: str, shape: list[Any] | None) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def _t(dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape}


IMAGE = [_in("input", "float32", ["batch", 3, 8, 8])]
MULTI = [
    _in("x", "float32", ["batch", 4]),
    _in("step", "int64", []),
    _in("state", "float32", [2, "batch", 8]),
]


# -- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "batch_size"),
    [
        ({"input": _t("float32", [10, 1, 3, 8, 8])}, 8),  # stacked
        ({"input": _t("float64", [10, 3, 8, 8])}, 8),  # batched, same-kind cast
        (
            {
                "input": _t("float32", [10, 3, 8, 8]),
                "__labels__": _t("int64", [10]),
                "extra": _t("int8", [3]),
            },
            4,
        ),
    ],
)
def test_single_input_forms(tensors: dict[str, Any], batch_size: int) -> None:
    check_dataset_fits_model("npz", tensors, IMAGE, batch_size)


def test_npy_feeds_the_only_input() -> None:
    check_dataset_fits_model("npy", {"*": _t("float32", [10, 3, 8, 8])}, IMAGE, 2)


def test_rank0_array_feeds_scalar_input() -> None:
    check_dataset_fits_model("npz", {"t": _t("int32", [])}, [_in("t", "int64", [])], 8)


def test_multi_input_with_scalar_and_state_on_axis1() -> None:
    tensors = {
        "x": _t("float32", [6, 1, 4]),
        "step": _t("int32", []),
        "state": _t("float32", [6, 2, 1, 8]),
        "__labels__": _t("int64", [6]),
    }
    check_dataset_fits_model("npz", tensors, MULTI, 8)
    tensors["step"] = _t("int64", [6])  # a scalar per sample, stacked
    check_dataset_fits_model("npz", tensors, MULTI, 8)


def test_fixed_batch_dimension_equal_to_batch_size() -> None:
    check_dataset_fits_model("npz", {"x": _t("float32", [10, 4])}, [_in("x", "float32", [1, 4])], 1)


def test_unknown_rank_input_accepts_any_shape() -> None:
    check_dataset_fits_model("npz", {"x": _t("float32", [10, 4, 5])}, [_in("x", "float32", None)], 8)


def test_images_fit() -> None:
    check_dataset_fits_model("images", {"input": _t("float32", [20, 3, 8, 8])}, IMAGE, 4)
    nhwc = [_in("img", "float16", [None, 8, 8, 3])]
    check_dataset_fits_model("images", {"img": _t("float32", [20, 8, 8, 3])}, nhwc, 4)


# -- mismatches --------------------------------------------------------------------------------


def _refused(fmt: str, tensors: dict[str, Any], inputs: list[dict[str, Any]], batch_size: int = 8) -> RuleError:
    with pytest.raises(RuleError) as err:
        check_dataset_fits_model(fmt, tensors, inputs, batch_size)
    assert err.value.code == "dataset_model_mismatch"
    return err.value


def test_missing_input_array() -> None:
    err = _refused("npz", {"x": _t("float32", [6, 1, 4])}, MULTI)
    assert err.detail["input"] == "step"
    assert err.detail["expected"] == {"dtype": "int64", "shape": []}
    assert err.detail["given"] is None
    assert "'step'" in err.message


def test_npy_with_multi_input_model() -> None:
    err = _refused("npy", {"*": _t("float32", [6, 4])}, MULTI)
    assert err.detail["inputs"] == ["x", "step", "state"]
    assert "3 inputs" in err.message


def test_wrong_rank() -> None:
    err = _refused("npz", {"input": _t("float32", [10, 8, 8])}, IMAGE)
    assert err.detail == {
        "input": "input",
        "expected": {"dtype": "float32", "shape": ["batch", 3, 8, 8]},
        "given": {"dtype": "float32", "shape": [10, 8, 8]},
    }
    assert "rank 3" in err.message


def test_stacked_shape_differs() -> None:
    err = _refused("npz", {"input": _t("float32", [10, 1, 3, 16, 16])}, IMAGE)
    assert "stacked" in err.message


def test_batched_shape_differs() -> None:
    err = _refused("npz", {"input": _t("float32", [10, 1, 8, 8])}, IMAGE)
    assert "after the batch axis" in err.message


def test_rank0_array_for_non_scalar_input() -> None:
    err = _refused("npz", {"input": _t("float32", [])}, IMAGE)
    assert "rank-0" in err.message


def test_fixed_batch_dimension_wins_over_batch_size() -> None:
    """The model cannot take another batch size, so a fixed leading dim sets the rows per feed."""
    plan = check_dataset_fits_model("npz", {"x": _t("float32", [10, 4])}, [_in("x", "float32", [2, 4])], 8)
    assert (plan.num_feeds, plan.samples_per_feed) == (5, 2)
    err = _refused("npz", {"x": _t("float32", [9, 4])}, [_in("x", "float32", [2, 4])], 8)
    assert "fixed to 2" in err.message and "9 rows" in err.message


@pytest.mark.parametrize(("given", "expected"), [("int64", "float32"), ("float32", "int64"), ("bool", "int32")])
def test_dtype_kind_differs(given: str, expected: str) -> None:
    err = _refused("npz", {"x": _t(given, [10, 4])}, [_in("x", expected, ["n", 4])])
    assert err.detail["given"]["dtype"] == given
    assert err.detail["expected"]["dtype"] == expected


def test_stacked_and_batched_mixed_with_batches() -> None:
    inputs = [_in("a", "float32", ["n", 4]), _in("b", "float32", ["n", 4])]
    tensors = {"a": _t("float32", [10, 1, 4]), "b": _t("float32", [10, 4])}
    err = _refused("npz", tensors, inputs, 8)
    assert err.detail["feeds_per_input"] == {"a": 10, "b": 2}
    check_dataset_fits_model("npz", tensors, inputs, 1)  # with batches of one, both forms agree


def test_images_input_missing() -> None:
    err = _refused("images", {"pixels": _t("float32", [20, 3, 8, 8])}, IMAGE)
    assert err.detail["input"] == "pixels"


def test_images_input_of_another_kind_or_rank() -> None:
    _refused("images", {"s": _t("float32", [20, 3, 8, 8])}, [_in("s", "string", ["n", 3, 8, 8])])
    _refused("images", {"x": _t("float32", [20, 3, 8, 8])}, [_in("x", "float32", ["n", 192])])


def test_images_feed_integer_and_rank3_inputs() -> None:
    """Raw pixels for an integer input; one image per feed for an input without a batch axis."""
    plan = check_dataset_fits_model(
        "images", {"ids": _t("float32", [20, 3, 8, 8])}, [_in("ids", "uint8", ["n", 3, 8, 8])], 4
    )
    assert plan.images is not None and plan.images.raw and plan.num_feeds == 5
    plan = check_dataset_fits_model("images", {"x": _t("float32", [20, 3, 8, 8])}, [_in("x", "float32", [3, 8, 8])], 4)
    assert plan.images is not None and plan.images.rows_per_feed is None and plan.num_feeds == 20


def test_images_size_or_layout_differs() -> None:
    err = _refused("images", {"input": _t("float32", [20, 8, 8, 3])}, IMAGE)
    assert "preprocess" in err.message


def test_images_fixed_batch() -> None:
    """A fixed batch sets the images per feed; a remainder that cannot fill a batch is left out."""
    plan = check_dataset_fits_model(
        "images", {"input": _t("float32", [20, 3, 8, 8])}, [_in("input", "float32", [3, 3, 8, 8])], 4
    )
    assert plan.num_feeds == 6
    err = _refused("images", {"input": _t("float32", [2, 3, 8, 8])}, [_in("input", "float32", [3, 3, 8, 8])], 4)
    assert "fixed size 3" in err.message


def test_images_cannot_feed_a_second_input() -> None:
    inputs = [*IMAGE, _in("scale", "float32", [])]
    err = _refused("images", {"input": _t("float32", [20, 3, 8, 8])}, inputs)
    assert err.detail["input"] == "scale"


# -- unknown dims as exporters write them ------------------------------------------------------


@pytest.mark.parametrize("unknown", [-1, 0, None, "batch"])
def test_non_positive_dims_are_unknown(unknown: Any) -> None:
    """Paddle2ONNX writes an unknown batch as dim_value -1 (sometimes 0): any non-positive value
    is an unknown dimension, for stacked, batched and image datasets, with and without labels."""
    inputs = [_in("x", "float32", [unknown, 3, unknown, -1])]
    stacked = {"x": _t("float32", [32, 1, 3, 48, 192]), "__labels__": _t("int64", [32])}
    plan = check_dataset_fits_model("npz", stacked, inputs, 8)
    assert (plan.num_feeds, plan.labels_per_feed) == (32, 1)
    plan = check_dataset_fits_model("npz", {"x": _t("float32", [32, 3, 48, 192])}, inputs, 8)
    assert (plan.num_feeds, plan.samples_per_feed) == (4, 8)
    plan = check_dataset_fits_model("images", {"x": _t("float32", [32, 3, 48, 192])}, inputs, 8)
    assert plan.num_feeds == 4
    _refused("npz", {"x": _t("float32", [32, 1, 4, 48, 192])}, inputs)  # 3 channels stay fixed


def test_value_info_reads_non_positive_dims_as_unknown() -> None:
    from onnx import TensorProto, helper

    from core.model import value_info_spec

    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0, "w"])
    assert value_info_spec(vi) == TensorSpec("x", "float32", (None, 3, None, "w"))
    no_shape = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    assert value_info_spec(no_shape).shape is None


# -- the external-data walk --------------------------------------------------------------------


def test_one_walk_finds_every_external_file_for_the_upload_and_the_engine(tmp_path: Any) -> None:
    """External data named by a top initializer, a Constant in an If branch, a subgraph's own
    initializer and a Constant inside a local function: the upload keeps exactly the files the
    shared walk lists, and the engine counts the same files in a model's size."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    from core.model import external_locations
    from service.inspection.model import inspect_model
    from worker.engine.checks import model_facts, model_size
    from worker.engine.evaluate import size_on_disk

    def vi(name: str, shape: list[int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], name=name, value=numpy_helper.from_array(np.full(4, value, np.float32), name)
        )

    then = helper.make_graph(
        [const("then_c", 2.0), helper.make_node("Mul", ["h", "then_c"], ["t"], name="then_mul")],
        "then",
        [],
        [vi("t", [4])],
    )
    other = helper.make_graph(
        [helper.make_node("Add", ["h", "else_w"], ["e"], name="else_add")],
        "else",
        [],
        [vi("e", [4])],
        initializer=[numpy_helper.from_array(np.full(4, 3.0, np.float32), "else_w")],
    )
    scale = helper.make_function(
        "local.fn",
        "Scale",
        ["a"],
        ["b"],
        [const("fn_c", 0.5), helper.make_node("Mul", ["a", "fn_c"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "w"], ["h"], name="add"),
            helper.make_node("If", ["c"], ["y0"], name="if", then_branch=then, else_branch=other),
            helper.make_node("Scale", ["y0"], ["y"], name="scale", domain="local.fn"),
        ],
        "g",
        [vi("x", [4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [vi("y", [4])],
        initializer=[numpy_helper.from_array(np.ones(4, np.float32), "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)], functions=[scale]
    )
    model.ir_version = 8
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != "model.onnx")
    assert len(files) == 4, files  # w, then_c, else_w, fn_c

    assert sorted(external_locations(onnx.load(str(path), load_external_data=False))) == files
    assert sorted(inspect_model(path).external_data) == files
    assert (
        size_on_disk(path) == model_size(path, model_facts(path)) == sum(p.stat().st_size for p in tmp_path.iterdir())
    )
