"""The pre-flight: how much faster int8 runs than float on this CPU, for this model's own layers, measured before
mode auto searches, so that the search skips what cannot win and ranks fallbacks by the time they cost.

Each distinct layer of the prepared model (op type, input and weight shapes, attributes) becomes a one-node
model with the layer's own weights, timed on the worker's CPU interleaved with its int8 variants:
- `island`: the node in float between a DequantizeLinear and a QuantizeLinear, int8 in and out: what the node
  costs in an int8 model that leaves it in float (an op type ONNX Runtime's quantizer does not quantize, such
  as HardSwish, or a node a fallback returns to float);
- per int8 kind, ONNX Runtime's own quantizer on the one-node model, minus the QuantizeLinear that reads the
  graph input and the DequantizeLinear that writes the output (int8 in and out, as between quantized
  neighbours): `qdq` (this CPU's static types, `candidates.int8_settings`), `qoperator`, `s8s8` (int8
  activations, where `qdq` is U8S8) and `dynamic` (float in and out). A kind the quantizer leaves the node
  alone in has no time of its own: the node is an island there (or plain float, for dynamic).
A recipe's predicted time is the sum over the timed nodes: quantized nodes at their int8 time, a Relu or Clip
after a quantized node at none (the quantizer folds it into that node's range), other float nodes at their
float time plus half their island's conversions for each side (inputs, outputs) with a statically quantized
neighbour. Its predicted speedup is the float sum over that. One-node models miss what the whole graph fuses;
the prediction only decides what is not worth trying (NOT_WORTH_BELOW), every model tried is measured.

Timings are cached per CPU (model name and int8 features) and ONNX Runtime version, one entry per layer and
thread count, by the worker (`worker/preflight_timings.py`): it hands a job the timings it has, read-only, and
merges back the ones the job measured. Another model with the same layers, or the same model again, re-times
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from core.preflight_timings import (
    MAX_CACHE_ENTRIES,
    Identity,
    Refused,
    Timing,
    TimingsFile,
    int8_features,
    read_timings,
    write_timings,
)
from core.recipe import ActivationType, Mode, QuantFormat, Recipe
from core.result import Preflight, PreflightOp, PrunedCandidate
from worker.engine.candidates import COMPUTE_OPS, int8_settings
from worker.engine.graph_order import subgraph_nodes
from worker.engine.latency import time_interleaved
from worker.engine.machine import machine_info
from worker.engine.quantize import quantize_with_ranges
from worker.engine.quiet import quiet_ort
from worker.engine.session import session_options

KINDS = ("qdq", "qoperator", "s8s8", "dynamic")
KIND_NAMES = {"qdq": "QDQ", "qoperator": "QOperator", "s8s8": "QDQ S8S8", "dynamic": "dynamic"}
MAX_LAYERS = 128  # distinct layers timed per model, heaviest first; the rest count as neither faster nor slower
MIN_ELEMENTS = 64  # nodes reading fewer values are not worth a timing
# A layer whose weights are larger is not timed alone (it counts as neither faster nor slower): its one-node
# model and variants, each session open while they are timed, would hold its weights several times over.
MAX_LAYER_WEIGHT_BYTES = 256 << 20
LAYER_SECONDS = 0.06  # timed rounds per layer (each round runs every variant once)
MIN_RUNS, MAX_RUNS = 9, 200
QUANTILE = 20  # percent
# Below this predicted speedup a recipe cannot win. Not 1: one-node models miss what the whole graph does
# (fusions; the layout changes ONNX Runtime puts around each int8 and float conv, which neighbours share), and
# on an Intel Xeon (VNNI, 2 cores) whole CNNs measured from 0.6 to 1.25 times their prediction; what is tried
# is measured.
NOT_WORTH_BELOW = 0.8
PROVIDER = "CPUExecutionProvider"
# Never timed: they move no data worth timing, or hold subgraphs.
SKIPPED_OPS = frozenset(
    {"Constant", "ConstantOfShape", "Shape", "Size", "Identity", "Range", "If", "Loop", "Scan", "NonZero"}
)
# Never timed in their dynamic variant: ConvInteger runs at a fraction of float's speed, and no candidate asks for it.
UNTIMED_DYNAMIC = frozenset({"Conv"})
# ONNX Runtime's static quantizer folds a Relu or Clip into the range of the quantized node before it (the node
# is gone from the int8 model); right after a compute op it is fused into it in float as well: free both ways,
# so not timed.
FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})
INT8_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
    }
)


# --------------------------------------------------------------------------------------------
# Layers and their timings


@dataclass(frozen=True)
class Layer:
    """A node as the timings know it: what decides its speed, not its name or weight values."""

    op_type: str
    domain: str
    inputs: tuple[tuple[Any, ...], ...]  # per input: (role, shape, element type[, values of a small int tensor])
    attributes: str

    @property
    def key(self) -> str:
        text = json.dumps([self.op_type, self.domain, self.inputs, self.attributes], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class KernelTimer(Protocol):
    def time(self, layer: Layer, variants: Mapping[str, Path]) -> dict[str, float]:
        """ms per run of each variant (`float`, `island` and the int8 kinds), timed interleaved."""
        ...


class TimingCache:
    """Layer timings of one CPU and ONNX Runtime version: those the worker handed in (`known`, a file the job
    only reads; None: none) and those measured here, which `save` writes to `out` (None: not kept) for the
    worker to merge into its cache (`worker/preflight_timings.py`)."""

    def __init__(
        self,
        known: Path | None,
        *,
        cpu_model: str | None,
        cpu_features: Sequence[str],
        onnxruntime: str,
        threads: int = 1,
        out: Path | None = None,
    ) -> None:
        self.threads = threads
        self.identity = Identity(cpu_model=cpu_model, cpu_features=sorted(cpu_features), onnxruntime=onnxruntime)
        self.out = out
        self.entries: dict[str, Timing] = dict(self._read(known).entries)
        self.new: dict[str, Timing] = {}

    def _read(self, path: Path | None) -> TimingsFile:
        if path is None:
            return TimingsFile()
        try:
            stored = read_timings(path, max_bytes=1 << 30, max_entries=MAX_CACHE_ENTRIES)
        except Refused:  # unreadable: time again, it is only a cache
            return TimingsFile()
        return stored if stored.identity == self.identity else TimingsFile()

    def get(self, key: str) -> Timing | None:
        return self.entries.get(f"{self.threads}:{key}")

    def put(self, key: str, timing: Timing) -> None:
        self.entries[f"{self.threads}:{key}"] = timing
        self.new[f"{self.threads}:{key}"] = timing

    def save(self) -> None:
        """Write what was measured here (only that) to `out`."""
        if self.out is None or not self.new:
            return
        with contextlib.suppress(OSError):
            write_timings(self.out, TimingsFile(**self.identity.model_dump(), entries=self.new))


def cache_for(known: Path | None, threads: int, out: Path | None = None) -> TimingCache:
    """The cache of this CPU and ONNX Runtime version."""
    info = machine_info(threads)
    return TimingCache(
        known,
        cpu_model=info.cpu_model,
        cpu_features=int8_features(),
        onnxruntime=ort.__version__,
        threads=threads,
        out=out,
    )


# --------------------------------------------------------------------------------------------
# The prediction


@dataclass(frozen=True)
class TimedNode:
    name: str
    op_type: str
    key: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class _Config:
    """What a recipe quantizes, as the prediction needs it."""

    static_kind: str | None
    static_ops: frozenset[str] | None  # None: every op type the quantizer handles
    dynamic_ops: frozenset[str] | None  # None: every op type (mode dynamic); empty: none
    excluded: frozenset[str]


@dataclass
class PreflightResult:
    """The pre-flight of one model: its timed nodes and their layers' timings."""

    int8: str
    nodes: dict[str, TimedNode]
    timings: dict[str, Timing]  # by layer key
    all_nodes: int
    layers_cached: int = 0
    complete: bool = True
    seconds: float = 0.0
    cpu_model: str | None = None
    threads: int | None = None
    pruned: list[PrunedCandidate] = field(default_factory=list)
    # The int8 candidates the search kept to measure, by name, with their predicted speedups (auto's plan).
    kept: dict[str, float] = field(default_factory=dict)
    # Conv/MatMul/Gemm inside If/Loop/Scan bodies, which no layer of the top graph times: with any, the top
    # graph's layers are not the model's cost, and nothing is predicted (the search measures every candidate).
    untimed_in_bodies: int = 0

    # -- recipes --------------------------------------------------------------------------------

    def _kind_of(self, spec: Recipe) -> str | None:
        """The measured kind a static recipe's format and activation type run as (None: not measured)."""
        default = ActivationType(int8_settings(self.int8)["activation_type"])
        activation = ActivationType(spec.activation_type)
        if spec.format == QuantFormat.QOPERATOR:
            return "qoperator" if activation == default else None
        if activation == default:
            return "qdq"
        return "s8s8" if activation == ActivationType.INT8 else None

    def config(self, spec: Recipe) -> _Config | None:
        excluded = frozenset(spec.nodes_to_exclude or ())
        if spec.mode == Mode.STATIC:
            kind = self._kind_of(spec)
            if kind is None:
                return None
            dynamic = frozenset(spec.dynamic_op_types or ())
            ops = None if spec.op_types_to_quantize is None else frozenset(spec.op_types_to_quantize) - dynamic
            return _Config(kind, ops, dynamic, excluded)
        if spec.mode == Mode.DYNAMIC and not spec.transformer_fusion:  # fusion makes another graph
            ops = None if spec.op_types_to_quantize is None else frozenset(spec.op_types_to_quantize)
            return _Config(None, frozenset(), ops, excluded)
        return None

    def _node_times(self, cfg: _Config) -> dict[str, float] | None:
        """Each timed node's predicted time under `cfg` (None: a node it quantizes dynamically was never timed
        so: a Conv, see `_variants`)."""
        static: set[str] = set()
        dynamic: set[str] = set()
        folded: set[str] = set()
        for name, node in self.nodes.items():
            timing = self.timings[node.key]
            if name in cfg.excluded:
                continue
            wanted = cfg.dynamic_ops is None or node.op_type in cfg.dynamic_ops
            if node.op_type in FOLDED_ACTIVATIONS and cfg.static_kind and any(p in static for p in node.producers):
                static.add(name)  # folded into its producer's range: free
                folded.add(name)
            elif cfg.static_kind in timing.int8_ms and (cfg.static_ops is None or node.op_type in cfg.static_ops):
                static.add(name)
            elif "dynamic" in timing.int8_ms and wanted:
                dynamic.add(name)
            elif wanted and node.op_type in UNTIMED_DYNAMIC:
                return None
        times: dict[str, float] = {}
        for name, node in self.nodes.items():
            timing = self.timings[node.key]
            if name in static:
                times[name] = 0.0 if name in folded else timing.int8_ms[str(cfg.static_kind)]
            elif name in dynamic:
                times[name] = timing.int8_ms["dynamic"]
            else:
                conversions = max(0.0, timing.island_ms - timing.float_ms)
                sides = 0.5 * any(p in static for p in node.producers) + 0.5 * any(c in static for c in node.consumers)
                times[name] = timing.float_ms + conversions * sides
        return times

    @property
    def float_ms(self) -> float:
        return sum(self.timings[n.key].float_ms for n in self.nodes.values())

    def predicted_ms(self, spec: Recipe) -> float | None:
        if self.untimed_in_bodies:
            return None
        cfg = self.config(spec)
        times = None if cfg is None or not self.nodes else self._node_times(cfg)
        return None if times is None else sum(times.values())

    def predict(self, spec: Recipe) -> float | None:
        """The recipe's predicted speedup over float (None: the pre-flight cannot say)."""
        predicted = self.predicted_ms(spec)
        return None if predicted is None or predicted <= 0 else self.float_ms / predicted

    def exclusion_cost(self, spec: Recipe, nodes: Iterable[str]) -> float | None:
        """The share of the recipe's predicted time that returning `nodes` to float adds (negative: it saves)."""
        base = self.predicted_ms(spec)
        if base is None or base <= 0:
            return None
        more = (*(spec.nodes_to_exclude or ()), *nodes)
        with_more = self.predicted_ms(_with_excluded(spec, more))
        return None if with_more is None else (with_more - base) / base

    # -- per kind, per op type -------------------------------------------------------------------

    def _whole(self, kind: str) -> _Config:
        if kind == "dynamic":
            return _Config(None, frozenset(), None, frozenset())
        return _Config(kind, None, frozenset(), frozenset())

    def measured_kinds(self) -> list[str]:
        kinds = [k for k in KINDS if any(k in t.int8_ms for t in self.timings.values())]
        return [k for k in kinds if k != "s8s8" or self.int8 != "avx2"]

    def speedups(self) -> dict[str, float | None]:
        """Predicted whole-model speedup per int8 kind."""
        total = self.float_ms
        out: dict[str, float | None] = {}
        if self.untimed_in_bodies:
            return out
        for kind in self.measured_kinds():
            times = self._node_times(self._whole(kind))
            ms = None if times is None else sum(times.values())
            out[kind] = round(total / ms, 3) if ms else None
        return out

    def fast(self, kind: str, margin: float = 0.0) -> bool:
        value = self.speedups().get(kind)
        return value is not None and value >= 1.0 + margin

    def ops(self) -> list[PreflightOp]:
        total = self.float_ms or 1.0
        per_kind = {kind: times for kind in self.measured_kinds() if (times := self._node_times(self._whole(kind)))}
        rows: dict[str, list[str]] = {}
        for name, node in self.nodes.items():
            rows.setdefault(node.op_type, []).append(name)
        out = []
        for op, names in rows.items():
            float_ms = sum(self.timings[self.nodes[n].key].float_ms for n in names)
            speedups: dict[str, float | None] = {}
            free = []
            for kind, times in per_kind.items():
                ms = sum(times[n] for n in names)
                speedups[kind] = round(float_ms / ms, 3) if ms > 0 else None
                if ms == 0:
                    free.append(kind)
            out.append(
                PreflightOp(
                    op_type=op,
                    nodes=len(names),
                    float_ms=round(float_ms, 4),
                    share=round(float_ms / total, 4),
                    speedups=speedups,
                    free_in=free,
                )
            )
        return sorted(out, key=lambda r: -r.float_ms)

    def verdict(self) -> tuple[str, bool]:
        if self.untimed_in_bodies:
            return (
                f"{self.untimed_in_bodies} Conv/MatMul/Gemm node(s) sit inside If/Loop/Scan bodies, which the "
                "pre-flight does not time: the search tries every candidate",
                True,
            )
        speedups = {k: v for k, v in self.speedups().items() if v is not None}
        if not speedups:
            return "nothing could be timed: the search tries every candidate", True
        best_kind = max(speedups, key=lambda k: speedups[k])
        best = speedups[best_kind]
        parts = []
        for row in self.ops()[:6]:
            value = row.speedups.get(best_kind)  # type: ignore[call-overload]
            if row.share < 0.05:
                continue
            if best_kind in row.free_in:
                parts.append(f"{row.op_type} folded away")
            elif value is not None:
                parts.append(f"{row.op_type} {'blocks ' if value < 0.95 else ''}{value:.1f}x")
        layers = "; ".join(parts[:4]) or "every layer near float"
        predicted = f"{KIND_NAMES[best_kind]} {best:.2f}x predicted"
        if best >= 1.0:
            return f"{layers}: int8 can help here ({predicted})", True
        if best >= NOT_WORTH_BELOW:
            return f"{layers}: int8 is near float here ({predicted}); measured to decide", True
        if self.kept:
            # Whole-model int8 loses, but a candidate that leaves the losing layers in float is predicted near
            # float: it is measured, so "int8 will not help" would contradict the trials the result lists.
            name, speedup = max(self.kept.items(), key=lambda kv: kv[1])
            return (
                f"{layers}: whole-model int8 will not help here (best {predicted}); {len(self.kept)} candidate(s) "
                f"predicted near float measured to decide ({name} {speedup:.2f}x predicted)",
                True,
            )
        return f"{layers}: int8 will not help here (best {predicted})", False

    def summary(self) -> Preflight:
        verdict, helps = self.verdict()
        return Preflight(
            verdict=verdict,
            int8_helps=helps,
            speedups=self.speedups(),
            ops=self.ops(),
            pruned=list(self.pruned),
            nodes=self.all_nodes,
            nodes_timed=len(self.nodes),
            layers=len(self.timings),
            layers_cached=self.layers_cached,
            complete=self.complete,
            cpu_model=self.cpu_model,
            onnxruntime=ort.__version__,
            threads=self.threads,
            seconds=round(self.seconds, 3),
        )


