"""Static int8 inside If/Loop/Scan bodies: ranges for the tensors the bodies compute, and each body
quantized as a model of its own.

ONNX Runtime's calibrators only see the top graph, and its QDQ quantizer does not enter subgraphs.

Ranges: a copy of the model carries each wanted inner tensor out of its body, reduced in the body
to its minimum and maximum (MinMax; histogram methods take its values flattened in a second pass),
as an extra output of the body: a Loop or Scan stacks it over the iterations as an extra scan
output, an If takes it from the branch that makes it (the other branch gives NaN, or an empty
tensor for values). Nested bodies lift it again, level by level, up to a top-graph output. One
batch at a time, the ranges are merged as they come (memory is that of one batch).

Quantization: each body holding a Conv/MatMul/Gemm becomes a standalone model (the names it reads
from the graphs around it become inputs, the outer weights it uses are copied in), goes through the
same quantizer as the top graph with the ranges visible from that body, and is put back: the
outer-scope names are outer reads again, the initializers it made live in the body, and every
name it made that another graph already uses is renamed. Bodies are done outermost first, so a
nested body still reads what it read before.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from core.jobfile import DatasetSource
from core.model import TensorSpec
from core.recipe import CalibrationMethod, Recipe
from core.result import FloatNode
from worker.engine.data import feed_limit, iter_batches
from worker.engine.graph_order import outer_reads
from worker.engine.quiet import quiet_ort

# The op types a body must hold for it to be calibrated and quantized.
BODY_OPS = ("Conv", "MatMul", "Gemm")
# What a quantized Conv/MatMul/Gemm becomes in the QOperator format.
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)

Key = tuple[str, ...]  # a body: the top graph is (); each level adds `<owner's first output>.<attribute>`


@dataclass
class Scope:
    key: Key
    graph: onnx.GraphProto
    owner: onnx.NodeProto | None = None
    attr: str = ""
    parent: Scope | None = None
    depth: int = 0

    @property
    def defined(self) -> set[str]:
        """Names this graph makes (formal inputs and node outputs; initializers are weights)."""
        names = {i.name for i in self.graph.input}
        names.update(o for n in self.graph.node for o in n.output if o)
        return names

    def types(self) -> dict[str, onnx.TypeProto]:
        g = self.graph
        types = {v.name: v.type for v in (*g.value_info, *g.input, *g.output) if v.type.HasField("tensor_type")}
        for t in g.initializer:
            types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        return types


def _body_key(node: onnx.NodeProto, attr: str, index: int) -> str:
    owner = next((o for o in node.output if o), node.name or node.op_type)
    return f"{owner}.{attr}" if index < 0 else f"{owner}.{attr}[{index}]"


def _graphs_of(node: onnx.NodeProto) -> Iterator[tuple[str, int, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, -1, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield attr.name, i, g


def scopes(graph: onnx.GraphProto) -> list[Scope]:
    """The top graph and every body, parents before their bodies."""
    top = Scope((), graph)
    found = [top]

    def walk(scope: Scope) -> None:
        for node in scope.graph.node:
            for attr, index, g in _graphs_of(node):
                inner = Scope((*scope.key, _body_key(node, attr, index)), g, node, attr, scope, scope.depth + 1)
                found.append(inner)
                walk(inner)

    walk(top)
    return found


def _resolve(scope: Scope, name: str) -> Scope | None:
    """The scope that makes `name` as seen from `scope` (None: a weight or an unknown name)."""
    s: Scope | None = scope
    while s is not None:
        if name in s.defined:
            return s
        if any(t.name == name for t in s.graph.initializer):
            return None
        s = s.parent
    return None


def _elem_type(scope: Scope, name: str) -> int:
    s: Scope | None = scope
    while s is not None:
        t = s.types().get(name)
        if t is not None:
            return int(t.tensor_type.elem_type)
        s = s.parent
    return 0


def _compute_body(scope: Scope, op_types: Sequence[str]) -> bool:
    return scope.key != () and any(n.op_type in BODY_OPS and n.op_type in op_types for n in scope.graph.node)


def wanted_tensors(model: onnx.ModelProto, op_types: Sequence[str]) -> dict[Key, dict[str, int]]:
    """Per scope, the float tensors (name -> elem type) that quantizing the bodies needs ranges for:
    the inputs and outputs of the `op_types` nodes of every body holding a Conv/MatMul/Gemm, wherever
    they are made (in the body, or in a graph around it)."""
    wanted: dict[Key, dict[str, int]] = defaultdict(dict)
    for scope in scopes(model.graph):
        if not _compute_body(scope, op_types):
            continue
        for node in scope.graph.node:
            if node.op_type not in op_types:
                continue
            for name in itertools.chain(node.input, node.output):
                if not name:
                    continue
                home = _resolve(scope, name)
                if home is None:
                    continue
                elem = _elem_type(home, name)
                if elem in FLOAT_TYPES:
                    wanted[home.key][name] = elem
    return dict(wanted)


# --------------------------------------------------------------------------------------------
# Calibration


class _Names:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = all_names(model)
        self.count = 0

    def new(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"qaas_body/{hint}_{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name


def all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for scope in scopes(model.graph):
        g = scope.graph
        names.update(i.name for i in g.input)
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
    names.discard("")
    return names


def _const(graph: onnx.GraphProto, names: _Names, array: np.ndarray) -> str:
    out = names.new("const")
    graph.node.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out)))
    return out


def _flatten(graph: onnx.GraphProto, names: _Names, value: str) -> str:
    out = names.new("flat")
    shape = _const(graph, names, np.array([-1], np.int64))
    graph.node.append(helper.make_node("Reshape", [value, shape], [out]))
    return out


_NP_OF: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _lift(scope: Scope, value: str, elem: int, stat: bool, names: _Names) -> str:
    """Add `value` (made in `scope`, 1-D) as an output of the body and of its owner; returns the
    owner's new output (in the parent graph)."""
    owner, body = scope.owner, scope.graph
    assert owner is not None
    out = names.new("lifted")
    if owner.op_type == "If":
        for attr, _, branch in _graphs_of(owner):
            if attr == scope.attr:
                branch.output.append(helper.make_tensor_value_info(value, elem, [None]))
            else:  # the branch that does not make it: NaN for a statistic, nothing for values
                filler = np.full((1,), np.nan) if stat else np.zeros((0,))
                made = _const(branch, names, filler.astype(_NP_OF[elem]))
                branch.output.append(helper.make_tensor_value_info(made, elem, [None]))
    else:  # Loop (outputs: cond, carried..., scan...) and Scan (outputs: state..., scan...)
        skip = 1 if owner.op_type == "Loop" else 0
        while len(owner.output) < len(body.output) - skip:
            owner.output.append("")
        body.output.append(helper.make_tensor_value_info(value, elem, [1] if stat else [None]))
        for attr in owner.attribute:
            if attr.name in ("scan_output_axes", "scan_output_directions") and len(attr.ints):
                attr.ints.append(0)
    owner.output.append(out)
    return out


