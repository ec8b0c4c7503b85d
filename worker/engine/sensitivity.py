"""Per-tensor and per-node quantization sensitivity, by activation matching in bounded memory.

The idea of ONNX Runtime's `qdq_loss_debug` (run the float and the quantized model on the same
inputs and compare their intermediate tensors), but streamed: one batch at a time, reduced to a few
running sums per tensor and channel, so memory is that of one batch whatever the data size.

Static QDQ: every QuantizeLinear -> DequantizeLinear pair in the quantized model is one quantized
tensor. Its *local* error is the damage quantizing it alone does: the float model's tensor against
that tensor rounded with the pair's scale and zero point; its *accumulated* error compares the float
model's tensor with the quantized model's (all damage upstream included). Errors are noise-to-signal ratios
averaged over channels, not over the whole tensor: an outlier channel dominates a tensor's energy,
so a whole-tensor ratio hides the small channels that per-tensor quantization crushes, which is
exactly where the damage sits in transformer FFNs and elementwise ops. Leaving a tensor in float
means excluding the nodes that quantize it (its producer and its consumers): that set is its group.

Dynamic: ONNX Runtime quantizes each MatMul/Gemm input per tensor at run time (uint8, range of the
tensor including 0). That rounding is simulated in numpy on the float model's activations, and the
weights' rounding on the initializers; a node's score is the worst of its inputs plus its weights.

Channel ratios still miss damage that shows only downstream (an attention-mask Add whose -10000
entries set the range crushes the real scores, yet those entries dominate every channel's energy)
and overrate channels nothing downstream reads. So the most suspicious static tensors (by local and
by accumulated error) are then confirmed by ablation, each scored on a few samples two ways: with
only its Q/DQ pair bypassed (the output fidelity won back is its `gain`), and with only its pair
kept, every other activation in float (the fidelity lost is its `loss`). A chain of tensors that
share one outlier-ruled range (a conv's output, its activation, the transpose after it) shows no
gain one at a time, since the others still crush the same channels, but each shows its loss.
Tensors are ranked by the larger of the two, then by local error; op types by the summed score of
the tensors their nodes produce, since damage often sits in the activations of one kind of
elementwise op.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from core.errors import RuleError
from worker.engine import streaming
from worker.engine.data import Batch
from worker.engine.metrics import sqnr_from_energies
from worker.engine.session import session_options

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
DYNAMIC_OPS = ("MatMul", "Gemm")
# A channel whose error is this share of its signal or more counts as wholly lost.
NSR_CAP = 1.0
# Top entries kept in sensitivity.json (the ranking used by the search is complete).
REPORT_TOP = 50


def channel_axis(ndim: int) -> int | None:
    """NCHW-like tensors (rank 4+) keep channels on axis 1; others on the last axis."""
    if ndim <= 1:
        return None
    return 1 if ndim >= 4 else ndim - 1


class ChannelError:
    """Per-channel sums of signal and error energy over every batch."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.error: np.ndarray | None = None
        self.flat = False  # channel count changed between batches: one channel overall

    def add(self, ref: np.ndarray, got: np.ndarray, axis: int | None = -2) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape or not ref.size:
            return
        if axis == -2:
            axis = channel_axis(ref.ndim)
        err = ref - got
        finite = np.isfinite(ref) & np.isfinite(err)
        if not finite.all():
            ref = np.where(finite, ref, 0.0)
            err = np.where(finite, err, 0.0)
        if axis is None or self.flat:
            sig_c, err_c = np.array([np.sum(ref * ref)]), np.array([np.sum(err * err)])
        else:
            other = tuple(i for i in range(ref.ndim) if i != axis)
            sig_c = np.sum(ref * ref, axis=other)
            err_c = np.sum(err * err, axis=other)
        if self.signal is not None and self.signal.shape != sig_c.shape:
            self.flat = True
            sig_c, err_c = np.array([sig_c.sum()]), np.array([err_c.sum()])
            self.signal, self.error = np.array([self.signal.sum()]), np.array([self.error.sum()])  # type: ignore[union-attr]
        if self.signal is None:
            self.signal, self.error = sig_c, err_c
        else:
            self.signal = self.signal + sig_c
            self.error = self.error + err_c

    @property
    def nsr(self) -> float | None:
        """Mean over channels of error / signal energy, each channel capped at NSR_CAP."""
        if self.signal is None or self.error is None:
            return None
        floor = 1e-30 + 1e-6 * float(np.mean(self.signal))
        ratios = np.minimum(NSR_CAP, self.error / np.maximum(self.signal, floor))
        ratios = np.where((self.error == 0), 0.0, ratios)
        return float(np.mean(ratios))

    @property
    def sqnr_db(self) -> float | None:
        """The whole tensor's SQNR, for the record."""
        if self.signal is None or self.error is None:
            return None
        return sqnr_from_energies(float(self.signal.sum()), float(self.error.sum()))