def _with_excluded(spec: Recipe, nodes: Sequence[str]) -> Recipe:
    return dataclasses.replace(spec, nodes_to_exclude=tuple(dict.fromkeys(nodes)))


# --------------------------------------------------------------------------------------------
# Measuring


def preflight(
    prepared: Path,
    feeds: Mapping[str, np.ndarray],
    workdir: Path,
    *,
    int8: str,
    cache: TimingCache,
    timer: KernelTimer,
    deadline: float,
    clock: Callable[[], float] = time.perf_counter,
    threads: int | None = None,
) -> PreflightResult:
    """Time the layers of the prepared model `prepared` (run on `feeds` for the shapes) that the cache lacks,
    heaviest first, until `deadline` (a `clock()` value); the cache is saved before returning."""
    started = clock()
    workdir.mkdir(parents=True, exist_ok=True)
    # The quantizer's own calibration sessions would warn on stderr about every one-node model.
    ort.set_default_logger_severity(3)
    model = onnx.load(str(prepared), load_external_data=False)
    graph = model.graph
    in_bodies = sum(1 for _, n in subgraph_nodes(graph) if n.op_type in COMPUTE_OPS)
    if in_bodies:  # the top graph's layers would judge the model by its glue (see PreflightResult)
        return PreflightResult(
            int8=int8,
            nodes={},
            timings={},
            all_nodes=len(graph.node),
            complete=False,
            seconds=clock() - started,
            threads=threads,
            untimed_in_bodies=in_bodies,
        )
    names = [n.name or f"#{i}" for i, n in enumerate(graph.node)]
    shapes, values = _tensor_facts(model, prepared, feeds, workdir)
    inits = {i.name: i for i in graph.initializer}
    producer = {o: names[i] for i, n in enumerate(graph.node) for o in n.output if o}
    consumers: dict[str, list[str]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(names[i])
    op_of = {names[i]: n.op_type for i, n in enumerate(graph.node)}
    node_of = dict(zip(names, graph.node, strict=True))

    layers: dict[str, tuple[Layer, onnx.NodeProto, float]] = {}
    node_layer: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        layer = _layer(node, shapes, values, inits, op_of.get(producer.get(node.input[0] if node.input else "", "")))
        if layer is None:
            continue
        node_layer[names[i]] = layer.key
        if layer.key not in layers:
            layers[layer.key] = (layer, node, _weight(node, shapes, inits))
    timings: dict[str, Timing] = {}
    cached = tried = 0
    complete = True
    for layer, node, _ in sorted(layers.values(), key=lambda entry: -entry[2]):
        known = cache.get(layer.key)
        if known is not None:
            timings[layer.key] = known
            cached += 1
            continue
        if tried >= MAX_LAYERS or clock() >= deadline:
            complete = False
            continue
        tried += 1
        folder = workdir / f"layer-{tried}"
        try:
            variants = _variants(model, prepared, node, layer, shapes, values, folder, int8)
            if variants is None:
                continue
            measured = timer.time(layer, variants)
            if "float" not in measured or "island" not in measured:
                continue
            timing = Timing(
                float_ms=measured["float"],
                island_ms=measured["island"],
                int8_ms={kind: ms for kind, ms in measured.items() if kind in KINDS and kind in variants},
            )
        except Exception:  # a layer that cannot be built or timed alone counts as neither faster nor slower
            continue
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        timings[layer.key] = timing
        cache.put(layer.key, timing)
    cache.save()
    nodes = {
        name: TimedNode(
            name=name,
            op_type=op_of[name],
            key=key,
            producers=tuple(sorted({producer[t] for t in node_of[name].input if t in producer})),
            consumers=tuple(sorted({c for t in node_of[name].output for c in consumers.get(t, ())})),
        )
        for name, key in node_layer.items()
        if key in timings
    }
    return PreflightResult(
        int8=int8,
        nodes=nodes,
        timings=timings,
        all_nodes=len(graph.node),
        layers_cached=cached,
        complete=complete,
        seconds=clock() - started,
        threads=threads,
    )


def _tensor_facts(
    model: onnx.ModelProto, prepared: Path, feeds: Mapping[str, np.ndarray], workdir: Path
) -> tuple[dict[str, tuple[tuple[int, ...], int]], dict[str, np.ndarray]]:
    """Concrete shape and element type of every tensor the nodes read, for `feeds`; and the values of the
    small non-float tensors computed at run time (shapes, indices), which a one-node model needs as constants."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in np.asarray(feeds[inp.name]).shape:
                dims.add().dim_value = int(d)
    with contextlib.suppress(Exception):  # shapes inference may give up: the run below fills the gaps
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    for info in (*fixed.graph.input, *fixed.graph.value_info, *fixed.graph.output):
        t = info.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in t.shape.dim):
            shapes[info.name] = (tuple(d.dim_value for d in t.shape.dim), t.elem_type)
    del fixed
    wanted = []
    for node in graph.node:
        for name in node.input:
            if not name or name in inits or name in feeds:
                continue
            known = shapes.get(name)
            if known is None or known[1] not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                wanted.append(name)
    values: dict[str, np.ndarray] = {}
    for name, array in feeds.items():
        shapes[name] = (tuple(np.asarray(array).shape), helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype))
    wanted = list(dict.fromkeys(wanted))
    if wanted:
        probe = onnx.load(str(prepared), load_external_data=False)
        present = {o.name for o in probe.graph.output}
        for name in wanted:
            if name not in present:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        path = prepared.parent / f"{prepared.stem}.preflight.onnx"
        try:
            onnx.save(probe, str(path))
            del probe
            options = session_options(1)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            with quiet_ort():
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                names = [o.name for o in session.get_outputs()]
                outputs = session.run(names, dict(feeds))
            for name, value in zip(names, outputs, strict=True):
                if name not in wanted:
                    continue
                array = np.asarray(value)
                shapes[name] = (tuple(array.shape), helper.np_dtype_to_tensor_dtype(array.dtype))
                if array.dtype.kind not in "fc" and array.size <= 4096:
                    values[name] = array
        except Exception:  # the shapes inference found are all there is
            pass
        finally:
            path.unlink(missing_ok=True)
    return shapes, values


def _attributes(node: onnx.NodeProto) -> str | None:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            return None
        value = helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = ["tensor", list(value.dims), value.data_type]
        elif isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, list):
            value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
        out[a.name] = value
    return json.dumps(out, sort_keys=True, default=str)


def _layer(
    node: onnx.NodeProto,
    shapes: Mapping[str, tuple[tuple[int, ...], int]],
    values: Mapping[str, np.ndarray],
    inits: Mapping[str, onnx.TensorProto],
    producer_op: str | None,
) -> Layer | None:
    """The node's layer, or None when it is not worth timing (or cannot be timed alone)."""
    if node.op_type in SKIPPED_OPS or node.domain not in ("", "ai.onnx", "com.microsoft") or not node.input:
        return None
    if node.op_type in FOLDED_ACTIVATIONS and producer_op in COMPUTE_OPS:
        return None
    first = shapes.get(node.input[0])
    if node.input[0] in inits or first is None or first[1] != TensorProto.FLOAT:
        return None
    if math.prod(first[0]) < MIN_ELEMENTS:
        return None
    attributes = _attributes(node)
    if attributes is None:
        return None
    inputs: list[tuple[Any, ...]] = []
    for name in node.input:
        if not name:
            inputs.append(("",))
        elif name in inits:
            if _tensor_bytes(inits[name]) > MAX_LAYER_WEIGHT_BYTES:
                return None
            inputs.append(("w", tuple(inits[name].dims), inits[name].data_type))
        elif name in shapes and shapes[name][1] == TensorProto.FLOAT:
            inputs.append(("x", shapes[name][0], TensorProto.FLOAT))
        elif name in values:
            array = values[name]
            inputs.append(("c", tuple(array.shape), str(array.dtype), array.reshape(-1)[:64].tolist()))
        else:
            return None  # a float16 or unknown input: not this pre-flight's business
    return Layer(node.op_type, node.domain, tuple(inputs), attributes)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
    return math.prod(tensor.dims) * itemsize


def _weight(node: onnx.NodeProto, shapes: Mapping[str, tuple[tuple[int, ...], int]], inits: Mapping[str, Any]) -> float:
    """Rough multiply-adds, to time the heaviest layers first."""
    x = float(math.prod(shapes[node.input[0]][0]))
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
        w = tuple(inits[node.input[1]].dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = int(attrs.get("group", 1))
        strides = attrs.get("strides") or [1]
        return x * w[0] * math.prod(w[2:]) / max(1, group * math.prod(strides))
    if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
        other = tuple(inits[node.input[1]].dims) if node.input[1] in inits else shapes.get(node.input[1], ((1,), 0))[0]
        return x * (other[-1] if other else 1)
    return x


# --------------------------------------------------------------------------------------------
# One-node models


def _one_node(
    model: onnx.ModelProto,
    prepared: Path,
    node: onnx.NodeProto,
    shapes: Mapping[str, tuple[tuple[int, ...], int]],
    values: Mapping[str, np.ndarray],
) -> onnx.ModelProto:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs, initializers = [], []
    for name in dict.fromkeys(i for i in node.input if i):
        if name in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(prepared.parent))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            initializers.append(tensor)
        elif name in values:
            initializers.append(numpy_helper.from_array(values[name], name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shapes[name][0])))
    outputs = [
        helper.make_tensor_value_info(o, shapes[o][1] if o in shapes else TensorProto.FLOAT, None)
        for o in node.output
        if o
    ]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    graph = helper.make_graph([copy], "layer", graph_inputs, outputs, initializers)
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version
    return one