def augment(
    model: onnx.ModelProto, wanted: dict[Key, dict[str, int]], *, values: bool
) -> tuple[onnx.ModelProto, dict[str, tuple[Key, str, str]]]:
    """A copy of `model` whose top graph also outputs, for each wanted tensor, its minimum and maximum
    (`values` False; one element per run of its body) or its values flattened (`values` True).
    Returns the copy and, per added output, (scope key, tensor name, "min" | "max" | "values")."""
    model = copy.deepcopy(model)
    names = _Names(model)
    by_key = {s.key: s for s in scopes(model.graph)}
    pending: dict[Key, list[tuple[str, int, tuple[Key, str, str]]]] = defaultdict(list)
    for key, tensors in wanted.items():
        scope = by_key.get(key)
        if scope is None:
            continue
        for name, elem in sorted(tensors.items()):
            flat = _flatten(scope.graph, names, name)
            if values:
                pending[key].append((flat, elem, (key, name, "values")))
                continue
            for op, stat in (("ReduceMin", "min"), ("ReduceMax", "max")):
                reduced = names.new(stat)
                scope.graph.node.append(helper.make_node(op, [flat], [reduced], keepdims=1))
                pending[key].append((reduced, elem, (key, name, stat)))
    for scope in sorted(by_key.values(), key=lambda s: -s.depth):
        if scope.parent is None:
            continue
        for value, elem, tag in pending.pop(scope.key, []):
            lifted = _lift(scope, value, elem, tag[2] != "values", names)
            pending[scope.parent.key].append((_flatten(scope.parent.graph, names, lifted), elem, tag))
    added: dict[str, tuple[Key, str, str]] = {}
    for value, elem, tag in pending.pop((), []):
        model.graph.output.append(helper.make_tensor_value_info(value, elem, [None]))
        added[value] = tag
    return model, added