def nsr_db(nsr: float | None) -> float | None:
    """A noise-to-signal ratio as a per-channel SQNR in dB (higher is better)."""
    return None if nsr is None else sqnr_from_energies(1.0, nsr)


@dataclass
class TensorSensitivity:
    tensor: str
    kind: str  # "activation" | "weight"
    producer: str | None
    producer_op: str | None
    consumers: list[str]
    group: list[str]  # node names to exclude so that this tensor stays float
    local_nsr: float | None
    accumulated_nsr: float | None = None
    sqnr_db: float | None = None
    gain: float | None = None  # output fidelity won back by leaving only this tensor in float
    loss: float | None = None  # output fidelity lost by quantizing only this tensor's activations

    @property
    def score(self) -> float:
        return self.local_nsr or 0.0

    def rank_key(self) -> tuple[float, float]:
        return (max(0.0, self.gain or 0.0, self.loss or 0.0), self.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "producer": self.producer,
            "producer_op": self.producer_op,
            "consumers": self.consumers,
            "group": self.group,
            "score": self.score,
            "channel_sqnr_db": nsr_db(self.local_nsr),
            "accumulated_channel_sqnr_db": nsr_db(self.accumulated_nsr),
            "tensor_sqnr_db": self.sqnr_db,
            "gain_when_float": self.gain,
            "loss_when_alone": self.loss,
        }


@dataclass
class NodeSensitivity:
    node: str
    op_type: str
    score: float
    group: list[str]
    tensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "score": self.score,
            "channel_sqnr_db": nsr_db(self.score),
            "group": self.group,
            "tensors": self.tensors,
        }


@dataclass
class SensitivityRanking:
    """A ranking of what quantization damages most, for one quantized candidate."""

    candidate: str
    method: str  # "activation_matching" (static QDQ) | "dynamic_simulation"
    samples: int
    tensors: list[TensorSensitivity]
    nodes: list[NodeSensitivity]
    op_types: list[dict[str, Any]]
    seconds: float = 0.0

    def groups(self) -> list[list[str]]:
        """Fallback groups, most damaging first (each: node names to leave in float together)."""
        return [group for group, _, _ in self.scored_groups()]

    def scored_groups(self) -> list[tuple[list[str], float, bool]]:
        """`groups()` with each group's damage and whether ablation confirmed it: confirmed, the damage is the
        output fidelity at stake (its gain or loss); otherwise the tensor's (node's) local error."""
        if self.method == "dynamic_simulation":
            return [(n.group, n.score, False) for n in self.nodes if n.score > 0]
        scored = []
        for t in self.tensors:
            confirmed, local = t.rank_key()
            if (t.score > 0 or confirmed > 0) and t.group:
                scored.append((t.group, confirmed if confirmed > 0 else local, confirmed > 0))
        return scored

    def activation_tensors(self) -> list[str]:
        return [t.tensor for t in self.tensors if t.kind == "activation" and t.score > 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "method": self.method,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "nodes": [n.to_dict() for n in self.nodes[:REPORT_TOP]],
            "tensors": [t.to_dict() for t in self.tensors[:REPORT_TOP]],
            "op_types": self.op_types,
            "score": "mean over channels of quantization error energy / signal energy (0 = none, 1 = lost)",
        }


# --------------------------------------------------------------------------------------------
# Running models with extra outputs


def _augmented(model_path: Path, names: Sequence[str], suffix: str) -> Path:
    """A copy of the model (beside it, so external data still resolves) that also outputs `names`."""
    model = onnx.load(str(model_path), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
            existing.add(name)
    path = model_path.parent / f"{model_path.stem}.{suffix}.onnx"
    onnx.save(model, str(path))
    return path


def _session(path: Path, threads: int | None) -> Any:
    so = session_options(threads or 1)
    # Every intermediate tensor must survive as named: no fusions that would remove them.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"Measuring sensitivity failed: ONNX Runtime could not load {path.name}: {str(exc).strip()[:300]}",
            {"step": "sensitivity"},
        ) from exc


