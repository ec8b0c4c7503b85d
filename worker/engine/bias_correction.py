"""Fast bias correction for static int8: shift each quantized layer's bias by the mean error its
quantization adds, per output channel.

Rounding a layer's weights and its input activation (and clipping the input to its range) changes the
mean of the layer's output channel by channel; the bias absorbs that shift for free. The shift is measured
*locally*, as NNCF's FastBiasCorrection does: for each Conv, Gemm, or MatMul followed by an Add of a
constant, a shadow copy of the node reads the float model's input through the input's Q/DQ pair and the
dequantized weights of a QDQ model quantized with the same ranges, and the mean difference between the float
node's output and its shadow's is the layer's own bias. (Comparing the float and the quantized models' layer
outputs instead would count every upstream layer's shift again in each layer, and correcting all of them at
once would over-correct downstream.) One pass over a bounded number of calibration batches of the float
model with every shadow in it, reduced to per-channel sums as it goes: memory is one batch's.

The shifts are added to the float model's biases, which are then quantized with the very same ranges, so
the result is a plain static model in either format (the bias' int32 rounding included).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from worker.engine.data import Batch
from worker.engine.machine import usable_cores
from worker.engine.session import session_options

BIAS_OPS = ("Conv", "Gemm", "MatMul")
# A shift this small against the layer's output scale is rounding noise, not bias.
NEGLIGIBLE = 1e-6
# A channel's shift counts when its mean over batches is this many standard errors away from zero.
SIGNIFICANCE = 2.0


@dataclass
class Layer:
    node: str  # the float model's node
    op_type: str
    bias: str  # the initializer the shift goes to (Conv/Gemm bias, or the MatMul's Add constant)
    diff: str  # the float output minus the shadow's (or its channel means), a name in the augmented model
    axis: int  # output channel axis (-1: last)


@dataclass
class BiasShifts:
    """What the correction measured: the new bias values by initializer name, and the count considered."""

    biases: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)  # bias initializer -> the node it is the bias of
    considered: int = 0
    samples: int = 0
    seconds: float = 0.0


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                readers.setdefault(i, []).append(n)
    return readers


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _bias_of(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], readers: dict[str, list[onnx.NodeProto]]
) -> tuple[str, int] | None:
    """The bias initializer a node's shift goes to, and the output channel axis; None: no usable bias."""
    if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in inits:
        bias = inits[node.input[2]]
        return (node.input[2], 1) if len(bias.dims) == 1 else None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
        dims = list(inits[node.input[2]].dims)
        return (node.input[2], 1) if len(dims) == 1 or (len(dims) == 2 and dims[0] == 1) else None
    if node.op_type == "MatMul":
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            return None
        add = after[0]
        other = next((i for i in add.input if i != node.output[0]), None)
        if other is None or other not in inits:
            return None
        dims = list(inits[other].dims)
        return (other, -1) if dims and all(d == 1 for d in dims[:-1]) else None
    return None


def _dq_of(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def shadow_model(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Layer]]:
    """The float model with, for every layer the QDQ model quantized (weights and input) and that has a bias,
    a shadow node on the Q/DQ'd float input and dequantized weights, and `float output - shadow output` as
    an extra graph output."""
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)
    q_graph = qdq_model.graph
    q_inits = {i.name: i for i in q_graph.initializer}
    q_nodes = {n.name: n for n in q_graph.node if n.name}
    q_producers = _producers(q_graph)
    # The bias an initializer is shared by several nodes cannot take one node's shift.
    shared = {name for name, users in readers.items() if name in inits and len(users) > 1}
    added: set[str] = set()
    layers: list[Layer] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for k, node in enumerate(list(graph.node)):
        if node.op_type not in BIAS_OPS or not node.name or node.name not in q_nodes:
            continue
        found = _bias_of(node, inits, readers)
        if found is None or found[0] in shared:
            continue
        q_node = q_nodes[node.name]
        if q_node.op_type != node.op_type or len(q_node.input) < 2:
            continue
        x_dq = _dq_of(q_node.input[0], q_producers)
        w_dq = _dq_of(q_node.input[1], q_producers)
        x_q = q_producers.get(x_dq.input[0]) if x_dq is not None else None
        if x_dq is None or w_dq is None or x_q is None or x_q.op_type != "QuantizeLinear":
            continue  # input or weights left in float: nothing of this layer's own to correct
        if w_dq.input[0] not in q_inits or any(i and i not in q_inits for i in [*x_q.input[1:], *w_dq.input[1:]]):
            continue
        tag = f"__bias_shadow{k}"
        for name in [*x_q.input[1:], *x_dq.input[1:], *w_dq.input]:
            if name and name not in added and name not in inits:
                graph.initializer.append(q_inits[name])
                added.add(name)
        q = helper.make_node(
            "QuantizeLinear", [node.input[0], *x_q.input[1:]], [f"{tag}_q"], name=f"{tag}_Q", domain=x_q.domain
        )
        q.attribute.extend(x_q.attribute)
        dq = helper.make_node(
            "DequantizeLinear", [f"{tag}_q", *x_dq.input[1:]], [f"{tag}_x"], name=f"{tag}_DQ", domain=x_dq.domain
        )
        dq.attribute.extend(x_dq.attribute)
        wdq = helper.make_node("DequantizeLinear", list(w_dq.input), [f"{tag}_w"], name=f"{tag}_W", domain=w_dq.domain)
        wdq.attribute.extend(w_dq.attribute)
        shadow = onnx.NodeProto()
        shadow.CopyFrom(node)
        shadow.name = f"{tag}_node"
        shadow.input[0], shadow.input[1] = f"{tag}_x", f"{tag}_w"
        shadow.output[0] = f"{tag}_y"
        del shadow.output[1:]
        diff = helper.make_node("Sub", [node.output[0], f"{tag}_y"], [f"{tag}_diff"], name=f"{tag}_Sub")
        graph.node.extend([q, dq, wdq, shadow, diff])
        # Conv and Gemm outputs have a known rank: their channel means are taken in the graph, so only a
        # vector per layer leaves ONNX Runtime (a MatMul's rank is the input's: reduced in numpy).
        rank = len(inits[node.input[1]].dims) if node.op_type == "Conv" and node.input[1] in inits else None
        rank = 2 if node.op_type == "Gemm" else rank
        out, axis = f"{tag}_diff", found[1]
        if rank is not None:
            axes = [0, *range(2, rank)]
            reduce = helper.make_node("ReduceMean", [out], [f"{tag}_mean"], name=f"{tag}_Mean", keepdims=0)
            if opset >= 18:
                graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{tag}_axes"))
                reduce.input.append(f"{tag}_axes")
            else:
                reduce.attribute.append(helper.make_attribute("axes", axes))
            graph.node.append(reduce)
            out, axis = f"{tag}_mean", 0
        graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        layers.append(Layer(node.name, node.op_type, found[0], out, axis))
    known = {o.domain for o in model.opset_import}
    for opset in qdq_model.opset_import:
        if opset.domain not in known:
            model.opset_import.append(opset)
    return model, layers


