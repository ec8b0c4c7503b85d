"""Whether a dataset's arrays can feed a model's inputs, decided from shapes and dtypes alone.

The forms of the HTTP contract: an array of rank r+1 for an input of rank r holds samples stacked
on a new leading axis; an array of rank r is split along axis 0 into batches of `batch_size`; a
rank-0 array is fed unchanged with every sample, so it only fits a rank-0 input. Fixed dims must
match; symbolic or unnamed dims match anything; an input of unknown rank accepts any shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import DatasetModelMismatch
from service.inspection.dataset import LABELS_KEY, SINGLE_INPUT_KEY

Shape = Sequence[int | str | None] | None


def check_dataset_fits_model(
    dataset_format: str,
    tensors: dict[str, dict[str, Any]],
    model_inputs: list[dict[str, Any]],
    batch_size: int,
) -> None:
    """Raise DatasetModelMismatch naming the first input the dataset cannot feed."""
    by_name = {i["name"]: i for i in model_inputs}
    if dataset_format == "images":
        _check_images(tensors, model_inputs, by_name, batch_size)
        return
    if dataset_format == "npy":
        arrays = _single_input_arrays(tensors, model_inputs)
    else:
        arrays = {k: v for k, v in tensors.items() if k != LABELS_KEY}
    forms: dict[str, str] = {}
    for spec in model_inputs:
        given = arrays.get(spec["name"])
        if given is None:
            available = ", ".join(map(repr, sorted(arrays))) or "nothing"
            raise _mismatch(
                spec,
                None,
                f"the dataset has no array named {spec['name']!r}, only {available}",
                "save one array per model input, keyed by the input's name",
            )
        _check_dtype(spec, given)
        forms[spec["name"]] = _check_shape(spec, given, batch_size)
    stacked = [n for n, f in forms.items() if f == "stacked"]
    batched = [n for n, f in forms.items() if f == "batched"]
    if stacked and batched and batch_size != 1:
        spec = by_name[batched[0]]
        raise _mismatch(
            spec,
            arrays[spec["name"]],
            f"its array is split into batches of {batch_size} while {stacked[0]!r} holds one sample per "
            "row, so they give different numbers of feeds",
            f"add a leading sample axis to {spec['name']!r} or set the batch size to 1",
        )


def _single_input_arrays(
    tensors: dict[str, dict[str, Any]], model_inputs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    given = tensors.get(SINGLE_INPUT_KEY)
    if given is None:
        given = next((v for k, v in tensors.items() if k != LABELS_KEY), None)
    if len(model_inputs) != 1:
        spec = model_inputs[0] if model_inputs else {"name": "", "dtype": None, "shape": None}
        names = ", ".join(repr(i["name"]) for i in model_inputs) or "none"
        raise DatasetModelMismatch(
            f"A .npy file feeds a single input but the model has {len(model_inputs)} inputs ({names}); "
            "upload an .npz with one array per input.",
            detail=_detail(spec, given) | {"inputs": [i["name"] for i in model_inputs]},
        )
    return {model_inputs[0]["name"]: given} if given is not None else {}


def _check_images(
    tensors: dict[str, dict[str, Any]],
    model_inputs: list[dict[str, Any]],
    by_name: dict[str, dict[str, Any]],
    batch_size: int,
) -> None:
    if not tensors:
        raise DatasetModelMismatch(
            "The image dataset describes no input tensor; upload it again with a preprocess JSON.",
            detail={"input": None, "expected": None, "given": None},
        )
    (name, given), *_ = tensors.items()
    spec = by_name.get(name)
    if spec is None:
        names = ", ".join(repr(i["name"]) for i in model_inputs) or "none"
        raise DatasetModelMismatch(
            f"The images feed input {name!r} (preprocess.input) but the model has no such input (it has "
            f"{names}); set preprocess.input to one of them.",
            detail={"input": name, "expected": None, "given": _tensor(given), "inputs": list(by_name)},
        )
    others = [i for i in model_inputs if i["name"] != name]
    if others:
        raise _mismatch(
            others[0], None, "an image dataset feeds only one input", "upload an .npz to feed several inputs"
        )
    shape = spec["shape"]
    if shape is not None and len(shape) != 4:
        raise _mismatch(
            spec,
            given,
            f"images become rank-4 tensors but the input has rank {len(shape)}",
            "feed this input from an .npz instead",
        )
    if _kind(spec["dtype"]) != "float":
        raise _mismatch(
            spec,
            given,
            "images become float32 tensors but the input is not a float tensor",
            "feed this input from an .npz instead",
        )
    if shape is None:
        return
    if not _dims_fit(shape[1:], given["shape"][1:]):
        raise _mismatch(
            spec,
            given,
            "the preprocessed images do not have the input's shape",
            "set preprocess.size and preprocess.layout to match it",
        )
    _check_fixed_batch(spec, given, batch_size)


def _check_shape(spec: dict[str, Any], given: dict[str, Any], batch_size: int) -> str:
    """The form the array takes ("stacked", "batched", "constant", "any"), or raise."""
    expected: Shape = spec["shape"]
    shape = list(given["shape"])
    if expected is None:
        return "any"
    rank = len(expected)
    if len(shape) == 0:
        if rank != 0:
            raise _mismatch(
                spec,
                given,
                "a rank-0 array is fed unchanged with every sample, so it fits only a scalar input",
                "add a leading sample axis",
            )
        return "constant"
    if len(shape) == rank + 1:
        if not _dims_fit(expected, shape[1:]):
            raise _mismatch(
                spec,
                given,
                "the samples stacked on axis 0 do not have the input's shape",
                "reshape the array so each sample has the input's shape",
            )
        return "stacked"
    if len(shape) == rank:
        if not _dims_fit(expected[1:], shape[1:]):
            raise _mismatch(
                spec,
                given,
                "the dimensions after the batch axis differ",
                "reshape the array to the input's shape",
            )
        _check_fixed_batch(spec, given, batch_size)
        return "batched"
    raise _mismatch(
        spec,
        given,
        f"an array of rank {len(shape)} fits neither accepted form",
        f"give it rank {rank + 1} (samples stacked on a new leading axis) or rank {rank} (split into batches)",
    )


def _check_fixed_batch(spec: dict[str, Any], given: dict[str, Any], batch_size: int) -> None:
    lead = spec["shape"][0]
    if isinstance(lead, int) and lead >= 0 and lead != batch_size:
        raise _mismatch(
            spec,
            given,
            f"the input's batch dimension is fixed to {lead} but the batch size is {batch_size}",
            f"set the batch size to {lead} or stack samples on a new leading axis",
        )


def _dims_fit(expected: Sequence[int | str | None], given: Sequence[int]) -> bool:
    if len(expected) != len(given):
        return False
    return all(not _fixed(e) or e == g for e, g in zip(expected, given, strict=True))


def _fixed(dim: int | str | None) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0


def _kind(dtype: str | None) -> str:
    if not dtype:
        return "unknown"
    kind: str
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        kind = ""
    if kind == "f" or dtype.startswith(("float", "bfloat")):
        return "float"
    if kind and kind in "iu":
        return "int"
    if kind == "b":
        return "bool"
    if kind == "c":
        return "complex"
    return dtype


def _check_dtype(spec: dict[str, Any], given: dict[str, Any]) -> None:
    want, have = _kind(spec["dtype"]), _kind(given["dtype"])
    if want != have:
        raise _mismatch(
            spec,
            given,
            f"{given['dtype']} data cannot be cast to {spec['dtype']} without changing its kind",
            f"save the array as {spec['dtype']}",
        )


def _mismatch(spec: dict[str, Any], given: dict[str, Any] | None, problem: str, fix: str) -> DatasetModelMismatch:
    given_text = f"{given['dtype']} {_shape_text(given['shape'])}" if given else "nothing"
    return DatasetModelMismatch(
        f"The dataset cannot feed input {spec['name']!r}: {problem} (the model expects {spec['dtype']} "
        f"{_shape_text(spec['shape'])}, the dataset gives {given_text}); {fix}.",
        detail=_detail(spec, given),
    )


def _detail(spec: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    return {"input": spec["name"], "expected": _tensor(spec), "given": _tensor(given) if given else None}


def _tensor(tensor: dict[str, Any] | None) -> dict[str, Any] | None:
    if tensor is None or tensor.get("dtype") is None:
        return None
    shape = tensor.get("shape")
    return {"dtype": tensor["dtype"], "shape": list(shape) if shape is not None else None}


def _shape_text(shape: Shape) -> str:
    if shape is None:
        return "[unknown rank]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
