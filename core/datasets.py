"""Dataset plans: the forms an array takes to feed an input (stacked, batched, constant), the dtype rule,
the feed count and the labels, and the same for a zip of images with its `preprocess`. The API plans a
stored dataset from the facts recorded at upload; the engine plans the same from the file's own headers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.errors import RuleError
from core.images import Preprocess, parse_preprocess
from core.model import TensorSpec, dims_fit, dtype_kind, is_fixed, shape_text

LABELS_KEY = "__labels__"
SINGLE_INPUT_KEY = "*"  # a .npy file's one array: "the model's only input"

# --------------------------------------------------------------------------------------------
# Fitting arrays to inputs


class Form(StrEnum):
    STACKED = "stacked"  # rank r+1: samples on a new leading axis, each fed as is
    BATCHED = "batched"  # rank r: split along axis 0 into batches
    CONSTANT = "constant"  # rank 0 for a scalar input: fed unchanged with every sample


@dataclass(frozen=True)
class ArrayPlan:
    """How one stored array feeds one input."""

    input: TensorSpec
    form: Form
    shape: tuple[int, ...]  # as stored, axis 0 included
    cast_to: str  # numpy dtype name fed to the model
    rows_per_feed: int  # stacked: 1, batched: rows per batch, constant: 0
    num_feeds: int | None  # None for a constant


@dataclass(frozen=True)
class ImagePlan:
    """How a zip of images feeds its one input."""

    input: TensorSpec
    preprocess: Preprocess
    raw: bool  # integer input: raw pixel values instead of (pixel * scale - mean) / std
    rows_per_feed: int | None  # None: rank-3 input, one image per feed without a batch axis
    num_feeds: int


@dataclass(frozen=True)
class DatasetPlan:
    arrays: tuple[ArrayPlan, ...]
    images: ImagePlan | None
    num_feeds: int
    labels_per_feed: int | None  # None: no labels

    @property
    def samples_per_feed(self) -> int:
        """Dataset samples in one full feed: batch rows when split into batches, else 1."""
        if self.images is not None:
            return self.images.rows_per_feed or 1
        return next((p.rows_per_feed for p in self.arrays if p.form == Form.BATCHED), 1)


def mismatch(
    spec: TensorSpec, given_dtype: str | None, given_shape: Sequence[int] | None, problem: str, fix: str
) -> RuleError:
    """A `dataset_model_mismatch` naming the input, what it expects and what the dataset gives."""
    given_text = f"{given_dtype} {shape_text(given_shape)}" if given_dtype else "nothing"
    return RuleError(
        "dataset_model_mismatch",
        f"The dataset cannot feed input {spec.name!r}: {problem} (the model expects {spec.dtype} "
        f"{shape_text(spec.shape)}, the dataset gives {given_text}); {fix}.",
        {
            "input": spec.name,
            "expected": {"dtype": spec.dtype, "shape": None if spec.shape is None else list(spec.shape)},
            "given": None
            if given_dtype is None
            else {"dtype": given_dtype, "shape": None if given_shape is None else list(given_shape)},
        },
    )


def _check_dtype(spec: TensorSpec, dtype: str, shape: Sequence[int]) -> str:
    want, have = dtype_kind(spec.dtype), dtype_kind(dtype)
    if want not in ("float", "int", "bool", "complex"):
        raise mismatch(
            spec, dtype, shape, f"inputs of type {spec.dtype} cannot be fed from arrays", "feed it otherwise"
        )
    if want != have:
        raise mismatch(
            spec,
            dtype,
            shape,
            f"{dtype} data cannot be cast to {spec.dtype} without changing its kind",
            f"save the array as {spec.dtype}",
        )
    return spec.dtype


def _no_samples(spec: TensorSpec) -> RuleError:
    return RuleError(
        "invalid_dataset",
        f"The array for input {spec.name!r} holds no samples (axis 0 has length 0); upload at least one.",
        {"input": spec.name},
    )


def plan_array(spec: TensorSpec, shape: Sequence[int], dtype: str, batch_size: int) -> ArrayPlan:
    """The form in which an array of `shape` feeds `spec`, or a RuleError saying what to change."""
    shape = tuple(int(d) for d in shape)
    cast_to = _check_dtype(spec, dtype, shape)
    if not shape:
        if spec.shape is not None and len(spec.shape) != 0:
            raise mismatch(
                spec,
                dtype,
                shape,
                "a rank-0 array is fed unchanged with every sample, so it fits only a scalar input",
                "add a leading sample axis",
            )
        return ArrayPlan(spec, Form.CONSTANT, shape, cast_to, 0, None)
    if shape[0] == 0:
        raise _no_samples(spec)
    if spec.shape is None:  # unknown rank: the unambiguous form, one sample per row
        return ArrayPlan(spec, Form.STACKED, shape, cast_to, 1, shape[0])
    rank = len(spec.shape)
    if len(shape) == rank + 1:
        if not dims_fit(spec.shape, shape[1:]):
            raise mismatch(
                spec,
                dtype,
                shape,
                "the samples stacked on axis 0 do not have the input's shape",
                "reshape the array so each sample has the input's shape",
            )
        return ArrayPlan(spec, Form.STACKED, shape, cast_to, 1, shape[0])
    if len(shape) == rank:
        if not dims_fit(spec.shape[1:], shape[1:]):
            raise mismatch(
                spec,
                dtype,
                shape,
                "the dimensions after the batch axis differ",
                "reshape the array to the input's shape",
            )
        lead = spec.shape[0]
        rows = int(lead) if is_fixed(lead) else max(1, int(batch_size))
        if is_fixed(lead) and shape[0] % rows:
            raise mismatch(
                spec,
                dtype,
                shape,
                f"the input's batch dimension is fixed to {lead} and {shape[0]} rows do not split into batches "
                f"of {lead}",
                f"give a multiple of {lead} rows, or stack samples on a new leading axis",
            )
        return ArrayPlan(spec, Form.BATCHED, shape, cast_to, rows, math.ceil(shape[0] / rows))
    raise mismatch(
        spec,
        dtype,
        shape,
        f"an array of rank {len(shape)} fits neither accepted form",
        f"give it rank {rank + 1} (samples stacked on a new leading axis) or rank {rank} (split into batches)",
    )


def plan_arrays(
    arrays: Mapping[str, tuple[Sequence[int], str]],
    inputs: Sequence[TensorSpec],
    batch_size: int,
    num_labels: int | None = None,
) -> DatasetPlan:
    """Plan an `.npz` (arrays keyed by input name) or `.npy` (one array keyed SINGLE_INPUT_KEY)
    against the model's inputs. `arrays` maps a name to (shape, dtype name); `num_labels` is the
    length of `__labels__` when the dataset has it."""
    arrays = {k: v for k, v in arrays.items() if k != LABELS_KEY}
    if SINGLE_INPUT_KEY in arrays:
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            shape, dtype = arrays[SINGLE_INPUT_KEY]
            spec = inputs[0] if inputs else TensorSpec("", "undefined", None)
            raise RuleError(
                "dataset_model_mismatch",
                f"A .npy file feeds a single input but the model has {len(inputs)} inputs ({names}); "
                "upload an .npz with one array per input, keyed by the input's name.",
                mismatch(spec, dtype, shape, "", "").detail | {"inputs": [i.name for i in inputs]},
            )
        arrays = {inputs[0].name: arrays[SINGLE_INPUT_KEY]}
    plans = []
    for spec in inputs:
        if spec.name not in arrays:
            available = ", ".join(map(repr, sorted(arrays))) or "nothing"
            raise mismatch(
                spec,
                None,
                None,
                f"the dataset has no array named {spec.name!r}, only {available}",
                "save one array per model input, keyed by the input's name",
            ) from None
        shape, dtype = arrays[spec.name]
        plans.append(plan_array(spec, shape, dtype, batch_size))
    counts = {p.input.name: p.num_feeds for p in plans if p.num_feeds is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k!r} gives {v}" for k, v in counts.items())
        raise RuleError(
            "dataset_model_mismatch",
            f"The dataset's arrays give different numbers of feeds ({listed}); give every input the same "
            "number of samples in the same form (stacked on a new leading axis, or split into batches).",
            {"feeds_per_input": counts},
        )
    num_feeds = next(iter(counts.values()), 1)  # constants only: one feed
    labels_per_feed = None if num_labels is None else _plan_labels(num_labels, plans, num_feeds)
    return DatasetPlan(tuple(plans), None, num_feeds, labels_per_feed)


def check_labels(shape: Sequence[int], dtype: str) -> None:
    """`__labels__` holds one integer class id per sample."""
    if len(shape) != 1 or dtype_kind(dtype) not in ("int", "bool"):
        raise RuleError(
            "invalid_dataset",
            f"{LABELS_KEY!r} is {dtype} {shape_text(shape)} but must be a 1-D array of integer class ids; "
            "save it as numpy int64 of shape (N,).",
            {"array": LABELS_KEY, "dtype": dtype, "shape": list(shape)},
        )


def _plan_labels(n: int, plans: Sequence[ArrayPlan], num_feeds: int) -> int:
    """Labels per feed. The labels are one per sample: per batch row, or per stacked sample."""
    batched = [p for p in plans if p.form == Form.BATCHED]
    if batched:
        rows = batched[0].shape[0]
        if n == rows:
            return batched[0].rows_per_feed
        samples = rows
    elif n == num_feeds:
        return 1
    else:
        stacked = [p for p in plans if p.form == Form.STACKED and len(p.shape) >= 2]
        if stacked and n == num_feeds * stacked[0].shape[1]:
            return stacked[0].shape[1]  # each stacked sample is itself a batch of rows
        samples = num_feeds
    raise RuleError(
        "invalid_dataset",
        f"{LABELS_KEY!r} has {n} labels but the data has {samples} samples; give one class id per sample.",
        {"labels": n, "samples": samples},
    )


def plan_images(pp: Preprocess, num_images: int, inputs: Sequence[TensorSpec], batch_size: int) -> DatasetPlan:
    """Plan a zip of `num_images` images, preprocessed by `pp`, against the model's inputs."""
    specs = {s.name: s for s in inputs}
    given_shape = pp.tensor_shape(num_images)
    spec = specs.get(pp.input)
    if spec is None:
        names = ", ".join(map(repr, specs)) or "none"
        raise RuleError(
            "dataset_model_mismatch",
            f"The images feed input {pp.input!r} (preprocess.input) but the model has no such input (it has "
            f"{names}); upload the images again with preprocess.input set to one of them.",
            {
                "input": pp.input,
                "expected": None,
                "given": {"dtype": "float32", "shape": given_shape},
                "inputs": list(specs),
            },
        )
    others = [s for s in inputs if s.name != pp.input]
    if others:
        raise mismatch(others[0], None, None, "an image dataset feeds only one input", "upload an .npz to feed several")
    kind = dtype_kind(spec.dtype)
    if kind not in ("float", "int"):
        raise mismatch(
            spec, "float32", given_shape, "images become float or integer pixel tensors", "feed this input from an .npz"
        )
    rank = 4 if spec.shape is None else len(spec.shape)
    if rank not in (3, 4):
        raise mismatch(
            spec,
            "float32",
            given_shape,
            f"images become rank-4 (or, without a batch axis, rank-3) tensors but the input has rank {rank}",
            "feed this input from an .npz instead",
        )
    if spec.shape is not None and not dims_fit(spec.shape[-3:], given_shape[1:]):
        raise mismatch(
            spec,
            "float32",
            given_shape,
            f"the preprocessed images ({pp.layout}, {pp.color}, {pp.size[0]}x{pp.size[1]}) do not have the "
            "input's shape",
            "upload the images again with preprocess.size, layout and color matching it",
        )
    rows: int | None = None
    num_feeds = num_images
    if rank == 4:
        lead = spec.shape[0] if spec.shape is not None else None
        rows = int(lead) if is_fixed(lead) else max(1, int(batch_size))
        num_feeds = num_images // rows if is_fixed(lead) else math.ceil(num_images / rows)
        if num_feeds == 0:
            raise mismatch(
                spec,
                "float32",
                given_shape,
                f"{num_images} image(s) cannot fill one batch of the input's fixed size {rows}",
                f"upload at least {rows} images",
            )
    plan = ImagePlan(spec, pp, kind == "int", rows, num_feeds)
    return DatasetPlan((), plan, num_feeds, rows or 1)


def plan_dataset(
    fmt: str,
    tensors: Mapping[str, Mapping[str, Any]],
    inputs: Sequence[TensorSpec],
    batch_size: int,
    *,
    num_samples: int,
    has_labels: bool,
    preprocess: Mapping[str, Any] | None,
) -> DatasetPlan:
    """Plan a stored dataset from the facts recorded at upload (the API's check at job creation;
    the engine plans the same from the file's own headers)."""
    if fmt == "images":
        if preprocess is None:
            raise RuleError(
                "invalid_dataset",
                "The image dataset has no preprocess; upload it again with a preprocess JSON.",
                {"field": "preprocess"},
            )
        plan = plan_images(parse_preprocess(preprocess), num_samples, inputs, batch_size)
        return plan if has_labels else DatasetPlan(plan.arrays, plan.images, plan.num_feeds, None)
    arrays = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in tensors.items()}
    return plan_arrays(arrays, inputs, batch_size, num_samples if has_labels else None)
