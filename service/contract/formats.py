"""Model and dataset formats, and the rules that fit a dataset to a model (onnx + numpy only).

The API applies these rules at upload and at job creation, from facts it stored; the engine
applies the same functions to the files it reads. One home each:
- a graph input as a `TensorSpec` (unknown dims: a `dim_param` name, an empty dim, or any
  non-positive `dim_value`, as Paddle2ONNX writes -1 and 0);
- the graph, subgraph and external-data walks, and the `ModelFacts` they give;
- the `.npy` header reader;
- which entries of an image zip are images, and their labels (class folders or labels.csv);
- the forms an array takes to feed an input (stacked, batched, constant), the dtype rule, the
  feed count and the labels, and the same for a zip of images with its `preprocess`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import IO, Any, Self, TypeGuard

import numpy as np
import onnx
from numpy.lib import format as npformat

from service.contract.errors import RuleError

LABELS_KEY = "__labels__"
SINGLE_INPUT_KEY = "*"  # a .npy file's one array: "the model's only input"
SUBGRAPH_OPS = ("If", "Loop", "Scan")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MAX_NPY_HEADER = 1 << 16
NUMERIC_KINDS = "biufc"  # bool, ints, floats, complex: what an array may hold to feed a tensor
MAX_IMAGE_SIDE = 16_384
PREPROCESS_KEYS = ("input", "size", "layout", "color", "scale", "mean", "std")

Dim = int | str | None
Shape = tuple[Dim, ...]


# --------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: numpy dtype name and shape. A dim is an int (fixed, > 0), a str
    (symbolic) or None (unknown); `shape` None means unknown rank."""

    name: str
    dtype: str
    shape: Shape | None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        shape = data.get("shape")
        return cls(name=data["name"], dtype=data["dtype"], shape=None if shape is None else tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


def is_fixed(dim: object) -> TypeGuard[int]:
    """A dimension the data must match. Non-positive values are how some exporters write 'unknown'."""
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def dims_fit(expected: Sequence[Dim], given: Sequence[int]) -> bool:
    return len(expected) == len(given) and all(not is_fixed(e) or e == g for e, g in zip(expected, given, strict=True))


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    which = d.WhichOneof("value")
    if which == "dim_value":
        return int(d.dim_value) if d.dim_value > 0 else None
    if which == "dim_param" and d.dim_param:
        return d.dim_param
    return None


def dtype_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type ("string", or "undefined" for unknown types)."""
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return "undefined"


def value_info_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tensor = getattr(value.type, kind)
        shape = tuple(_dim(d) for d in tensor.shape.dim) if tensor.HasField("shape") else None
        return TensorSpec(value.name, dtype_name(tensor.elem_type), shape)
    # Sequences, maps and optionals have no dtype or dims: report the kind, which fits no array.
    return TensorSpec(value.name, (kind or "undefined").removesuffix("_type"), ())


def shape_text(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "[unknown rank]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------------
# Graph walks and model facts


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every subgraph a node owns (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield attr.name, g


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for _, g in subgraphs(node):
            yield from iter_graphs(g)


def default_opset(model: onnx.ModelProto) -> int:
    """The `ai.onnx` opset (0 when the model imports none)."""
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores, wherever it stands: initializers (a sparse one as its values
    and indices) and tensor attributes, in every graph and subgraph, in the model's local functions
    and in its training graphs."""
    graphs = [model.graph, *(g for info in model.training_info for g in (info.initialization, info.algorithm))]
    graphs += [g for function in model.functions for node in function.node for _, g in subgraphs(node)]
    for graph in graphs:
        for g in iter_graphs(graph):
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            yield from _attribute_tensors(g.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _attribute_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    kinds = onnx.AttributeProto
    for node in nodes:
        for a in node.attribute:
            if a.type == kinds.TENSOR:
                yield a.t
            elif a.type == kinds.TENSORS:
                yield from a.tensors
            elif a.type == kinds.SPARSE_TENSOR:
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            elif a.type == kinds.SPARSE_TENSORS:
                for sparse in a.sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external-data files the model's tensors name (see `model_tensors`), in order of first
    mention: the files an upload keeps and the engine reads."""
    seen: dict[str, None] = {}
    for t in model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            seen.update({kv.value: None for kv in t.external_data if kv.key == "location"})
    return list(seen)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph inputs that are not initializers, in graph order."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    return [value_info_spec(v) for v in graph.input if v.name not in initializers]


@dataclass(frozen=True)
class ModelFacts:
    """What the recipe and dataset rules need to know of a model (read without its weights)."""

    opset: int
    op_counts: Mapping[str, int]
    node_names: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    ir_version: int = 0
    external_files: tuple[str, ...] = ()

    @property
    def qdq_nodes(self) -> int:
        return sum(self.op_counts.get(op, 0) for op in QDQ_OPS)

    @property
    def has_subgraphs(self) -> bool:
        return any(self.op_counts.get(op, 0) for op in SUBGRAPH_OPS)


def model_facts(model: onnx.ModelProto) -> ModelFacts:
    counts: Counter[str] = Counter()
    names: list[str] = []
    for g in iter_graphs(model.graph):
        counts.update(n.op_type for n in g.node)
        names += [n.name for n in g.node if n.name]
    return ModelFacts(
        opset=default_opset(model),
        op_counts=dict(sorted(counts.items())),
        node_names=tuple(dict.fromkeys(names)),
        inputs=tuple(graph_inputs(model)),
        outputs=tuple(value_info_spec(v) for v in model.graph.output),
        ir_version=int(model.ir_version),
        external_files=tuple(external_locations(model)),
    )


# --------------------------------------------------------------------------------------------
# .npy headers


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    data_offset: int  # from where the header started

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(fp: IO[bytes], what: str) -> NpyHeader:
    """Read and check a `.npy` header at the stream's position (numeric dtypes only, no pickles).
    Raises RuleError `invalid_dataset` naming `what`."""
    start = fp.tell()
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        offset = fp.tell() - start
    except Exception as exc:  # numpy's parser raises many types (TokenError, RecursionError, ...)
        raise RuleError(
            "invalid_dataset",
            f"{what} is not a valid .npy array ({str(exc).strip()[:200]}); save it with numpy.save or numpy.savez.",
            {"array": what},
        ) from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in NUMERIC_KINDS:
        raise RuleError(
            "invalid_dataset",
            f"{what} has dtype {dtype}, which needs pickling or is not numeric; save plain numeric arrays.",
            {"array": what, "dtype": str(dtype)},
        )
    if any(d < 0 for d in shape):
        raise RuleError(
            "invalid_dataset",
            f"{what} declares the negative shape {list(shape)}; save it again.",
            {"array": what, "shape": list(shape)},
        )
    return NpyHeader(tuple(int(d) for d in shape), dtype, bool(fortran), int(offset))


# --------------------------------------------------------------------------------------------
# dtypes


def dtype_kind(name: str | None) -> str:
    """float, int, bool, complex, string, or the name itself for what fits no array."""
    if not name:
        return "undefined"
    if name.startswith(("float", "bfloat")):
        return "float"
    try:
        kind = np.dtype(name).kind
    except TypeError:
        return name
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex", "U": "string", "S": "string"}.get(
        kind, name
    )


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


# --------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a tensor: resized to `size` (H, W), converted to `color`,
    `(pixel * scale - mean) / std` per channel, laid out as `layout`."""

    input: str
    size: tuple[int, int]
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    def tensor_shape(self, n: int) -> list[int]:
        h, w = self.size
        return [n, self.channels, h, w] if self.layout == "NCHW" else [n, h, w, self.channels]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k in PREPROCESS_KEYS if (v := getattr(self, k)) is not None
        }


def parse_preprocess(raw: Mapping[str, Any]) -> Preprocess:
    """The images `preprocess` JSON object, checked, with defaults filled in."""
    unknown = sorted(set(raw) - set(PREPROCESS_KEYS))
    if unknown:
        raise _bad_preprocess(unknown[0], f"is not a known field (known: {', '.join(PREPROCESS_KEYS)})")
    name = raw.get("input")
    if not isinstance(name, str) or not name:
        raise _bad_preprocess("input", "must be the name of the model input the images feed")
    size = raw.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_IMAGE_SIDE for s in size)
    ):
        raise _bad_preprocess("size", f"must be [height, width], two integers from 1 to {MAX_IMAGE_SIDE}")
    layout = str(raw.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise _bad_preprocess("layout", "must be NCHW or NHWC")
    color = str(raw.get("color", "RGB")).upper()
    color = "L" if color in ("GRAY", "GREY", "GRAYSCALE") else color
    if color not in ("RGB", "BGR", "L"):
        raise _bad_preprocess("color", "must be RGB, BGR or L (grayscale)")
    channels = 1 if color == "L" else 3
    scale = raw.get("scale", 1.0 / 255.0)
    if not _is_number(scale) or not scale > 0:
        raise _bad_preprocess("scale", "must be a positive number such as 0.00392 (1/255)")
    mean = _per_channel(raw.get("mean", 0.0), channels, "mean", positive=False)
    std = _per_channel(raw.get("std", 1.0), channels, "std", positive=True)
    return Preprocess(name, (int(size[0]), int(size[1])), layout, color, float(scale), mean, std)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _per_channel(value: object, channels: int, name: str, *, positive: bool) -> tuple[float, ...]:
    values = [value] * channels if _is_number(value) else value
    if not isinstance(values, list | tuple) or len(values) != channels or not all(_is_number(v) for v in values):
        raise _bad_preprocess(name, f"must be one number or a list of {channels}, one per colour channel")
    if positive and not all(float(v) > 0 for v in values):
        raise _bad_preprocess(name, "must hold positive numbers")
    return tuple(float(v) for v in values)


def _bad_preprocess(name: str, problem: str) -> RuleError:
    return RuleError(
        "invalid_dataset",
        f"The field preprocess.{name} {problem}; fix it and upload again.",
        {"field": f"preprocess.{name}"},
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


# --------------------------------------------------------------------------------------------
# Image archives: which entries are images, and their labels


@dataclass(frozen=True)
class ImageIndex:
    """The images of an archive in feed order (sorted names), and their class ids (None when
    unlabelled): ids from class folders (sorted folder names) or from `labels.csv`."""

    members: tuple[str, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] = ()
    label_source: str | None = None  # "folders" | "labels.csv" | None

    @property
    def num_samples(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else max(self.labels) + 1


def member_name(name: str) -> str | None:
    """A zip entry's name as a normalised relative POSIX path, or None when it is a directory or
    unsafe (empty, absolute, a drive letter, a `..` component, a backslash, a control character)."""
    if not name or name.endswith("/"):
        return None
    if "\\" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return None
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return str(PurePosixPath(*parts))


def is_litter(name: str) -> bool:
    """macOS and editor litter that archivers add: __MACOSX/, .DS_Store, ._resource forks."""
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def index_images(entries: Sequence[str], read_text: Callable[[str], str]) -> ImageIndex:
    """Index an image archive from its file entries (safe names, see `member_name`): every entry
    but litter and `labels.csv` is an image. `read_text(entry)` gives labels.csv's text."""
    files = sorted(n for n in entries if not is_litter(n))
    csvs = [n for n in files if PurePosixPath(n).name == LABELS_CSV]
    images = [n for n in files if PurePosixPath(n).name != LABELS_CSV]
    if len(csvs) > 1:
        raise _bad_images(f"The zip holds {len(csvs)} labels.csv files; keep one.", entries=csvs)
    if not images:
        raise _bad_images("The zip holds no images; add JPEG or PNG files.")
    if csvs:
        return _labels_from_csv(csvs[0], read_text(csvs[0]), images)
    return _labels_from_folders(images)


LABELS_CSV = "labels.csv"
_INT_LABEL = re.compile(r"[+-]?\d+")
_CSV_HEADERS = ("filename", "file", "image", "path", "name")


def _bad_images(message: str, **detail: Any) -> RuleError:
    return RuleError("invalid_dataset", message, detail)


def _labels_from_folders(images: list[str]) -> ImageIndex:
    """ImageFolder-style: the first folder level below any common wrapper folder is the class."""
    parts = [PurePosixPath(n).parts for n in images]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    relative = [p[depth:] for p in parts]
    if all(len(r) == 1 for r in relative):
        return ImageIndex(tuple(images), None)
    loose = next((n for n, r in zip(images, relative, strict=True) if len(r) == 1), None)
    if loose is not None:
        raise _bad_images(
            f"Image {loose!r} is outside any class folder while other images are in class folders; "
            "put every image in a class folder, or none and add labels.csv.",
            entry=loose,
        )
    classes = sorted({r[0] for r in relative})
    ids = {c: i for i, c in enumerate(classes)}
    return ImageIndex(tuple(images), tuple(ids[r[0]] for r in relative), tuple(classes), "folders")


def _labels_from_csv(entry: str, text: str, images: list[str]) -> ImageIndex:
    folder = PurePosixPath(entry).parent
    by_path: dict[str, str] = {}
    by_base: dict[str, list[str]] = {}
    for image in images:
        path = PurePosixPath(image)
        if folder == PurePosixPath("."):
            by_path[image] = image
        elif folder in path.parents:
            by_path[str(path.relative_to(folder))] = image
        by_base.setdefault(path.name, []).append(image)
    labels: dict[str, str] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if line_no == 1 and row[0].strip().lower() in _CSV_HEADERS:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise _bad_images(
                f"Line {line_no} of labels.csv is not `filename,label`; write one image and its label per line.",
                entry=entry,
                line=line_no,
            )
        key = member_name(row[0].strip()) or ""
        match = by_path.get(key)
        if match is None and len(by_base.get(key, [])) == 1:
            match = by_base[key][0]
        if match is None:
            raise _bad_images(
                f"Line {line_no} of labels.csv names {row[0].strip()!r}, which is not an image in the zip; "
                "fix the file name.",
                entry=entry,
                line=line_no,
                file_name=row[0].strip(),
            )
        if match in labels:
            raise _bad_images(
                f"labels.csv labels {match!r} twice (line {line_no}); keep one line per image.",
                entry=entry,
                line=line_no,
                file_name=match,
            )
        labels[match] = row[1].strip()
    missing = [i for i in images if i not in labels]
    if missing:
        raise _bad_images(
            f"Image {missing[0]!r} has no line in labels.csv ({len(missing)} of {len(images)} images "
            "lack one); label every image.",
            entry=missing[0],
            unlabelled=len(missing),
        )
    values = [labels[i] for i in images]
    if all(_INT_LABEL.fullmatch(v) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise _bad_images("labels.csv has a negative class id; use ids from 0 or class names.", entry=entry)
        return ImageIndex(tuple(images), tuple(ids), (), "labels.csv")
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return ImageIndex(tuple(images), tuple(index[v] for v in values), tuple(classes), "labels.csv")


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