def _run(session: Any, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not names:  # ONNX Runtime reads an empty list as "every output"
        return {}
    try:
        return dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"Measuring sensitivity failed while running the model: {str(exc).strip()[:300]}",
            {"step": "sensitivity"},
        ) from exc


def _nodes_by_tensor(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            if inp:
                consumers[inp].append(node)
    return producer, consumers


def _op_type_table(tensors: Iterable[TensorSensitivity]) -> list[dict[str, Any]]:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for t in tensors:
        if t.kind != "activation" or not t.producer_op:
            continue
        sums[t.producer_op] += t.score
        counts[t.producer_op] += 1
    rows = [{"op_type": op, "score": sums[op], "tensors": counts[op]} for op in sums]
    return sorted(rows, key=lambda r: -float(r["score"]))


# --------------------------------------------------------------------------------------------
# Static QDQ: activation matching


@dataclass
class _Pair:
    pre: str  # the tensor fed to QuantizeLinear (or the float weight's name)
    dq: str  # DequantizeLinear's output
    original: str  # the float model's name for it
    kind: str
    axis: int | None
    quant: tuple[str, str] | None = None  # an activation's (scale, zero point) initializers


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """What a per-tensor QuantizeLinear -> DequantizeLinear pair gives back for `x` (the integer
    range from the zero point's type; half-way values round to even, as ONNX specifies)."""
    info = np.iinfo(zero_point.dtype)
    scale_f, zero = float(np.asarray(scale).reshape(-1)[0]), float(np.asarray(zero_point).reshape(-1)[0])
    if scale_f == 0:
        return np.asarray(x, dtype=np.float32).copy()
    q = np.clip(np.round(np.asarray(x, dtype=np.float32) / scale_f) + zero, info.min, info.max)
    return ((q - zero) * scale_f).astype(np.float32)


def _qdq_pairs(model: onnx.ModelProto) -> list[_Pair]:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer, _ = _nodes_by_tensor(graph)
    pairs: list[_Pair] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            pre = q.input[0]
            if pre in inits:
                continue
            original = pre.removesuffix("_QuantizeLinear_Input")
            quant = (q.input[1], q.input[2]) if len(q.input) > 2 and q.input[2] in inits else None
            pairs.append(_Pair(pre, node.output[0], original, "activation", None, quant))
        elif src in inits:
            original = src.removesuffix("_quantized")
            if original != src:
                pairs.append(_Pair(src, node.output[0], original, "weight", axis))
    return pairs


def _group(model: onnx.ModelProto, pair: _Pair) -> tuple[str | None, str | None, list[str], list[str]]:
    producer, consumers = _nodes_by_tensor(model.graph)
    prod = producer.get(pair.pre) if pair.kind == "activation" else None
    prod_name = prod.name if prod is not None and prod.op_type not in QDQ_OPS else None
    users = [n.name for n in consumers.get(pair.dq, []) if n.op_type not in QDQ_OPS and n.name]
    group = sorted({*users, *([prod_name] if prod_name else [])})
    return prod_name, (prod.op_type if prod is not None and prod_name else None), users, group


def static_sensitivity(
    float_model: Path,
    quantized_model: Path,
    batches: Iterable[Batch],
    *,
    candidate: str,
    threads: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] | None = None,
) -> SensitivityRanking:
    """Rank the quantized tensors of a static QDQ model (see the module docstring)."""
    clock = clock or time.perf_counter
    started = clock()
    qmodel = onnx.load(str(quantized_model), load_external_data=False)
    pairs = _qdq_pairs(qmodel)
    fmodel = onnx.load(str(float_model), load_external_data=False)
    float_tensors = {o for n in fmodel.graph.node for o in n.output} | {i.name for i in fmodel.graph.input}
    float_weights = {i.name for i in fmodel.graph.initializer}
    del fmodel
    act = [p for p in pairs if p.kind == "activation"]
    weights = [p for p in pairs if p.kind == "weight" and p.original in float_weights]
    # Local error is that of quantizing the float model's tensor alone (its scale and zero point
    # applied to the float value), not the pair's own input in the quantized model: there, a tensor
    # whose producer was quantized with the same outlier-ruled range already sits on its grid and
    # would show no error of its own, so a chain of such tensors would hide every member.
    params = _quant_params(qmodel, act)
    alone = {p.dq for p in act if p.dq in params and p.original in float_tensors}
    q_names = sorted({p.pre for p in act if p.dq not in alone} | {p.dq for p in act} | {p.dq for p in weights})
    f_names = sorted({p.original for p in act if p.original in float_tensors})
    q_path = _augmented(quantized_model, q_names, "sensitivity")
    f_path = _augmented(float_model, f_names, "sensitivity")
    q_session, f_session = _session(q_path, threads), _session(f_path, threads)
    local = {p.dq: ChannelError() for p in act}
    accumulated = {p.dq: ChannelError() for p in act}
    weight_err = {p.dq: ChannelError() for p in weights}
    samples = 0
    try:
        for batch in batches:
            q_out = _run(q_session, q_names, batch.feeds)
            f_out = _run(f_session, f_names, batch.feeds) if f_names else {}
            for p in act:
                if p.dq in alone:
                    ref = f_out[p.original]
                    local[p.dq].add(ref, fake_quantize(ref, *params[p.dq]))
                else:
                    local[p.dq].add(q_out[p.pre], q_out[p.dq])
                if p.original in f_out:
                    accumulated[p.dq].add(f_out[p.original], q_out[p.dq])
            if samples == 0 and weights:
                float_init = _initializers(float_model, [p.original for p in weights])
                for p in weights:
                    w = float_init.get(p.original)
                    if w is not None:
                        weight_err[p.dq].add(w, q_out[p.dq], axis=p.axis if p.axis is not None else 0)
            samples += batch.num_samples
            del q_out, f_out
            if deadline is not None and clock() > deadline and samples:
                break
    finally:
        del q_session, f_session
        for path in (q_path, f_path):
            path.unlink(missing_ok=True)
    tensors: list[TensorSensitivity] = []
    for p in [*act, *weights]:
        prod, prod_op, users, group = _group(qmodel, p)
        errs = local[p.dq] if p.kind == "activation" else weight_err[p.dq]
        tensors.append(
            TensorSensitivity(
                tensor=p.original,
                kind=p.kind,
                producer=prod,
                producer_op=prod_op,
                consumers=users,
                group=group,
                local_nsr=errs.nsr,
                accumulated_nsr=accumulated[p.dq].nsr if p.kind == "activation" else None,
                sqnr_db=errs.sqnr_db,
            )
        )
    tensors.sort(key=lambda t: -t.score)
    node_scores: dict[str, NodeSensitivity] = {}
    op_of = {n.name: n.op_type for n in qmodel.graph.node}
    for t in tensors:
        for name in t.consumers:
            entry = node_scores.setdefault(name, NodeSensitivity(name, op_of.get(name, ""), 0.0, [name]))
            entry.score = max(entry.score, t.score)
            entry.tensors.append(t.tensor)
    nodes = sorted(node_scores.values(), key=lambda n: -n.score)
    return SensitivityRanking(
        candidate=candidate,
        method="activation_matching",
        samples=samples,
        tensors=tensors,
        nodes=nodes,
        op_types=_op_type_table(tensors),
        seconds=clock() - started,
    )


