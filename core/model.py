"""ONNX model facts: a graph input or output as a `TensorSpec`, the graph, subgraph and external-data
walks, and the `ModelFacts` the API stores at upload and the engine reads from the file.

Unknown dims: a `dim_param` name, an empty dim, or any non-positive `dim_value` (Paddle2ONNX writes -1 and 0)."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Self, TypeGuard

import numpy as np
import onnx
from pydantic import Field

from core.errors import RuleError

SUBGRAPH_OPS = ("If", "Loop", "Scan")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

Dim = int | str | None
Shape = tuple[Dim, ...]
Site = tuple[str, onnx.TensorProto | onnx.SparseTensorProto]  # where a tensor stands (for messages), the tensor

# --------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: numpy dtype name and shape. A dim is an int (fixed, > 0), a str
    (symbolic) or None (unknown); `shape` None means unknown rank."""

    name: Annotated[str, Field(examples=["input"])]
    dtype: Annotated[str, Field(examples=["float32"])]
    shape: Annotated[Shape | None, Field(examples=[["batch", 3, 224, 224]])]

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


def tensor_sites(model: onnx.ModelProto) -> Iterator[Site]:
    """Every tensor the model stores, with where it stands (a phrase for messages): the initializers
    and sparse initializers of the main graph, of the training graphs (`training_info`: initialization
    and algorithm) and of every subgraph, and the tensors of node attributes everywhere, in local
    functions and in their attribute defaults (`FunctionProto.attribute_proto`) too.

    An attribute is read by what it holds, not by the type it declares: the checker never sees
    training graphs or function defaults, so nothing vouches there that the two agree."""
    yield from _graph_sites(model.graph, "the main graph")
    for i, info in enumerate(model.training_info):
        yield from _graph_sites(info.initialization, f"the initialization graph of training_info[{i}]")
        yield from _graph_sites(info.algorithm, f"the algorithm graph of training_info[{i}]")
    for function in model.functions:
        where = f"function {function.name!r}"
        yield from _node_sites(function.node, where)
        for attr in function.attribute_proto:
            yield from _attribute_sites(attr, f"the default of attribute {attr.name!r} of {where}")


def _graph_sites(graph: onnx.GraphProto, where: str) -> Iterator[Site]:
    for tensor in graph.initializer:
        yield f"initializer {tensor.name!r} in {where}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer {sparse.values.name!r} in {where}", sparse
    yield from _node_sites(graph.node, where)


def _node_sites(nodes: Iterable[onnx.NodeProto], where: str) -> Iterator[Site]:
    for node in nodes:
        label = f"node {node.name!r}" if node.name else "an unnamed node"
        for attr in node.attribute:
            yield from _attribute_sites(attr, f"attribute {attr.name!r} of {label} ({node.op_type}) in {where}")


def _attribute_sites(attr: onnx.AttributeProto, where: str) -> Iterator[Site]:
    if attr.HasField("t"):
        yield where, attr.t
    for tensor in attr.tensors:
        yield where, tensor
    if attr.HasField("sparse_tensor"):
        yield where, attr.sparse_tensor
    for sparse in attr.sparse_tensors:
        yield where, sparse
    for graph in [attr.g] if attr.HasField("g") else []:
        yield from _graph_sites(graph, f"graph {graph.name!r}" if graph.name else f"the graph of {where}")
    for graph in attr.graphs:
        yield from _graph_sites(graph, f"graph {graph.name!r}" if graph.name else f"a graph of {where}")


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores, wherever it stands (see `tensor_sites`); a sparse one as its
    values and indices."""
    for _, tensor in tensor_sites(model):
        if isinstance(tensor, onnx.SparseTensorProto):
            yield from (tensor.values, tensor.indices)
        else:
            yield tensor


@dataclass(frozen=True)
class ExternalData:
    """Where one tensor's bytes are kept outside the protobuf, checked by `external_data`: `location`
    is a plain file name (the file beside the model), `offset` and `length` are not negative
    (`length` None: to the end of the file)."""

    where: str
    tensor: onnx.TensorProto
    location: str
    offset: int
    length: int | None


_EXTERNAL_FIX = (
    "; name each weight file by its plain file name (for example 'weights.bin', no folder, each key once) "
    "and upload it with the model"
)


def external_data(model: onnx.ModelProto) -> list[ExternalData]:
    """The external data of every tensor that keeps its bytes outside the protobuf (see `tensor_sites`).

    Raises RuleError `external_data_escape` for an entry no reader may follow: a key given twice (readers
    disagree on which one counts), no location, or a location that is not a plain file name (absolute,
    with a folder, `..`, a backslash or a NUL), or an offset or length that is not a non-negative integer.
    The upload refuses such a model, and the engine never links or opens such a location."""
    found: list[ExternalData] = []
    for where, tensor in tensor_sites(model):
        for t in (tensor.values, tensor.indices) if isinstance(tensor, onnx.SparseTensorProto) else (tensor,):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                found.append(_external_entry(where, t))
    return found


def _external_entry(where: str, tensor: onnx.TensorProto) -> ExternalData:
    keys = Counter(e.key for e in tensor.external_data)
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    detail: dict[str, Any] = {"tensor": tensor.name, "location": location}

    def escape(problem: str) -> RuleError:
        return RuleError("external_data_escape", f"The external data of {where} {problem}{_EXTERNAL_FIX}.", detail)

    twice = sorted(k for k, n in keys.items() if n > 1)
    if twice:
        detail["keys"] = twice
        raise escape(f"gives the key {twice[0]!r} {keys[twice[0]]} times")
    if not location:
        raise escape("has no location")
    if "\x00" in location or "\\" in location:
        raise escape(f"names {location!r}, which contains a NUL or backslash")
    if location.startswith("/") or os.path.isabs(location) or (len(location) > 1 and location[1] == ":"):
        raise escape(f"names the absolute path {location!r}")
    if ".." in location.split("/"):
        raise escape(f"names {location!r}, which is outside the model's folder")
    if "/" in location or location in (".", ".."):
        raise escape(f"names {location!r}, which is not a plain file name")
    numbers = [entries.get("offset", "0"), entries.get("length", "0")]
    if not all(re.fullmatch(r"-?[0-9]{1,19}", n) for n in numbers):  # what int() alone takes ("1_0", " 7") differs
        raise escape("has an offset or length that is not an integer")
    offset = int(numbers[0])
    length = int(entries["length"]) if "length" in entries else None
    if offset < 0 or (length is not None and length < 0):
        end = "the end" if length is None else str(offset + length)
        raise escape(f"reads bytes {offset}..{end} of {location!r}, and neither can be negative")
    return ExternalData(where, tensor, location, offset, length)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external-data files the model's tensors name (see `external_data`, which raises RuleError
    `external_data_escape` for one that is not a plain file name), in order of first mention: the
    files an upload keeps and the engine reads."""
    return list(dict.fromkeys(e.location for e in external_data(model)))


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