def _random_feeds(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    m = onnx.load(str(path), load_external_data=False)
    feeds = {}
    for i in m.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        kind = i.type.tensor_type.elem_type
        if kind == TensorProto.UINT8:
            feeds[i.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif kind == TensorProto.INT8:
            feeds[i.name] = rng.integers(-128, 128, shape, dtype=np.int8)
        else:
            feeds[i.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feeds


def _quantized(path: Path) -> bool:
    return any(n.op_type in INT8_OPS for n in onnx.load(str(path)).graph.node)


def _strip_boundaries(path: Path) -> None:
    """Remove the QuantizeLinear that reads a graph input and the DequantizeLinear that writes a graph output:
    the layer then reads and writes int8, as between quantized neighbours."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    keep, new_inputs, new_outputs = [], {}, {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inputs and len(n.input) > 2 and n.input[2] in inits:
            new_inputs[n.input[0]] = (n.output[0], inits[n.input[2]].data_type)
        elif n.op_type == "DequantizeLinear" and n.output[0] in outputs and len(n.input) > 2 and n.input[2] in inits:
            new_outputs[n.output[0]] = (n.input[0], inits[n.input[2]].data_type)
        else:
            keep.append(n)
    ins = []
    for i in graph.input:
        if i.name in new_inputs:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            ins.append(helper.make_tensor_value_info(new_inputs[i.name][0], new_inputs[i.name][1], shape))
        else:
            ins.append(i)
    outs = [
        helper.make_tensor_value_info(new_outputs[o.name][0], new_outputs[o.name][1], None)
        if o.name in new_outputs
        else o
        for o in graph.output
    ]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.input[:]
    graph.input.extend(ins)
    del graph.output[:]
    graph.output.extend(outs)
    onnx.save(model, str(path))


def _island(one: onnx.ModelProto, out: Path, zero_type: int) -> None:
    """The float node between DequantizeLinear and QuantizeLinear: int8 in and out."""
    graph = one.graph
    zero = 128 if zero_type == TensorProto.UINT8 else 0
    extra = [
        numpy_helper.from_array(np.array(0.05, np.float32), "island_scale"),
        helper.make_tensor("island_zero", zero_type, [], [zero]),
    ]
    nodes, ins, outs = [], [], []
    for i in graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        ins.append(helper.make_tensor_value_info(f"{i.name}_q", zero_type, shape))
        nodes.append(helper.make_node("DequantizeLinear", [f"{i.name}_q", "island_scale", "island_zero"], [i.name]))
    nodes.extend(graph.node)
    for o in graph.output:
        if o.type.tensor_type.elem_type == TensorProto.FLOAT:
            nodes.append(helper.make_node("QuantizeLinear", [o.name, "island_scale", "island_zero"], [f"{o.name}_q"]))
            outs.append(helper.make_tensor_value_info(f"{o.name}_q", zero_type, None))
        else:
            outs.append(o)
    island = helper.make_graph(nodes, "island", ins, outs, [*graph.initializer, *extra])
    model = helper.make_model(island, opset_imports=list(one.opset_import))
    model.ir_version = one.ir_version
    onnx.save(model, str(out))


def _ranges(path: Path, feeds: dict[str, np.ndarray]) -> Any:
    """MinMax ranges of the one-node model's inputs and outputs on `feeds` (ORT's TensorsData)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    options = session_options(1)
    session = ort.InferenceSession(str(path), options, providers=[PROVIDER])
    names = [o.name for o in session.get_outputs()]
    values = {**feeds, **dict(zip(names, session.run(names, feeds), strict=True))}
    data = {}
    for name, value in values.items():
        array = np.asarray(value)
        if array.dtype == np.float32 and array.size:
            finite = array[np.isfinite(array)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            data[name] = TensorData(
                lowest=np.array(min(low, 0.0), np.float32), highest=np.array(max(high, 0.0), np.float32)
            )
    return TensorsData(CalibrationMethod.MinMax, data)


def _variants(
    model: onnx.ModelProto,
    prepared: Path,
    node: onnx.NodeProto,
    layer: Layer,
    shapes: Mapping[str, tuple[tuple[int, ...], int]],
    values: Mapping[str, np.ndarray],
    folder: Path,
    int8: str,
) -> dict[str, Path] | None:
    """The layer's one-node model and its variants, as files (None: it cannot stand alone). The static kinds
    go through the job's own static quantizer (`quantize.quantize_with_ranges`), on ranges of random inputs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    one = _one_node(model, prepared, node, shapes, values)
    if not one.graph.input:
        return None
    float_path = folder / "float.onnx"
    onnx.save(one, str(float_path))
    settings = int8_settings(int8)
    default = ActivationType(settings["activation_type"])
    zero_type = TensorProto.INT8 if default == ActivationType.INT8 else TensorProto.UINT8
    _island(one, folder / "island.onnx", zero_type)
    variants = {"float": float_path, "island": folder / "island.onnx"}
    ranges = _ranges(float_path, _random_feeds(float_path))
    static = {"mode": Mode.STATIC, "per_channel": True, **settings}
    kinds = {"qdq": Recipe(**static), "qoperator": Recipe(**static, format=QuantFormat.QOPERATOR)}
    if default != ActivationType.INT8:
        kinds["s8s8"] = Recipe(**{**static, "activation_type": ActivationType.INT8})
    for kind, spec in kinds.items():
        out = folder / f"{kind}.onnx"
        try:
            with quiet_ort():
                quantize_with_ranges(float_path, spec, ranges, out)
            if _quantized(out):
                _strip_boundaries(out)
                variants[kind] = out
        except Exception:  # the quantizer cannot take it alone: an island in that kind
            continue
    if node.op_type in UNTIMED_DYNAMIC:
        return variants
    out = folder / "dynamic.onnx"
    with contextlib.suppress(Exception):
        with quiet_ort():
            quantize_dynamic(
                str(float_path), str(out), weight_type=QuantType.QInt8, reduce_range=bool(settings["reduce_range"])
            )
        if _quantized(out):
            variants["dynamic"] = out
    return variants


class OrtKernelTimer:
    """Times a layer's variants on this CPU, interleaved, with the search's session options. A variant's time is
    a low quantile of its runs (QUANTILE): runs this short are only ever slowed by a busy machine, never sped
    up, and the low quantile is what they cost undisturbed. Each run first loses the p50 of a session that does
    nothing (its call overhead, which the whole model pays once, not once per layer)."""

    def __init__(self, threads: int, *, seconds: float = LAYER_SECONDS) -> None:
        self.threads = threads
        self.seconds = seconds
        self._overhead: float | None = None
        self._warm = False

    def overhead(self) -> float:
        if self._overhead is None:
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "nothing", [x], [y])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            model.ir_version = 8
            options = session_options(self.threads)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDER])
            feed = {"x": np.zeros(1, np.float32)}
            timings = time_interleaved([lambda: session.run(None, feed)], runs=200, warmup_runs=10)
            self._overhead = timings.stats()[0].p50
        return self._overhead

    def time(self, layer: Layer, variants: Mapping[str, Path]) -> dict[str, float]:
        floor = self.overhead()
        options = session_options(self.threads)
        names = ["float", *(n for n in variants if n != "float")]
        with quiet_ort():
            sessions = [ort.InferenceSession(str(variants[n]), options, providers=[PROVIDER]) for n in names]
        feeds = [_random_feeds(variants[n]) for n in names]

        def runner(i: int) -> Callable[[], object]:
            return lambda: sessions[i].run(None, feeds[i])

        runners = [runner(i) for i in range(len(names))]
        time_interleaved(runners, runs=1, warmup_runs=1 if self._warm else 7)  # the first: thread pools, caches
        self._warm = True
        start = time.perf_counter()
        time_interleaved(runners, runs=2)
        round_s = max(1e-6, (time.perf_counter() - start) / 2)
        runs = max(MIN_RUNS, min(MAX_RUNS, math.ceil(self.seconds / round_s)))
        timed = time_interleaved(runners, runs=runs).samples_ms
        samples = [np.maximum(1e-4, np.asarray(s) - floor) for s in timed]
        return {n: float(np.percentile(s, QUANTILE)) for n, s in zip(names, samples, strict=True)}