def _quant_params(model: onnx.ModelProto, pairs: Sequence[_Pair]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point) of each per-tensor activation pair, by its DequantizeLinear output."""
    inits = {i.name: i for i in model.graph.initializer}
    params = {}
    for p in pairs:
        if p.quant is None or p.quant[0] not in inits or p.quant[1] not in inits:
            continue
        scale, zero = numpy_helper.to_array(inits[p.quant[0]]), numpy_helper.to_array(inits[p.quant[1]])
        if scale.size == 1 and zero.size == 1 and zero.dtype.kind in "iu":
            params[p.dq] = (scale, zero)
    return params


def _initializers(model_path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The float values of `names`, external ones mapped from their files (a big model is never loaded whole)."""
    model = onnx.load(str(model_path), load_external_data=False)
    wanted = set(names)
    folder = Path(model_path).parent
    return {i.name: streaming.read_array(i, folder) for i in model.graph.initializer if i.name in wanted}


# --------------------------------------------------------------------------------------------
# Dynamic: simulated run-time quantization


def dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """What ONNX Runtime's DynamicQuantizeLinear + dequantization give back for `x`."""
    x = np.asarray(x, dtype=np.float32)
    lo = min(0.0, float(np.min(x))) if x.size else 0.0
    hi = max(0.0, float(np.max(x))) if x.size else 0.0
    scale = (hi - lo) / 255.0
    if scale == 0:
        return x.copy()
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return ((q - zero) * scale).astype(np.float32)