@dataclass
class BodyRanges:
    """Ranges of the tensors bodies read or make, per scope (ORT TensorData by name)."""

    method: Any  # onnxruntime.quantization.calibrate.CalibrationMethod
    scopes: dict[Key, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def visible(self, key: Key, top: Any = None) -> Any:
        """ORT TensorsData of the names seen from body `key`, an inner name hiding an outer one (the top
        graph's names as the main calibration `top` has them, when it does)."""
        from onnxruntime.quantization.calibrate import TensorsData

        data: dict[str, Any] = {}
        for depth in range(len(key) + 1):
            data.update(self.scopes.get(key[:depth], {}))
            if depth == 0 and top is not None:
                data.update({k: v for k, v in top.items() if k in data})
        return TensorsData(self.method, data)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()  # threads as ONNX Runtime's calibrators have them (its default)
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_all(
    model: onnx.ModelProto,
    path: Path,
    added: dict[str, tuple[Key, str, str]],
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    spec: Recipe,
    use: Callable[[dict[tuple[Key, str, str], np.ndarray]], None],
) -> None:
    onnx.save_model(model, str(path))
    try:
        session = _session(path)
        wanted = list(added)
        limit = feed_limit(
            source, inputs, batch_size=spec.calibration_batch_size, max_samples=spec.max_calibration_samples
        )
        batches = iter_batches(source, inputs, batch_size=spec.calibration_batch_size, limit=limit)
        try:
            for batch in batches:
                outs = session.run(wanted, batch.feeds)
                use({added[name]: np.asarray(arr) for name, arr in zip(wanted, outs, strict=True)})
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    finally:
        path.unlink(missing_ok=True)


_HISTOGRAM = {
    CalibrationMethod.ENTROPY: ("entropy", 128),
    CalibrationMethod.PERCENTILE: ("percentile", 2048),
    CalibrationMethod.DISTRIBUTION: ("distribution", 2048),
}


def calibrate_bodies(
    model_path: Path,
    spec: Recipe,
    op_types: Sequence[str],
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    *,
    seed: Callable[[Any, dict[str, Any]], int],
) -> BodyRanges | None:
    """Ranges of the tensors the model's compute bodies need, with the recipe's calibration method
    (None: no body holds a Conv/MatMul/Gemm of `op_types`). `seed` starts histograms at the global
    ranges (calibration.seed_histograms)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, TensorData, TensorsData

    model = onnx.load(str(model_path), load_external_data=False)
    # Types inside bodies where pre-processing's shape inference gave none (without them, the tensors of
    # unknown type are left out).
    with contextlib.suppress(Exception):
        model = onnx.shape_inference.infer_shapes(model)
    wanted = wanted_tensors(model, op_types)
    if not any(_compute_body(s, op_types) for s in scopes(model.graph)) or not wanted:
        return None
    # Beside the model, so that its external data (if any) is found by the same relative path.
    path = Path(model_path).with_name(Path(model_path).stem + ".bodies.onnx")
    method = CalibrationMethod(spec.calibration_method)
    lows: dict[tuple[Key, str], np.ndarray] = {}
    highs: dict[tuple[Key, str], np.ndarray] = {}

    def minmax(outs: dict[tuple[Key, str, str], np.ndarray]) -> None:
        for (key, name, stat), arr in outs.items():
            arr = arr[~np.isnan(arr)] if arr.dtype.kind == "f" else arr
            if not arr.size:
                continue
            store, pick = (lows, np.min) if stat == "min" else (highs, np.max)
            value = np.asarray(pick(arr)).astype(np.float32)
            old = store.get((key, name))
            store[(key, name)] = value if old is None else (np.minimum if stat == "min" else np.maximum)(old, value)

    augmented, added = augment(model, wanted, values=False)
    _run_all(augmented, path, added, source, inputs, spec, minmax)
    del augmented
    result = BodyRanges(OrtMethod.MinMax)
    found = [k for k in lows if k in highs]
    if method == CalibrationMethod.MINMAX:
        for key, name in found:
            lo, hi = lows[(key, name)], highs[(key, name)]
            if spec.symmetric_activations:
                amax = np.maximum(np.abs(lo), np.abs(hi))
                lo, hi = -amax, amax
            result.scopes.setdefault(key, {})[name] = TensorData(lowest=lo, highest=hi)
        return result

    kind, bins = _HISTOGRAM[method]
    collector = HistogramCollector(
        method=kind,
        symmetric=bool(spec.symmetric_activations) or method == CalibrationMethod.PERCENTILE,
        num_bins=bins,
        num_quantized_bins=128,
        percentile=float(spec.percentile),
        scenario="same",
    )
    ids = {k: f"t{i}" for i, k in enumerate(found)}
    seed(collector, {ids[k]: TensorData(lowest=lows[k], highest=highs[k]) for k in found})

    def histogram(outs: dict[tuple[Key, str, str], np.ndarray]) -> None:
        chunk = {ids[(key, name)]: arr for (key, name, _), arr in outs.items() if arr.size and (key, name) in ids}
        if chunk:
            with quiet_ort():
                collector.collect(chunk)

    augmented, added = augment(model, {k: v for k, v in wanted.items()}, values=True)
    try:
        _run_all(augmented, path, added, source, inputs, spec, histogram)
        with quiet_ort():
            computed = collector.compute_collection_result() if collector.histogram_dict else {}
        result.method = {
            CalibrationMethod.ENTROPY: OrtMethod.Entropy,
            CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
            CalibrationMethod.DISTRIBUTION: OrtMethod.Distribution,
        }[method]
        converted = TensorsData(result.method, computed)  # the collector's tuples as TensorData
        for k in found:
            if ids[k] in converted:
                result.scopes.setdefault(k[0], {})[k[1]] = converted[ids[k]]
    except Exception as exc:  # e.g. a Loop whose tensor changes shape between iterations
        result.warnings.append(
            f"{method.value} ranges could not be collected inside If/Loop/Scan bodies "
            f"({str(exc).strip().splitlines()[0][:200]}); their tensors use MinMax ranges."
        )
        for key, name in found:
            result.scopes.setdefault(key, {})[name] = TensorData(lowest=lows[(key, name)], highest=highs[(key, name)])
        result.method = OrtMethod.MinMax
    return result


# --------------------------------------------------------------------------------------------
# Quantization

# (standalone model, its ranges, node names to keep in float) -> the quantized standalone model
QuantizeGraph = Callable[[onnx.ModelProto, Any, list[str]], onnx.ModelProto]


def _types_seen(scope: Scope) -> dict[str, onnx.TypeProto]:
    types: dict[str, onnx.TypeProto] = {}
    chain = []
    s: Scope | None = scope.parent
    while s is not None:
        chain.append(s)
        s = s.parent
    for s in reversed(chain):
        types.update(s.types())
    return types


def _outer_initializer(scope: Scope, name: str) -> onnx.TensorProto | None:
    s = scope.parent
    while s is not None:
        if name in s.defined:
            return None
        found = next((t for t in s.graph.initializer if t.name == name), None)
        if found is not None:
            return found
        s = s.parent
    return None


def _standalone(scope: Scope, model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str], list[str]] | str:
    """The body as a model of its own: (model, names of the outer weights copied in, outer names made
    inputs), or why it cannot be one."""
    body = scope.graph
    reads = sorted(outer_reads(body))
    direct = {i for n in body.node for i in n.input}
    types = _types_seen(scope)
    graph = copy.deepcopy(body)
    copied: set[str] = set()
    made_inputs: list[str] = []
    for name in reads:
        init = _outer_initializer(scope, name) if name in direct else None
        if init is not None:
            graph.initializer.append(copy.deepcopy(init))
            copied.add(name)
            continue
        t = types.get(name)
        if t is None or not t.tensor_type.elem_type:
            return f"the type of {name!r}, which it reads from outside, is unknown"
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(t)
        graph.input.append(vi)
        made_inputs.append(name)
    if any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
        # A model quantized from its graph alone (streaming.py): its weights are not in memory here.
        return "its weights stay in external data (a model quantized without loading its weights)"
    standalone = helper.make_model(graph, opset_imports=list(model.opset_import))
    standalone.ir_version = model.ir_version
    return standalone, copied, made_inputs


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
        for i, n in enumerate(node.output):
            if n in renames:
                node.output[i] = renames[n]
    for t in graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for v in graph.value_info:
        if v.name in renames:
            v.name = renames[v.name]


def _defined_here(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(o for n in graph.node for o in n.output if o)
    return names


def _unmeasured_nodes(
    graph: onnx.GraphProto, ranges: Any, op_types: Sequence[str], types: dict[str, onnx.TypeProto]
) -> list[str]:
    """Nodes of `op_types` with a float activation that has no range (a branch the calibration data
    never took): they stay float."""
    weights = {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        acts = [n for n in (*node.input, *node.output) if n and n not in weights]
        floats = [n for n in acts if n in types and types[n].tensor_type.elem_type in FLOAT_TYPES]
        if any(n not in ranges for n in floats):
            names.append(node.name)
    return names


@dataclass
class BodiesDone:
    quantized: int = 0  # bodies
    skipped: list[str] = field(default_factory=list)  # why a body stayed float
    copied: set[str] = field(default_factory=set)  # outer weights copied into bodies
    unmeasured: list[str] = field(default_factory=list)  # Conv/MatMul/Gemm the calibration data never ran


def quantize_bodies(
    model: onnx.ModelProto,
    ranges: BodyRanges,
    top_ranges: Any,
    op_types: Sequence[str],
    quantize_graph: QuantizeGraph,
) -> BodiesDone:
    """Quantize, in place, every body of `model` that holds a Conv/MatMul/Gemm of `op_types`."""
    done = BodiesDone()
    names = all_names(model)
    domains = {o.domain for o in model.opset_import}
    counter = itertools.count()

    def visit(scope: Scope) -> None:
        for node in list(scope.graph.node):
            for attr, index, g in _graphs_of(node):
                inner = Scope((*scope.key, _body_key(node, attr, index)), g, node, attr, scope, scope.depth + 1)
                if _compute_body(inner, op_types):
                    _one(inner)
                visit(inner)

    def _one(scope: Scope) -> None:
        where = " > ".join(scope.key)
        made = _standalone(scope, model)
        if isinstance(made, str):
            done.skipped.append(f"{where}: {made}")
            return
        standalone, copied, outer_inputs = made
        visible = ranges.visible(scope.key, top_ranges)
        inferred = onnx.shape_inference.infer_shapes(standalone)
        types = Scope((), inferred.graph).types()
        keep_float = _unmeasured_nodes(standalone.graph, visible, op_types, types)
        done.unmeasured += [
            n for n in keep_float if any(n == m.name and m.op_type in BODY_OPS for m in scope.graph.node)
        ]
        try:
            quantized = quantize_graph(standalone, visible, keep_float)
        except Exception as exc:
            done.skipped.append(
                f"{where}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}"
            )
            return
        qg = quantized.graph
        n_formal = len(scope.graph.input)
        if [i.name for i in qg.input[:n_formal]] != [i.name for i in scope.graph.input] or [
            o.name for o in qg.output
        ] != [o.name for o in scope.graph.output]:
            done.skipped.append(f"{where}: the quantizer changed the body's inputs or outputs")
            return
        before = _defined_here(scope.graph)  # a name now made here that an outer graph has is renamed too
        body = onnx.GraphProto()
        body.CopyFrom(qg)
        del body.input[:]
        body.input.extend(qg.input[:n_formal])
        outer = set(outer_inputs) | copied
        kept_inits = [t for t in qg.initializer if t.name not in copied]
        del body.initializer[:]
        body.initializer.extend(kept_inits)
        kept_vi = [v for v in qg.value_info if v.name not in outer]
        del body.value_info[:]
        body.value_info.extend(kept_vi)
        new = _defined_here(body) - before
        tag = next(counter)
        renames = {n: f"{n}/body{tag}" for n in sorted(new) if n in names}
        for old, fresh in list(renames.items()):
            while fresh in names:
                fresh += "_"
            renames[old] = fresh
        _rename(body, renames)
        names.update(_defined_here(body))
        scope.graph.CopyFrom(body)
        used_domains = {n.domain for n in body.node}
        for o in quantized.opset_import:
            if o.domain not in domains and o.domain in used_domains:
                model.opset_import.append(o)
                domains.add(o.domain)
        done.copied |= copied
        done.quantized += 1

    visit(Scope((), model.graph))
    _drop_unread(model, done.copied)
    return done


def _drop_unread(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the outer weights that bodies used to read and no graph reads any more (their int8
    copies live in the bodies)."""
    read: set[str] = set()
    all_scopes = scopes(model.graph)
    for scope in all_scopes:
        read.update(i for n in scope.graph.node for i in n.input)
        read.update(o.name for o in scope.graph.output)
    for scope in all_scopes:
        g = scope.graph
        if any(t.name in candidates and t.name not in read for t in g.initializer):
            keep = [t for t in g.initializer if t.name not in candidates or t.name in read]
            del g.initializer[:]
            g.initializer.extend(keep)


# --------------------------------------------------------------------------------------------
# What the result shows


def _dequantized_inputs(graph: onnx.GraphProto) -> set[str]:
    return {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}


def body_nodes(model: onnx.ModelProto) -> list[tuple[FloatNode, bool]]:
    """Every Conv/MatMul/Gemm inside a body (and what QOperator made of one), as (name, op type,
    subgraph), with whether it is quantized."""
    found: list[tuple[FloatNode, bool]] = []

    def walk(graph: onnx.GraphProto, where: str, dq_outer: set[str]) -> None:
        for node in graph.node:
            for attr, index, g in _graphs_of(node):
                inner = f"{where} > " if where else ""
                inner += f"{node.name or node.op_type}.{attr}" + (f"[{index}]" if index >= 0 else "")
                dq = dq_outer | _dequantized_inputs(g)
                for n in g.node:
                    if n.op_type in QOPERATOR_OPS:
                        found.append((FloatNode(name=n.name, op_type=n.op_type, subgraph=inner), True))
                    elif n.op_type in BODY_OPS:
                        quantized = len(n.input) > 1 and all(i in dq for i in n.input[:2])
                        found.append((FloatNode(name=n.name, op_type=n.op_type, subgraph=inner), quantized))
                walk(g, inner, dq)

    walk(model.graph, "", _dequantized_inputs(model.graph))
    return found
