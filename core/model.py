"""ONNX model facts: a graph input or output as a `TensorSpec`, the graph, subgraph and external-data
walks, and the `ModelFacts` the API stores at upload and the engine reads from the file.

Unknown dims: a `dim_param` name, an empty dim, or any non-positive `dim_value` (Paddle2ONNX writes -1 and 0)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Self, TypeGuard

import numpy as np
import onnx
from pydantic import Field

SUBGRAPH_OPS = ("If", "Loop", "Scan")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

Dim = int | str | None
Shape = tuple[Dim, ...]

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