def symmetric_int8(w: np.ndarray, axis: int | None, *, reduce_range: bool = False) -> np.ndarray:
    """Symmetric int8 weight rounding, per tensor or per channel along `axis`."""
    w = np.asarray(w, dtype=np.float32)
    qmax = 63.0 if reduce_range else 127.0
    if axis is None:
        amax = np.max(np.abs(w)) if w.size else 0.0
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32)


def dynamic_sensitivity(
    float_model: Path,
    batches: Iterable[Batch],
    *,
    candidate: str,
    op_types: Sequence[str] = DYNAMIC_OPS,
    per_channel: bool = False,
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    threads: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] | None = None,
) -> SensitivityRanking:
    """Rank the nodes dynamic quantization would rewrite by the rounding of their inputs and weights."""
    clock = clock or time.perf_counter
    started = clock()
    model = onnx.load(str(float_model), load_external_data=False)  # weights mapped one at a time below
    folder = Path(float_model).parent
    inits = {i.name: i for i in model.graph.initializer}
    excluded = set(nodes_to_exclude)
    targets = [n for n in model.graph.node if n.op_type in op_types and n.name and n.name not in excluded]
    act_inputs: dict[str, list[str]] = {}
    weight_err: dict[str, ChannelError] = {}
    for node in targets:
        ins = [i for i in node.input[:2] if i]
        act_inputs[node.name] = [i for i in ins if i not in inits]
        for w_name in (i for i in ins if i in inits):
            w = np.asarray(streaming.read_array(inits[w_name], folder), dtype=np.float32)
            if w.ndim != 2:
                continue
            # MatMul weights [K, N] keep output channels on axis 1; Gemm's depend on transB.
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = (0 if trans_b else 1) if node.op_type == "Gemm" else 1
            err = ChannelError()
            err.add(w, symmetric_int8(w, axis if per_channel else None, reduce_range=reduce_range), axis=axis)
            weight_err[node.name] = err
    del model, inits
    names = sorted({t for ts in act_inputs.values() for t in ts})
    path = _augmented(float_model, names, "sensitivity")
    session = _session(path, threads)
    errors = {(node, t): ChannelError() for node, ts in act_inputs.items() for t in ts}
    samples = 0
    try:
        for batch in batches:
            values = {**batch.feeds, **_run(session, [n for n in names if n not in batch.feeds], batch.feeds)}
            for (_node, t), err in errors.items():
                x = values.get(t)
                if x is not None and np.asarray(x).dtype.kind == "f":
                    err.add(x, dynamic_uint8(x))
            samples += batch.num_samples
            del values
            if deadline is not None and clock() > deadline and samples:
                break
    finally:
        del session
        path.unlink(missing_ok=True)
    op_of = {n.name: n.op_type for n in targets}
    nodes = []
    tensors = []
    for node, ts in act_inputs.items():
        input_scores = [errors[(node, t)].nsr or 0.0 for t in ts]
        w_err = weight_err.get(node)
        score = max(input_scores, default=0.0) + ((w_err.nsr or 0.0) if w_err is not None else 0.0)
        nodes.append(NodeSensitivity(node, op_of[node], score, [node], list(ts)))
        for t, s in zip(ts, input_scores, strict=True):
            tensors.append(TensorSensitivity(t, "activation", None, None, [node], [node], s))
    nodes.sort(key=lambda n: -n.score)
    tensors.sort(key=lambda t: -t.score)
    op_rows: dict[str, dict[str, Any]] = {}
    for n in nodes:
        row = op_rows.setdefault(n.op_type, {"op_type": n.op_type, "score": 0.0, "tensors": 0})
        row["score"] += n.score
        row["tensors"] += 1
    return SensitivityRanking(
        candidate=candidate,
        method="dynamic_simulation",
        samples=samples,
        tensors=tensors,
        nodes=nodes,
        op_types=sorted(op_rows.values(), key=lambda r: -float(r["score"])),
        seconds=clock() - started,
    )


# --------------------------------------------------------------------------------------------
# Ablation: leave one quantized tensor in float and see what the outputs win back


