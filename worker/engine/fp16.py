"""Float16 conversion with the overflow-prone parts kept in float32.

onnxconverter-common's `convert_float_to_float16(keep_io_types=True, op_block_list=...)` does the
conversion. Two things are added around it:
- a range check on real (or made-up) data: nodes that produce or read values beyond half of
  float16's range (65504) join the block list;
- a clean-up of the converter's output: it casts the output of every blocked node to float16
  and back to float32 before the next blocked node (so a value that only fits float32 overflows
  between two float32 nodes anyway), and when a blocked node writes a graph output it can leave
  that output in float16. Those round trips are removed and outputs are given back their type;
- the converter declares the output of a model's own `Cast(to=float)` float16 (an attention mask
  cast from int64, as in every BERT-style export) but leaves the cast's `to` at float, and ONNX
  Runtime refuses the model ("Type (tensor(float16)) of output arg (mask_float) does not match").
  Those casts are made to cast to float16, as their output is declared.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from core.model import subgraphs
from worker.engine.calibration import ListReader
from worker.engine.graph_order import subgraph_reads

FP16_MAX = 65504.0

# Ops kept in float32 in addition to the converter's default list: their values overflow half
# precision easily (exponentials, powers, sums over many elements) or lose too much precision.
FP16_OVERFLOW_OPS = (
    "Exp",
    "Pow",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "CumSum",
    "Range",
)


def block_op_types() -> list[str]:
    from onnxconverter_common import float16

    return sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_OVERFLOW_OPS))


def overflowing_nodes(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Names of top-level nodes that read or write a tensor whose magnitude exceeds FP16_MAX / 2."""
    big = {name for name, (lo, hi) in ranges.items() if max(abs(lo), abs(hi)) > FP16_MAX / 2}
    return sorted(n.name for n in model.graph.node if n.name and (set(n.input) | set(n.output)) & big)


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def feed_subgraphs_through_identity(model: onnx.ModelProto) -> int:
    """Let If/Loop/Scan bodies read float32 graph inputs through a top-level Identity. With
    keep_io_types the converter casts a graph input to float16 only for the nodes that list it as
    an input, so a body reading it from the outer scope would get float32 among float16 values
    (and ONNX Runtime refuses the model). Returns how many inputs were routed."""
    graph = model.graph
    floats = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    renamed = {name: f"{name}_for_subgraphs" for name in sorted(floats & subgraph_reads(graph))}
    if not renamed:
        return 0

    def rename(g: onnx.GraphProto) -> None:
        for node in g.node:
            for k, name in enumerate(node.input):
                node.input[k] = renamed.get(name, name)
            for _, sub in subgraphs(node):
                rename(sub)
        for out in g.output:
            out.name = renamed.get(out.name, out.name)

    for node in graph.node:
        for _, sub in subgraphs(node):
            rename(sub)
    identities = [helper.make_node("Identity", [n], [r], name=r) for n, r in renamed.items()]
    nodes = [*identities, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(renamed)


def remove_cast_round_trips(model: onnx.ModelProto, blocked_names: set[str], blocked_types: set[str]) -> int:
    """Let float32 consumers of a blocked node read its float32 output directly instead of through
    Cast(to=float16) -> Cast(to=float32). Returns how many casts were removed (top-level graph)."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    in_subgraphs = subgraph_reads(graph)

    def is_blocked(node: onnx.NodeProto | None) -> bool:
        return node is not None and (node.name in blocked_names or node.op_type in blocked_types)

    removed: set[int] = set()
    for c16 in list(graph.node):
        if _cast_to(c16) != TensorProto.FLOAT16 or not is_blocked(producer.get(c16.input[0])):
            continue
        x, y = c16.input[0], c16.output[0]
        for c32 in list(consumers[y]):
            if _cast_to(c32) != TensorProto.FLOAT:
                continue
            z = c32.output[0]
            if z in outputs or z in in_subgraphs:
                continue
            for reader in consumers[z]:
                for k, name in enumerate(reader.input):
                    if name == z:
                        reader.input[k] = x
                consumers[x].append(reader)
            consumers[y].remove(c32)
            removed.add(id(c32))
        if not consumers[y] and y not in outputs and y not in in_subgraphs:
            removed.add(id(c16))
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        live = {t for n in graph.node for t in (*n.input, *n.output)}
        vis = [vi for vi in graph.value_info if vi.name in live]
        del graph.value_info[:]
        graph.value_info.extend(vis)
    return len(removed)


def align_cast_targets(model: onnx.ModelProto) -> int:
    """Casts to float whose output the converter declared float16 cast to float16 (in every graph
    and subgraph). Returns how many."""
    fixed = 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal fixed
        declared = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
        for node in graph.node:
            if _cast_to(node) == TensorProto.FLOAT and declared.get(node.output[0]) == TensorProto.FLOAT16:
                for a in node.attribute:
                    if a.name == "to":
                        a.i = TensorProto.FLOAT16
                fixed += 1
            for _, sub in subgraphs(node):
                walk(sub)

    walk(model.graph)
    return fixed


def restore_output_types(model: onnx.ModelProto, original_types: dict[str, int]) -> int:
    """Give float32 graph outputs that came out float16 their float32 type back. Returns how many."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    fixed = 0
    for out in graph.output:
        want = original_types.get(out.name)
        tt = out.type.tensor_type
        if want != TensorProto.FLOAT or tt.elem_type == TensorProto.FLOAT:
            continue
        node = producer.get(out.name)
        if node is not None and _cast_to(node) == TensorProto.FLOAT16:
            for a in node.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT
        else:
            inner = out.name + "_fp16"
            if node is not None:
                for k, name in enumerate(node.output):
                    if name == out.name:
                        node.output[k] = inner
            for n in graph.node:
                for k, name in enumerate(n.input):
                    if name == out.name:
                        n.input[k] = inner
            graph.node.append(
                helper.make_node("Cast", [inner], [out.name], name=out.name + "_to_fp32", to=TensorProto.FLOAT)
            )
        tt.elem_type = TensorProto.FLOAT
        fixed += 1
    return fixed


def convert(
    model: onnx.ModelProto,
    *,
    node_block_list: Sequence[str] = (),
    disable_shape_infer: bool = False,
) -> onnx.ModelProto:
    """convert_float_to_float16(keep_io_types=True) with the extra block list and the clean-ups."""
    from onnxconverter_common import float16

    original_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    op_types = block_op_types()
    feed_subgraphs_through_identity(model)
    converted = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=op_types,
        node_block_list=list(node_block_list),
        disable_shape_infer=disable_shape_infer,
    )
    remove_cast_round_trips(converted, set(node_block_list), set(op_types))
    align_cast_targets(converted)
    restore_output_types(converted, original_types)
    return converted


def tensor_ranges(
    model_path: Path, feeds: Iterable[dict[str, np.ndarray]], workdir: Path, *, external: bool = False
) -> dict[str, tuple[float, float]]:
    """Min and max of every float tensor of the top-level graph over `feeds` (ORT MinMax calibrator)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    workdir.mkdir(parents=True, exist_ok=True)
    calibrator = create_calibrator(
        Path(model_path),
        None,
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
    )
    n = 0
    for feed in feeds:
        calibrator.collect_data(ListReader([feed]))
        n += 1
    if n == 0:
        return {}
    result = calibrator.compute_data()
    out: dict[str, tuple[float, float]] = {}
    for name, data in result.items():
        lo, hi = data.range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out
