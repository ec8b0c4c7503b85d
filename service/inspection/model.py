"""Validation and summary of an uploaded ONNX model, without running it or loading its weights."""

from __future__ import annotations

import math
import os
import stat
from collections import ChainMap
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx.defs
from onnx import AttributeProto, GraphProto, NodeProto, SparseTensorProto, TensorProto, helper, numpy_helper

from core.model import ExternalData, external_data, model_facts, tensor_sites
from service.errors import ExternalDataEscape, InvalidModel, ResourceLimit, UnsupportedOperator, service_errors
from service.inspection.isolation import run_isolated

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_QOPERATOR_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)
_MAX_SHAPE_RANK = 64
# Types stored one element per itemsize bytes; sub-byte types are packed, strings vary.
_WHOLE_BYTE_TYPES = frozenset(
    getattr(TensorProto, name)
    for name in (
        "FLOAT",
        "UINT8",
        "INT8",
        "UINT16",
        "INT16",
        "INT32",
        "INT64",
        "BOOL",
        "FLOAT16",
        "DOUBLE",
        "UINT32",
        "UINT64",
        "COMPLEX64",
        "COMPLEX128",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
    )
    if hasattr(TensorProto, name)
)
_MAX_REPORTED = 10
_KNOWN_TYPES = frozenset(TensorProto.DataType.values())
# The inspecting child may grow by this much over its start: the .onnx file is held twice at most (its
# bytes while they are parsed, and the checker's own copy), plus room for the graph's own objects.
INSPECT_MEMORY_FACTOR = 2
INSPECT_MEMORY_SLACK = 512 << 20
INSPECT_TIMEOUT_S = 300


@dataclass(frozen=True)
class ModelLimits:
    max_nodes: int = 200_000
    max_subgraph_depth: int = 16
    max_tensor_bytes: int = 8 << 30
    allowed_domains: frozenset[str] = field(default=_DEFAULT_DOMAINS)


@dataclass(frozen=True)
class ModelInfo:
    """What the API reports about a model.

    `opset` is the default-domain (`ai.onnx`) opset, 0 when the model imports none (for example
    a pure `ai.onnx.ml` model). A tensor `shape` is a list of int (fixed), str (symbolic) or
    None (unnamed) dims; None as a whole only for a tensor of unknown rank, which the checker
    refuses for graph inputs and outputs. A sequence, map or optional input is reported with
    dtype "sequence", "map" or "optional" and shape [].
    """

    ir_version: int
    opset: int
    producer: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_counts: dict[str, int]
    node_names: list[str]
    quantization: str | None
    external_data: list[str]


def inspect_model(model_path: Path, limits: ModelLimits = ModelLimits()) -> ModelInfo:
    """Validate the model at `model_path` (external data files beside it) and summarise it, in a child
    process (`service.inspection.isolation`) that may use INSPECT_MEMORY_FACTOR times the .onnx file plus
    INSPECT_MEMORY_SLACK: the calling process never holds the model, whatever its size.

    Raises InvalidModel, ExternalDataEscape, UnsupportedOperator or ResourceLimit.
    """
    model_path = Path(model_path)
    try:
        size = model_path.stat().st_size
    except OSError:
        size = 0  # the inspection says what is wrong with the file
    return run_isolated(
        inspect_here,
        model_path,
        limits,
        memory_bytes=INSPECT_MEMORY_FACTOR * size + INSPECT_MEMORY_SLACK,
        timeout_s=INSPECT_TIMEOUT_S,
        what="the model",
    )


def inspect_here(model_path: Path, limits: ModelLimits = ModelLimits()) -> ModelInfo:
    """`inspect_model` in this process. Its memory peaks at about twice the .onnx file: its bytes and the
    parsed model while it is parsed, then the checker's copy (the parsed model is let go before the
    checker runs; the checker given the parsed model would serialise it and parse it again, three
    copies)."""
    model_path = Path(model_path)
    model = _parse(model_path)
    walk = _Walk(model, limits)
    walk.run()
    _check_tensors(model, model_path.parent, limits)
    walk.raise_unsupported()
    facts = model_facts(model)
    info = ModelInfo(
        ir_version=model.ir_version,
        opset=facts.opset,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=[spec.to_dict() for spec in facts.inputs],
        outputs=[spec.to_dict() for spec in facts.outputs],
        op_counts=dict(facts.op_counts),
        node_names=list(facts.node_names),
        quantization=_quantization(facts.op_counts),
        external_data=list(facts.external_files),
    )
    del model, walk
    _run_checker(model_path)
    return info