@dataclass
class _Clamp:
    """A Relu/Clip of the float model, with the values its min/max inputs read (opset 11+ Clip)."""

    node: onnx.NodeProto
    values: list[TensorProto]


def _folded_activations(float_model: Path, quantized: onnx.ModelProto) -> dict[str, _Clamp]:
    """Relu/Clip nodes of the float model that the quantizer folded into a Q/DQ pair's range (the
    clamp of the quantized type did their work), by output name."""
    present = {n.name for n in quantized.graph.node}
    model = onnx.load(str(float_model), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    constants = {
        n.output[0]: numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0])
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    clamps = {}
    for n in model.graph.node:
        if n.op_type in ("Relu", "Clip") and n.name and n.name not in present:
            values = [inits.get(i) or constants.get(i) for i in n.input[1:] if i]
            clamps[n.output[0]] = _Clamp(n, [v for v in values if v is not None])
    return clamps


def bypass_qdq(
    quantized_model: Path, tensors: Sequence[str], out_path: Path, folded: dict[str, _Clamp] | None = None
) -> Path:
    """The quantized model with the Q/DQ pairs of `tensors` (float names) bypassed: their consumers
    read the unquantized value (through the Relu/Clip the quantizer had folded into the pair, if
    any, from `folded`, with the min/max values it reads). Saved beside the model so external data
    still resolves."""
    model = onnx.load(str(quantized_model), load_external_data=False)
    wanted = set(tensors)
    rewire: dict[str, str] = {}
    available = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    for p in _qdq_pairs(model):
        if p.kind != "activation" or p.original not in wanted:
            continue
        rewire[p.dq] = p.pre
        clamp = (folded or {}).get(p.original)
        if clamp is not None:
            restored = onnx.NodeProto()
            restored.CopyFrom(clamp.node)
            restored.name = f"{clamp.node.name}_restored"
            restored.input[0] = p.pre
            restored.output[0] = f"{p.pre}_restored"
            for value in clamp.values:  # the quantizer dropped them with the node
                if value.name not in available:
                    model.graph.initializer.append(value)
                    available.add(value.name)
            model.graph.node.append(restored)
            rewire[p.dq] = restored.output[0]
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    for out in model.graph.output:
        if out.name in rewire:  # a graph output keeps its name: an Identity of the float value makes it
            for node in model.graph.node:
                if node.op_type == "DequantizeLinear" and node.output[0] == out.name:
                    node.output[0] = f"{out.name}_bypassed"
            model.graph.node.append(
                helper.make_node("Identity", [rewire[out.name]], [out.name], name=f"{out.name}_bypass")
            )
    onnx.save(model, str(out_path))
    return out_path


def confirm_by_ablation(
    sensitivity: SensitivityRanking,
    float_model: Path,
    quantized_model: Path,
    score: Callable[[Path], float],
    *,
    top: int = 12,
    deadline: float | None = None,
    clock: Callable[[], float] | None = None,
) -> int:
    """Fill `gain` and `loss` for the most suspicious activation tensors (the top `top` by local
    error and by accumulated error) and re-rank. `score(path)` is the fidelity of a model on a few
    samples (higher is better). Returns how many tensors were ablated."""
    clock = clock or time.perf_counter
    acts = [t for t in sensitivity.tensors if t.kind == "activation" and t.group]
    by_local = sorted(acts, key=lambda t: -t.score)[:top]
    by_acc = sorted(acts, key=lambda t: -(t.accumulated_nsr or 0.0))[: top // 2]
    suspects: list[TensorSensitivity] = []
    for t in [*by_local, *by_acc]:
        if t not in suspects:
            suspects.append(t)
    base = score(quantized_model)
    folded = _folded_activations(float_model, onnx.load(str(quantized_model), load_external_data=False))
    done = 0
    path = quantized_model.parent / f"{quantized_model.stem}.ablation.onnx"
    everything = [t.tensor for t in acts]
    try:
        weights_only = score(bypass_qdq(quantized_model, everything, path, folded))
        for t in suspects:
            if deadline is not None and clock() > deadline:
                break
            t.gain = score(bypass_qdq(quantized_model, [t.tensor], path, folded)) - base
            others = [name for name in everything if name != t.tensor]
            t.loss = weights_only - score(bypass_qdq(quantized_model, others, path, folded))
            done += 1
    finally:
        path.unlink(missing_ok=True)
    sensitivity.tensors.sort(key=lambda t: t.rank_key(), reverse=True)
    return done
