"""check_dataset_fits_model: every accepted form and every mismatch."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import DatasetModelMismatch
from service.inspection.compat import check_dataset_fits_model


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


def _refused(fmt: str, tensors: dict[str, Any], inputs: list[dict[str, Any]], batch_size: int = 8):
    with pytest.raises(DatasetModelMismatch) as err:
        check_dataset_fits_model(fmt, tensors, inputs, batch_size)
    assert err.value.status == 422
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


def test_fixed_batch_dimension_differs_from_batch_size() -> None:
    err = _refused("npz", {"x": _t("float32", [10, 4])}, [_in("x", "float32", [1, 4])], 8)
    assert "fixed to 1" in err.message


@pytest.mark.parametrize(("given", "expected"), [("int64", "float32"), ("float32", "int64"), ("bool", "int32")])
def test_dtype_kind_differs(given: str, expected: str) -> None:
    err = _refused("npz", {"x": _t(given, [10, 4])}, [_in("x", expected, ["n", 4])])
    assert err.detail["given"]["dtype"] == given
    assert err.detail["expected"]["dtype"] == expected


def test_stacked_and_batched_mixed_with_batches() -> None:
    inputs = [_in("a", "float32", ["n", 4]), _in("b", "float32", ["n", 4])]
    tensors = {"a": _t("float32", [10, 1, 4]), "b": _t("float32", [10, 4])}
    err = _refused("npz", tensors, inputs, 8)
    assert err.detail["input"] == "b"
    check_dataset_fits_model("npz", tensors, inputs, 1)  # with batches of one, both forms agree


def test_images_input_missing() -> None:
    err = _refused("images", {"pixels": _t("float32", [20, 3, 8, 8])}, IMAGE)
    assert err.detail["input"] == "pixels"


def test_images_input_not_float_or_not_rank4() -> None:
    _refused("images", {"ids": _t("float32", [20, 3, 8, 8])}, [_in("ids", "int64", ["n", 3, 8, 8])])
    _refused("images", {"x": _t("float32", [20, 3, 8, 8])}, [_in("x", "float32", ["n", 192])])


def test_images_size_or_layout_differs() -> None:
    err = _refused("images", {"input": _t("float32", [20, 8, 8, 3])}, IMAGE)
    assert "preprocess" in err.message


def test_images_fixed_batch_differs() -> None:
    _refused("images", {"input": _t("float32", [20, 3, 8, 8])}, [_in("input", "float32", [1, 3, 8, 8])], 4)


def test_images_cannot_feed_a_second_input() -> None:
    inputs = [*IMAGE, _in("scale", "float32", [])]
    err = _refused("images", {"input": _t("float32", [20, 3, 8, 8])}, inputs)
    assert err.detail["input"] == "scale"