class _ChannelMean:
    """Per-channel means of each batch, summed with their squares: the mean over batches and its standard
    error."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.batches = 0
        self.broken = False

    def add(self, diff: np.ndarray, axis: int) -> None:
        d = np.asarray(diff)
        if d.ndim == 0 or self.broken or not d.size:
            return
        axis = axis % d.ndim
        other = tuple(i for i in range(d.ndim) if i != axis)
        means = d.sum(axis=other, dtype=np.float64) / (d.size // d.shape[axis])
        if self.total is not None and self.total.shape != means.shape:
            self.broken = True
            return
        self.total = means if self.total is None else self.total + means
        self.squares = means * means if self.squares is None else self.squares + means * means
        self.batches += 1

    def shift(self) -> np.ndarray | None:
        """The mean, with channels whose mean is within SIGNIFICANCE standard errors of zero set to zero
        (a shift that is mostly sampling noise would add error, not remove it)."""
        if self.total is None or self.squares is None or self.broken or not self.batches:
            return None
        n = self.batches
        mean = self.total / n
        if n < 2:
            return mean
        variance = np.maximum(0.0, self.squares / n - mean * mean) * n / (n - 1)
        stderr = np.sqrt(variance / n)
        return np.where(np.abs(mean) > SIGNIFICANCE * stderr, mean, 0.0)


def measure_shifts(
    float_path: Path, qdq_path: Path, batches: Iterable[Batch], workdir: Path, *, threads: int | None = None
) -> BiasShifts:
    """The corrected bias values of every layer the QDQ model quantized, measured on `batches` (bounded by
    the caller). Layers whose shift is not finite or negligible are left out."""
    started = time.perf_counter()
    float_model = onnx.load(str(float_path))
    qdq_model = onnx.load(str(qdq_path))
    augmented, layers = shadow_model(float_model, qdq_model)
    del qdq_model
    result = BiasShifts(considered=len(layers))
    if not layers:
        result.seconds = time.perf_counter() - started
        return result
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bias_shadow.onnx"
    onnx.save(augmented, str(path))
    del augmented
    so = session_options(threads or usable_cores())
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    means = {layer.diff: _ChannelMean() for layer in layers}
    names = [layer.diff for layer in layers]
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        for batch in batches:
            for layer, value in zip(layers, session.run(names, batch.feeds), strict=True):
                means[layer.diff].add(value, layer.axis)
            result.samples += batch.num_samples
        del session
    finally:
        path.unlink(missing_ok=True)
    inits = {i.name: i for i in float_model.graph.initializer}
    for layer in layers:
        shift = means[layer.diff].shift()
        bias = numpy_helper.to_array(inits[layer.bias])
        if shift is None or shift.size != bias.shape[-1] or not np.all(np.isfinite(shift)):
            continue
        scale = max(float(np.max(np.abs(bias))), float(np.max(np.abs(shift))), 1e-12)
        if float(np.max(np.abs(shift))) <= NEGLIGIBLE * scale:
            continue
        result.biases[layer.bias] = (bias + shift.reshape((1,) * (bias.ndim - 1) + (-1,))).astype(bias.dtype)
        result.layers[layer.bias] = layer.node
    result.seconds = time.perf_counter() - started
    return result


def without(shifts: BiasShifts, nodes: Iterable[str]) -> BiasShifts:
    """The shifts of layers other than `nodes` (layers left in float keep their bias). Each shift is its
    layer's own, so those of the other layers still hold."""
    skip = set(nodes)
    kept = {b: v for b, v in shifts.biases.items() if shifts.layers.get(b) not in skip}
    return BiasShifts(kept, {b: shifts.layers[b] for b in kept}, shifts.considered, shifts.samples, shifts.seconds)


def apply_shifts(float_path: Path, shifts: BiasShifts, out_path: Path) -> Path:
    """A copy of the float model with the corrected biases (saved at `out_path`)."""
    model = onnx.load(str(float_path))
    for init in model.graph.initializer:
        new = shifts.biases.get(init.name)
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path