def _parse(path: Path) -> onnx.ModelProto:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidModel(
            "The model file could not be read; upload it again.", detail={"reason": exc.strerror}
        ) from exc
    if size == 0:
        raise InvalidModel("The uploaded file is empty, not an ONNX model; upload the .onnx file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except MemoryError:
        raise
    except Exception as exc:  # DecodeError mostly; any parse failure is the upload's fault
        if "alloc failed" in str(exc):  # protobuf's arena, at the memory cap
            raise MemoryError(str(exc)) from exc
        raise InvalidModel(
            f"The file is not an ONNX model, its protobuf could not be parsed ({_one_line(exc)}); "
            "upload the complete .onnx file your framework exported.",
            detail={"reason": _one_line(exc)},
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InvalidModel(
            "The file is not an ONNX model (it has no IR version or no graph); upload the .onnx file "
            "your framework exported.",
            detail={"reason": "missing ir_version or graph"},
        )
    return model


def _run_checker(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except MemoryError:
        raise
    except Exception as exc:  # the checker raises several C++-bound types
        if "bad_alloc" in str(exc):  # the memory cap, reached in C++
            raise MemoryError(str(exc)) from exc
        # Quote the checker without the server's own folder names.
        text = str(exc).replace(str(path.parent) + os.sep, "").replace(str(path.parent), ".")
        reason = _one_line(text)
        raise InvalidModel(
            f"The ONNX checker rejected the model: {reason}; fix the export and upload it again.",
            detail={"checker": text[:2000]},
        ) from exc


def _one_line(exc: BaseException | str) -> str:
    """The message on one line, short enough to quote inside a sentence."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300].rstrip(". ;:")


def _quantization(op_counts: Mapping[str, int]) -> str | None:
    if any(op.startswith("QLinear") or op in _QOPERATOR_OPS for op in op_counts):
        return "qoperator"
    if any(op in _QDQ_OPS for op in op_counts):
        return "qdq"
    return None


def _itemsize(data_type: int) -> int:
    if data_type == TensorProto.STRING:
        return 0
    try:
        return max(int(helper.tensor_dtype_to_np_dtype(data_type).itemsize), 1)
    except (KeyError, ValueError, TypeError):
        return 1


def _declared_bytes(dims: Iterable[int], data_type: int) -> int:
    return math.prod(max(int(d), 0) for d in dims) * _itemsize(data_type)


class _Walk:
    """One pass over the nodes of every graph, subgraph and local function of a model: how many, how
    deep, which operators, and what the constant shapes they are given ask for (the tensors themselves
    are `_check_tensors`'s)."""

    def __init__(self, model: onnx.ModelProto, limits: ModelLimits) -> None:
        self.model = model
        self.limits = limits
        self.unsupported: dict[tuple[str, str], str] = {}
        self.nodes_seen = 0
        self.functions = {(f.domain, f.name) for f in model.functions}

    def run(self) -> None:
        self._graph(self.model.graph, 0, ChainMap())
        for function in self.model.functions:
            self._nodes(function.node, 0, ChainMap(), where=f"function {function.name!r}")
            for default in function.attribute_proto:  # a graph default runs wherever the body refers to it
                for graph in _graphs(default):
                    self._graph(graph, 1, ChainMap())
        for info in self.model.training_info:
            for graph in (info.initialization, info.algorithm):
                self._graph(graph, 0, ChainMap())

    def raise_unsupported(self) -> None:
        if not self.unsupported:
            return
        ops = sorted(self.unsupported)
        listed = ", ".join(f"{op} ({domain or 'ai.onnx'})" for domain, op in ops[:_MAX_REPORTED])
        more = f" and {len(ops) - _MAX_REPORTED} more" if len(ops) > _MAX_REPORTED else ""
        allowed = sorted({d or "ai.onnx" for d in self.limits.allowed_domains})
        raise UnsupportedOperator(
            f"The model uses operators this service cannot run: {listed}{more}; export it with "
            f"standard ONNX operators (allowed domains: {', '.join(allowed)}).",
            detail={
                "operators": [{"domain": d, "op_type": op, "node": self.unsupported[(d, op)]} for d, op in ops],
                "allowed_domains": allowed,
            },
        )

    def _graph(self, graph: GraphProto, depth: int, scope: ChainMap[str, TensorProto]) -> None:
        local = {tensor.name: tensor for tensor in graph.initializer}
        self._nodes(graph.node, depth, scope.new_child(local), where=f"graph {graph.name!r}")

    def _nodes(
        self,
        nodes: Iterable[NodeProto],
        depth: int,
        scope: ChainMap[str, TensorProto],
        *,
        where: str,
    ) -> None:
        constants: MutableMapping[str, TensorProto] = scope.maps[0] if scope.maps else {}
        for node in nodes:
            self.nodes_seen += 1
            label = _node_label(node, where)
            if self.nodes_seen > self.limits.max_nodes:
                raise ResourceLimit(
                    f"The model has more than {self.limits.max_nodes} nodes (limit reached at {label}); "
                    "upload a smaller model or ask the operator to raise the limit.",
                    detail={"limit": self.limits.max_nodes, "node": node.name, "op_type": node.op_type},
                )
            self._check_domain(node)
            for attr in node.attribute:
                self._attribute(node, attr, depth, scope, label=label)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                value = next((a.t for a in node.attribute if a.name == "value" and a.type == a.TENSOR), None)
                if value is not None:
                    constants[node.output[0]] = value
            if node.domain in ("", "ai.onnx") and node.op_type in ("ConstantOfShape", "Expand"):
                self._check_shape_op(node, scope, label)

    def _check_domain(self, node: NodeProto) -> None:
        key = (node.domain, node.op_type)
        if key in self.functions:
            return
        if node.domain not in self.limits.allowed_domains:
            self.unsupported.setdefault(key, node.name)
        elif node.domain in _ONNX_DOMAINS:
            schema_domain = "" if node.domain == "ai.onnx" else node.domain
            if not onnx.defs.has(node.op_type, schema_domain):
                self.unsupported.setdefault(key, node.name)

    def _attribute(
        self,
        node: NodeProto,
        attr: AttributeProto,
        depth: int,
        scope: ChainMap[str, TensorProto],
        *,
        label: str,
    ) -> None:
        graphs = _graphs(attr)
        if graphs and depth + 1 > self.limits.max_subgraph_depth:
            raise ResourceLimit(
                f"Subgraphs are nested more than {self.limits.max_subgraph_depth} levels deep "
                f"at {label}; simplify the control flow of the model.",
                detail={"limit": self.limits.max_subgraph_depth, "node": node.name, "op_type": node.op_type},
            )
        for graph in graphs:
            self._graph(graph, depth + 1, scope)

    def _check_shape_op(self, node: NodeProto, scope: ChainMap[str, TensorProto], label: str) -> None:
        """ConstantOfShape/Expand with a constant shape allocate prod(shape) elements at run time."""
        if len(node.input) < 2 and node.op_type == "Expand":
            return
        shape_name = node.input[0] if node.op_type == "ConstantOfShape" else node.input[1]
        shape_tensor = scope.get(shape_name)
        if shape_tensor is None or shape_tensor.data_location == TensorProto.EXTERNAL:
            return
        if math.prod(shape_tensor.dims) > _MAX_SHAPE_RANK:
            return
        try:
            dims = [int(d) for d in numpy_helper.to_array(shape_tensor).reshape(-1)]
        except Exception:  # a malformed shape tensor is the checker's to report
            return
        data_type: int = TensorProto.FLOAT
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                data_type = value.data_type
        else:
            source = scope.get(node.input[0])
            data_type = source.data_type if source is not None else TensorProto.UINT8
        declared = _declared_bytes(dims, data_type)
        if declared > self.limits.max_tensor_bytes:
            raise ResourceLimit(
                f"The {label} would create a tensor of shape {dims} ({declared} bytes), more than the "
                f"limit of {self.limits.max_tensor_bytes} bytes; upload a smaller model.",
                detail={
                    "node": node.name,
                    "op_type": node.op_type,
                    "shape": dims,
                    "declared_bytes": declared,
                    "limit_bytes": self.limits.max_tensor_bytes,
                },
            )


def _graphs(attr: AttributeProto) -> list[GraphProto]:
    """The graphs an attribute holds, whatever type it declares."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _check_tensors(model: onnx.ModelProto, folder: Path, limits: ModelLimits) -> None:
    """Every tensor the model stores, wherever it stands (`core.model.tensor_sites`, the walk the engine
    uses too): a known type, a declared size within the limit, and external data that is a plain file
    uploaded beside the model, read within its bounds."""
    for where, stored in tensor_sites(model):
        if isinstance(stored, SparseTensorProto):
            _check_tensor(stored.values, where, limits)
            _check_tensor(stored.indices, where, limits)
            _check_size(_declared_bytes(stored.dims, stored.values.data_type), where, limits)
        else:
            _check_tensor(stored, where, limits)
    with service_errors():
        entries = external_data(model)
    base = os.path.realpath(folder)
    for entry in entries:
        _check_external_file(entry, base)


def _check_tensor(tensor: TensorProto, where: str, limits: ModelLimits) -> None:
    if tensor.data_type not in _KNOWN_TYPES:  # the checker lets unknown type numbers through
        raise InvalidModel(
            f"The {where} has the unknown data type {tensor.data_type}; export the model with "
            "standard ONNX tensor types.",
            detail={"tensor": where, "data_type": tensor.data_type},
        )
    _check_size(_declared_bytes(tensor.dims, tensor.data_type), where, limits)


def _check_size(declared: int, where: str, limits: ModelLimits) -> None:
    if declared > limits.max_tensor_bytes:
        raise ResourceLimit(
            f"The {where} declares {declared} bytes, more than the limit of "
            f"{limits.max_tensor_bytes} bytes for one tensor; upload a smaller model.",
            detail={"tensor": where, "declared_bytes": declared, "limit_bytes": limits.max_tensor_bytes},
        )


def _check_external_file(entry: ExternalData, base: str) -> None:
    """The file an external-data entry names (a plain file name: `core.model.external_data` checked it)
    is a regular file of its own in the model's folder (`base`, real path), holding the bytes it reads."""
    location = entry.location
    detail: dict[str, Any] = {"tensor": entry.tensor.name, "location": location}

    def escape(problem: str) -> ExternalDataEscape:
        return ExternalDataEscape(
            f"The external data of {entry.where} {problem}; keep weight files as plain files in the "
            "model's folder and upload them with the model.",
            detail=detail,
        )

    candidate = os.path.join(base, location)
    if os.path.realpath(candidate) != candidate:
        raise escape(f"names {location!r}, which is or passes through a symbolic link")
    try:
        info = os.lstat(candidate)
    except OSError as exc:
        raise escape(f"names {location!r}, which was not uploaded") from exc
    if stat.S_ISLNK(info.st_mode):
        raise escape(f"names {location!r}, which is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise escape(f"names {location!r}, which is not a regular file")
    if info.st_nlink > 1:
        raise escape(f"names {location!r}, which is a hard link")
    offset = entry.offset
    length = info.st_size - offset if entry.length is None else entry.length
    if offset + length > info.st_size or length < 0:
        raise escape(f"reads bytes {offset}..{offset + length} of {location!r}, which has only {info.st_size} bytes")
    declared = _declared_bytes(entry.tensor.dims, entry.tensor.data_type)
    if entry.tensor.data_type in _WHOLE_BYTE_TYPES and declared > length:
        raise escape(f"needs {declared} bytes but only {length} are available in {location!r}")


def _node_label(node: NodeProto, where: str) -> str:
    name = f"{node.name!r}" if node.name else "(unnamed)"
    return f"node {name} ({node.op_type}) in {where}"
