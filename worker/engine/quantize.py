"""quantize(): a float ONNX model and a recipe in, a checked quantized model out.

Modes: static (QDQ / QOperator, MinMax / Entropy / Percentile / Distribution, chunked calibration
with bounded memory), dynamic, weight_only (blocked int4/uint4 or 8-bit MatMulNBits, int4
GatherBlockQuantized) and fp16. Every file goes under `workdir`; the result is
`workdir/out/quantized.onnx` (with `quantized.onnx.data` beside it when the model keeps external
data). Before returning, the result passes onnx.checker, loads in ONNX Runtime and runs on one
sample.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.lifecycle import Stage
from core.model import TensorSpec, iter_graphs
from core.model import model_facts as facts_of
from core.recipe import CalibrationMethod, Mode, QType, QuantFormat, Recipe
from core.result import (
    CalibrationFacts,
    FloatNode,
    Fp16Facts,
    ModelCheck,
    Opsets,
    OriginalFacts,
    QuantizationFacts,
    QuantizedNode,
    WeightOnlyFacts,
)
from worker.engine import fp16, streaming
from worker.engine.calibration import CalibrationResult, calibrate, default_op_types, seed_histograms
from worker.engine.checks import (
    FOUR_BIT,
    SIXTEEN_BIT,
    ModelFacts,
    check_recipe_for_model,
    model_facts,
)
from worker.engine.data import Batch, count_batches, iter_batches, synthesize_batch
from worker.engine.graph_order import outer_read_producers, sort_model_file
from worker.engine.preprocess import Prepared, fuse_transformer, prepare_model, save_model
from worker.engine.quiet import quiet_ort
from worker.engine.refine import refine
from worker.engine.results import QuantizationOutcome
from worker.engine.spec import ProgressCallback, no_progress
from worker.engine.subgraphs import BODY_OPS, BodyRanges, body_nodes, calibrate_bodies, quantize_bodies

OUTPUT_NAME = "quantized.onnx"

# Op types whose outputs are quantized-domain (what a user looks for in the result).
QUANTIZED_OP_TYPES = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearWhere",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM",
    "QAttention",
    "MatMulNBits",
    "GatherBlockQuantized",
    "QEmbedLayerNormalization",
)

_QTYPE_NAMES = {
    QType.UINT8: "QUInt8",
    QType.INT8: "QInt8",
    QType.UINT16: "QUInt16",
    QType.INT16: "QInt16",
    QType.INT4: "QInt4",
    QType.UINT4: "QUInt4",
}


def _ort_qtype(qtype: str) -> Any:
    from onnxruntime.quantization.quant_utils import QuantType

    return getattr(QuantType, _QTYPE_NAMES[QType(qtype)])


@dataclass
class Reuse:
    """What mode auto computes once and hands to every candidate and search step built on the same
    pre-processing: the prepared model and, for static recipes, its calibration ranges."""

    prepared: Prepared
    calibration: CalibrationResult | None = None
    # What `refine` measured, by the recipe fields it depends on: per-tensor ranges and bias shifts, shared by
    # the QDQ and QOperator twins and by every search step of one candidate.
    refined: dict[Any, Any] | None = None


def _fail(step: str, what: str, exc: BaseException) -> RuleError:
    text = str(exc).strip() or type(exc).__name__
    return RuleError(
        "quantization_failed",
        f"{what} failed: {text.splitlines()[0][:400]}",
        {"step": step, "error": text[:2000]},
    )


class _Timer:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t, 6)


# --------------------------------------------------------------------------------------------
# Public entry point


def quantize(
    model_path: Path,
    spec: Recipe,
    workdir: Path,
    *,
    calibration: DatasetSource | None = None,
    progress: ProgressCallback = no_progress,
    keep_intermediates: bool = False,
    reuse: Reuse | None = None,
    streaming_bytes: int | None = None,
) -> QuantizationOutcome:
    """Quantize `model_path` following `spec`. Raises RuleError (`invalid_recipe`,
    `invalid_dataset`, `dataset_model_mismatch`, `quantization_failed`, `invalid_model`).

    Intermediate files (`workdir/prep`, `workdir/calib`) are deleted on success unless
    `keep_intermediates`; `workdir/out` holds the result. `reuse` skips pre-processing (and
    calibration when it holds ranges): it must come from `prepare_for(spec, ...)` of an equal
    pre-processing, which mode auto guarantees. External-data models of `streaming_bytes` or more (default
    `streaming.STREAMING_BYTES`) are quantized without ever loading all their weights (worker/engine/streaming.py)."""
    model_path = Path(model_path)
    workdir = Path(workdir)
    if spec.mode in (Mode.AUTO, Mode.COMPARE):
        raise RuleError(
            "invalid_recipe",
            f"Mode {spec.mode} is not a quantization recipe and is not supported by quantize(); "
            "pass a concrete mode (static, dynamic, weight_only or fp16).",
            {"field": "mode"},
        )
    timings: dict[str, float] = {}
    timer = _Timer(timings)
    t_total = time.perf_counter()
    warnings: list[str] = []
    facts_out = QuantizationFacts(mode=str(spec.mode), calibration_samples=0)

    with timer("validating"):
        facts = model_facts(model_path)
        warnings += check_recipe_for_model(spec, facts, has_calibration=calibration is not None)
        inputs = list(facts.inputs)
        if calibration is not None:
            count_batches(calibration, inputs, batch_size=spec.calibration_batch_size)  # mismatch errors now
    facts_out.original = OriginalFacts(
        opset=facts.opset, op_counts=dict(facts.op_counts), external_data=bool(facts.external_files)
    )
    if facts.qdq_nodes:
        facts_out.qat_qdq_nodes = facts.qdq_nodes

    for sub in ("prep", "calib", "refine", "out"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / OUTPUT_NAME

    # Pre-processing
    progress(Stage.PREPROCESSING, 0.0)
    with timer("preprocessing"):
        prepared = (
            reuse.prepared
            if reuse is not None
            else prepare_for(model_path, spec, facts, workdir / "prep", progress, streaming_bytes=streaming_bytes)
        )
    warnings += [w for w in prepared.warnings if w not in warnings]
    if spec.nodes_to_exclude:
        _warn_missing_excluded(prepared.path, spec.nodes_to_exclude, warnings)
    progress(Stage.PREPROCESSING, 1.0)

    mode = Mode(spec.mode)
    if mode == Mode.STATIC:
        assert calibration is not None
        if spec.calibration_method == CalibrationMethod.DISTRIBUTION:
            warnings.append(
                "Distribution calibration is designed for float8 types; with integer types it often keeps "
                "less accuracy than MinMax, Entropy or Percentile."
            )
        progress(Stage.CALIBRATING, 0.0)
        with timer("calibrating"):
            cal = (
                reuse.calibration
                if reuse is not None and reuse.calibration is not None
                else calibrate_prepared(prepared, spec, calibration, inputs, workdir / "calib", progress)
            )
        facts_out.calibration_samples = cal.samples
        facts_out.calibration = CalibrationFacts(
            method=str(spec.calibration_method),
            samples=cal.samples,
            feeds=cal.feeds,
            batch_size=spec.calibration_batch_size,
            collect_calls=cal.collect_calls,
            max_feeds_per_call=cal.max_chunk_feeds,
            passes=cal.passes,
        )
        progress(Stage.CALIBRATING, 1.0)
        ranges, source = cal.tensors_range, prepared
        if spec.calibration_per_tensor or spec.corrects_bias:
            with timer("refining_ranges"):
                memo = reuse.refined if reuse is not None else None
                ranges, source = refine(
                    prepared, spec, ranges, calibration, inputs, workdir / "refine", facts_out, _refining, memo
                )
        bodies = None
        if facts.has_subgraphs:  # ranges inside If/Loop/Scan bodies (ONNX Runtime's calibrators see only the top)
            with timer("calibrating_bodies"):
                bodies = _body_ranges(prepared, spec, cal, calibration, inputs, warnings)
        progress(Stage.QUANTIZING, 0.0)
        with timer("quantizing"):
            if spec.dynamic_op_types:
                _hybrid(source, spec, ranges, out_path, warnings, bodies)
            else:
                _static(source, spec, ranges, out_path, warnings, bodies)
    else:
        progress(Stage.QUANTIZING, 0.0)
        with timer("quantizing"):
            if mode == Mode.DYNAMIC:
                _dynamic(prepared, spec, out_path, warnings)
            elif mode == Mode.WEIGHT_ONLY:
                facts_out.weight_only = _weight_only(prepared, spec, out_path, warnings)
            elif mode == Mode.FP16:
                facts_out.fp16 = _fp16(prepared, spec, out_path, warnings, calibration, inputs)
            else:  # pragma: no cover - enum exhausted
                raise RuleError("invalid_recipe", f"Unknown mode {mode}.", {"field": "mode"})
    progress(Stage.QUANTIZING, 0.7)

    with timer("verifying"):
        sample, synthesized = _first_sample(calibration, inputs, spec)
        facts_out.check = verify_model(out_path, model_path, sample, warnings, synthesized=synthesized)
    progress(Stage.QUANTIZING, 1.0)

    out_model = onnx.load(str(out_path), load_external_data=False)
    out_facts = facts_of(out_model)
    counts = dict(out_facts.op_counts)
    files = _output_files(out_path, out_facts)
    del out_model
    facts_out.op_counts = counts
    facts_out.quantized_op_counts = {k: v for k, v in counts.items() if k in QUANTIZED_OP_TYPES}
    facts_out.opset = Opsets(original=facts.opset, quantized=out_facts.opset)
    facts_out.external_data = len(files) > 1
    if mode != Mode.FP16 and not facts_out.quantized_op_counts:
        warnings.append("Nothing was quantized: no node of this model matched the recipe's operator types.")
    elif mode != Mode.FP16 and facts.qdq_nodes and sum(facts_out.quantized_op_counts.values()) <= facts.qdq_nodes:
        warnings.append("No new node was quantized: the model's quantized parts were already all there was.")
    if mode in (Mode.STATIC, Mode.DYNAMIC) and facts.has_subgraphs:
        facts_out.quantized_in_subgraphs = quantized_nodes_in_subgraphs(out_path)
        left = float_nodes_in_subgraphs(out_path, spec)
        if left:
            facts_out.float_in_subgraphs = left
            named = ", ".join(f"{n.name} ({n.op_type} in {n.subgraph})" for n in left[:10])
            more = f" and {len(left) - 10} more" if len(left) > 10 else ""
            why = (
                ""
                if mode == Mode.STATIC
                else " (ONNX Runtime's quantizer does not reach into subgraphs for this recipe)"
            )
            warnings.append(
                f"{len(left)} Conv/MatMul/Gemm node(s) inside If/Loop/Scan subgraphs stay in float{why}: {named}{more}."
            )
    if not keep_intermediates:
        for sub in ("prep", "calib", "refine"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    timings["total"] = round(time.perf_counter() - t_total, 6)
    return QuantizationOutcome(
        model_path=out_path,
        files=files,
        preprocessing_steps=prepared.steps,
        warnings=warnings,
        timings_s=timings,
        facts=facts_out,
    )


# --------------------------------------------------------------------------------------------
# Pre-processing per mode


def required_opset(spec: Recipe, facts: ModelFacts) -> int | None:
    """The smallest default-domain opset the recipe needs (None: any)."""
    mode = Mode(spec.mode)
    target = 0
    if mode in (Mode.STATIC, Mode.DYNAMIC):
        target = 11 if facts.opset < 11 else 0
        if spec.per_channel:
            target = max(target, 13)
        if spec.transformer_fusion:  # the fusions write LayerNormalization, an opset-17 op
            target = max(target, 17)
        if mode == Mode.STATIC and (spec.activation_type in SIXTEEN_BIT or spec.weight_type in SIXTEEN_BIT):
            target = max(target, 21)
    elif (
        mode == Mode.WEIGHT_ONLY
        and "Gather" in (spec.op_types_to_quantize or ())
        and facts.op_counts.get("Gather")
        and spec.weight_type in FOUR_BIT
    ):
        target = 21
    return target or None


def preparation(spec: Recipe, facts: ModelFacts) -> tuple[int | None, bool, bool, bool]:
    """How a recipe pre-processes the model: (target opset, shape inference, optimise, transformer
    fusion). Recipes with equal preparation quantize the very same prepared graph (mode auto shares
    it between them)."""
    mode = Mode(spec.mode)
    # ORT's basic optimisations fuse nodes (MatMul+Add -> Gemm, Conv+BatchNormalization), which helps
    # static quantization but would defeat an op_types_to_quantize that quantizes MatMul and not Gemm,
    # and QAT graphs. (nodes_to_exclude: see prepare_for.)
    op_types = spec.op_types_to_quantize
    # (A hybrid's dynamic pass cannot quantize a Gemm either.)
    fusion_safe = not op_types or "Gemm" in op_types or "MatMul" not in (*op_types, *(spec.dynamic_op_types or ()))
    optimize = mode == Mode.STATIC and fusion_safe and not facts.qdq_nodes
    fusion = spec.transformer_fusion and mode in (Mode.STATIC, Mode.DYNAMIC)
    return required_opset(spec, facts), mode in (Mode.STATIC, Mode.DYNAMIC), optimize, fusion


def prepare_for(
    model_path: Path,
    spec: Recipe,
    facts: ModelFacts,
    prep_dir: Path,
    progress: ProgressCallback,
    *,
    streaming_bytes: int | None = None,
) -> Prepared:
    target_opset, shape_inference, optimize, fusion = preparation(spec, facts)

    def run(optimize: bool) -> Prepared:
        try:
            return prepare_model(
                model_path,
                prep_dir,
                target_opset=target_opset,
                fold=True,
                shape_inference=shape_inference,
                optimize=optimize,
                streaming_bytes=streaming_bytes,
                progress=lambda f: progress(Stage.PREPROCESSING, f),
            )
        except RuleError:
            raise
        except Exception as exc:
            raise _fail("preprocessing", "Pre-processing the model", exc) from exc

    prepared = run(optimize)
    # A fusion may remove a node nodes_to_exclude names: then quantize the unoptimised graph, where
    # every name is still there. (Names taken from an optimised graph, as mode auto's are, survive.)
    if optimize and spec.nodes_to_exclude and set(spec.nodes_to_exclude) - _node_names(prepared.path):
        shutil.rmtree(prep_dir, ignore_errors=True)
        prepared = run(False)
        prepared.steps.append("Skipped graph fusions so that every node in nodes_to_exclude keeps its name.")
    if fusion:
        prepared = fuse_transformer(prepared, prep_dir)
    return prepared


SUBGRAPH_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


def float_nodes_in_subgraphs(path: Path, spec: Recipe) -> list[FloatNode]:
    """The Conv/MatMul/Gemm nodes inside subgraphs that the recipe asked for and that stayed float:
    name, op type and the subgraph they sit in (see graph_order.subgraph_nodes)."""
    model = onnx.load(str(path), load_external_data=False)
    wanted = set(spec.op_types_to_quantize or SUBGRAPH_COMPUTE_OPS) & set(SUBGRAPH_COMPUTE_OPS)
    excluded = set(spec.nodes_to_exclude or ())
    return [
        node
        for node, quantized in body_nodes(model)
        if not quantized and node.op_type in wanted and node.name not in excluded
    ]


def quantized_nodes_in_subgraphs(path: Path) -> list[QuantizedNode]:
    """The Conv/MatMul/Gemm nodes inside subgraphs that are quantized (QDQ: reading a DequantizeLinear;
    QOperator: the QLinearConv/QLinearMatMul/... made of one)."""
    model = onnx.load(str(path), load_external_data=False)
    return [QuantizedNode(**node.model_dump()) for node, quantized in body_nodes(model) if quantized]


def _body_ranges(
    prepared: Prepared,
    spec: Recipe,
    cal: CalibrationResult,
    source: DatasetSource | None,
    inputs: Sequence[TensorSpec],
    warnings: list[str],
) -> BodyRanges | None:
    """Ranges inside the model's If/Loop/Scan bodies for the static op types of `spec` (None: no body
    holds one of them), computed once per calibration and op types (mode auto's trials share them)."""
    op_types = tuple(op for op in default_op_types(spec) if op not in (spec.dynamic_op_types or ()))
    if source is None or not set(op_types) & set(BODY_OPS):
        return None
    if op_types not in cal.bodies:
        try:
            cal.bodies[op_types] = calibrate_bodies(prepared.path, spec, op_types, source, inputs, seed=seed_histograms)
        except RuleError:
            raise
        except Exception as exc:
            cal.bodies[op_types] = None
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            warnings.append(f"Calibrating inside If/Loop/Scan bodies failed ({text}); their nodes stay in float.")
    found: BodyRanges | None = cal.bodies[op_types]
    if found is not None:
        warnings += [w for w in found.warnings if w not in warnings]
    return found


# Activations ONNX Runtime's QDQ quantizer removes, folding them into the range of the node before.
QDQ_REMOVED_ACTIVATIONS = ("Relu", "Clip")


def _keep_outer_reads_float(model: onnx.ModelProto, qoperator: bool, warnings: list[str]) -> list[str]:
    """The static quantizers rewire only the inputs that nodes list, not the names If/Loop/Scan
    bodies read from the outer scope. QOperator renames a quantized node's output, so a body would
    read a name nothing makes; QDQ drops a Relu/Clip, so a body would read the value unclipped.
    Keep those producers in float (named, if need be); returns their names."""
    nodes = outer_read_producers(model.graph)
    if not qoperator:
        nodes = [n for n in nodes if n.op_type in QDQ_REMOVED_ACTIVATIONS]
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{node.op_type}_read_by_subgraph_{i}"
    if nodes:
        warnings.append(
            f"{len(nodes)} node(s) whose outputs If/Loop/Scan bodies read stay in float (ONNX Runtime's "
            f"static quantizer would change what the bodies read): {', '.join(n.name for n in nodes[:10])}."
        )
    return [n.name for n in nodes]


def _node_names(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}


def _warn_missing_excluded(path: Path, excluded: Sequence[str], warnings: list[str]) -> None:
    missing = sorted(set(excluded) - _node_names(path))
    if missing:
        warnings.append(
            f"Pre-processing removed or fused node(s) {', '.join(missing[:10])} listed in nodes_to_exclude; "
            "they can no longer be excluded."
        )


# --------------------------------------------------------------------------------------------
# The modes


_SIXTEEN_BIT_OF = {QType.UINT8: QType.UINT16, QType.INT8: QType.INT16}


def _sixteen_bit_tensors(spec: Recipe, model: onnx.ModelProto, warnings: list[str]) -> list[str]:
    """The recipe's sixteen_bit_tensors that the (pre-processed, shape-inferred) model has, as ONNX
    Runtime's quantizer knows tensors; the others are left out with a warning, as nodes_to_exclude
    names are (a typo is no reason to fail the job, and the rule is the same at the API's door)."""
    graph = model.graph
    known = {t.name for t in graph.initializer} | {v.name for v in (*graph.value_info, *graph.input, *graph.output)}
    wanted = list(spec.sixteen_bit_tensors or ())
    missing = [name for name in wanted if name not in known]
    if missing:
        warnings.append(
            f"sixteen_bit_tensors names tensor(s) the model does not have after pre-processing: "
            f"{', '.join(missing[:10])}; they stay 8-bit. Use tensor names as they appear in the model "
            "(the result's sensitivity ranking lists them)."
        )
    return [name for name in wanted if name in known]


def _extra_options(spec: Recipe, sixteen_bit: Sequence[str] = ()) -> dict[str, Any]:
    extra: dict[str, Any] = {"ActivationSymmetric": bool(spec.symmetric_activations)}
    if spec.symmetric_weights is not None:
        extra["WeightSymmetric"] = bool(spec.symmetric_weights)
    if sixteen_bit:
        wide = _ort_qtype(_SIXTEEN_BIT_OF.get(QType(spec.activation_type), QType(spec.activation_type)))
        extra["TensorQuantOverrides"] = {name: [{"quant_type": wide}] for name in sixteen_bit}
        # 16-bit Q/DQ of the com.microsoft domain run at any opset: no opset upgrade, so the graph
        # (and its calibration) stays the one the 8-bit recipe uses.
        extra["UseQDQContribOps"] = True
    return extra


def _static(
    prepared: Prepared,
    spec: Recipe,
    tensors_range: Any,
    out_path: Path,
    warnings: list[str],
    bodies: BodyRanges | None = None,
) -> None:
    """quantize_static, minus its calibration: the ranges come from our chunked calibration. With
    `bodies` (ranges inside If/Loop/Scan bodies), the bodies' Conv/MatMul/Gemm are quantized too, by
    the same quantizer and options (see subgraphs.py)."""
    from onnxruntime.quantization import quant_utils
    from onnxruntime.quantization.quant_utils import QuantFormat as OrtFormat
    from onnxruntime.quantization.quant_utils import update_opset_version
    from onnxruntime.quantization.quantize import check_static_quant_arguments

    activation = _ort_qtype(spec.activation_type)
    weight = _ort_qtype(spec.weight)
    fmt = OrtFormat.QOperator if spec.format == QuantFormat.QOPERATOR else OrtFormat.QDQ
    op_types = [op for op in default_op_types(spec) if op not in (spec.dynamic_op_types or ())]
    excluded = list(spec.nodes_to_exclude or [])
    try:
        with quiet_ort(warnings), _written(prepared, out_path) as target:
            # Looked up here, not imported above: for a streamed model `_written` swaps in the loader that keeps
            # the weights' references (imported before, the whole model's weights were loaded).
            model = quant_utils.load_model_with_shape_infer(Path(prepared.path).resolve())
            model = update_opset_version(model, weight)
            check_static_quant_arguments(fmt, activation, weight)
            excluded += _keep_outer_reads_float(model, fmt == OrtFormat.QOperator, warnings)
            sixteen_bit = _sixteen_bit_tensors(spec, model, warnings)
            quantizer = _static_quantizer(model, spec, tensors_range, excluded, op_types, sixteen_bit)
            quantizer.quantize_model()
            if bodies is not None:
                _static_bodies(quantizer.model.model, spec, bodies, tensors_range, op_types, warnings)
            quantizer.model.save_model_to_file(str(target), prepared.external)
        sort_model_file(out_path)
    except RuleError:
        raise
    except Exception as exc:
        raise _fail("quantize_static", "Static quantization (ONNX Runtime)", exc) from exc


def _static_quantizer(
    model: onnx.ModelProto,
    spec: Recipe,
    tensors_range: Any,
    excluded: list[str],
    op_types: list[str],
    sixteen_bit: Sequence[str],
) -> Any:
    """ONNX Runtime's QDQ or QOperator quantizer for `model`, as the recipe sets it."""
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    activation = _ort_qtype(spec.activation_type)
    weight = _ort_qtype(spec.weight)
    if spec.format == QuantFormat.QOPERATOR:
        return ONNXQuantizer(
            model,
            spec.per_channel,
            spec.reduce_range,
            QuantizationMode.QLinearOps,
            True,
            weight,
            activation,
            tensors_range,
            [],
            excluded,
            op_types,
            _extra_options(spec, sixteen_bit),
        )
    return QDQQuantizer(
        model,
        spec.per_channel,
        spec.reduce_range,
        weight,
        activation,
        tensors_range,
        [],
        excluded,
        op_types,
        _extra_options(spec, sixteen_bit),
    )


def _static_bodies(
    model: onnx.ModelProto,
    spec: Recipe,
    bodies: BodyRanges,
    tensors_range: Any,
    op_types: list[str],
    warnings: list[str],
) -> None:
    """Quantize, in place, the If/Loop/Scan bodies of the quantized `model` that hold a Conv/MatMul/Gemm:
    each as a standalone model through the quantizer of the top graph (nodes_to_exclude holds inside)."""
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer, update_opset_version

    qoperator = spec.format == QuantFormat.QOPERATOR

    def quantize_graph(standalone: onnx.ModelProto, ranges: Any, keep_float: list[str]) -> onnx.ModelProto:
        body = save_and_reload_model_with_shape_infer(standalone)
        body = update_opset_version(body, _ort_qtype(spec.weight))
        excluded = [*(spec.nodes_to_exclude or []), *keep_float, *_keep_outer_reads_float(body, qoperator, warnings)]
        g = body.graph
        known = {t.name for t in g.initializer} | {v.name for v in (*g.value_info, *g.input, *g.output)}
        sixteen_bit = [t for t in spec.sixteen_bit_tensors or () if t in known]
        quantizer = _static_quantizer(body, spec, ranges, excluded, op_types, sixteen_bit)
        quantizer.quantize_model()
        return quantizer.model.model

    done = quantize_bodies(model, bodies, tensors_range, op_types, quantize_graph)
    for why in done.skipped:
        warnings.append(f"An If/Loop/Scan body stays in float: {why}.")
    if done.unmeasured:
        warnings.append(
            f"{len(done.unmeasured)} Conv/MatMul/Gemm node(s) inside If/Loop/Scan bodies stay in float: the "
            f"calibration data never ran them (an If branch it never took?): {', '.join(done.unmeasured[:10])}."
        )


def _refining(prepared: Prepared, spec: Recipe, tensors_range: Any, out_path: Path) -> None:
    """The static quantizer `refine` measures with (its models are never the job's)."""
    _static(prepared, spec, tensors_range, out_path, [])


def quantize_with_ranges(model_path: Path, spec: Recipe, tensors_range: Any, out_path: Path) -> None:
    """Static quantization of a model that needs no pre-processing, with ranges computed elsewhere (ORT's
    TensorsData): the quantizer calls a static job makes, for mode auto's pre-flight one-node models."""
    _static(Prepared(path=Path(model_path), external=False, opset=0), spec, tensors_range, out_path, [])


def _hybrid(
    prepared: Prepared,
    spec: Recipe,
    tensors_range: Any,
    out_path: Path,
    warnings: list[str],
    bodies: BodyRanges | None = None,
) -> None:
    """Static for every op type but `dynamic_op_types`, then ONNX Runtime's dynamic quantizer for those on the
    static result (`nodes_to_exclude` holds in both passes)."""
    first = out_path.parent.parent / "hybrid-static" / OUTPUT_NAME
    shutil.rmtree(first.parent, ignore_errors=True)
    first.parent.mkdir(parents=True)
    try:
        _static(prepared, spec, tensors_range, first, warnings, bodies)
        static = Prepared(path=first, external=prepared.external, opset=prepared.opset, streamed=prepared.streamed)
        _dynamic(static, spec, out_path, warnings, op_types=spec.dynamic_op_types)
    finally:
        shutil.rmtree(first.parent, ignore_errors=True)


def _dynamic(
    prepared: Prepared, spec: Recipe, out_path: Path, warnings: list[str], *, op_types: Sequence[str] | None = None
) -> None:
    from onnxruntime.quantization import quantize_dynamic

    extra: dict[str, Any] = {}
    if spec.symmetric_weights is not None:
        extra["WeightSymmetric"] = bool(spec.symmetric_weights)
    try:
        with quiet_ort(warnings), _written(prepared, out_path) as target:
            quantize_dynamic(
                str(Path(prepared.path).resolve()),
                str(target),
                op_types_to_quantize=list(op_types or spec.op_types_to_quantize or []) or None,
                per_channel=spec.per_channel,
                reduce_range=spec.reduce_range,
                weight_type=_ort_qtype(spec.weight),
                nodes_to_exclude=list(spec.nodes_to_exclude or []),
                use_external_data_format=prepared.external,
                extra_options=extra,
            )
        sort_model_file(out_path)
    except Exception as exc:
        raise _fail("quantize_dynamic", "Dynamic quantization (ONNX Runtime)", exc) from exc


def _weight_only(prepared: Prepared, spec: Recipe, out_path: Path, warnings: list[str]) -> WeightOnlyFacts:
    from onnxruntime.quantization.quant_utils import QuantFormat as OrtFormat

    try:
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _import_nbits()
    except ImportError as exc:
        raise RuleError(
            "quantization_failed",
            f"Weight-only quantization is not available on this worker: {exc} (ONNX Runtime's "
            "matmul_nbits_quantizer needs the onnx-ir package).",
            {"step": "weight_only", "error": str(exc)},
        ) from exc

    wtype = spec.weight
    bits = 4 if wtype in FOUR_BIT else 8
    symmetric = spec.symmetric_weights if spec.symmetric_weights is not None else wtype in (QType.INT4, QType.INT8)
    op_types = tuple(spec.op_types_to_quantize or ("MatMul",))
    if bits == 8 and "Gather" in op_types:
        warnings.append("Gather is only quantized to 4 bits by ONNX Runtime; Gather nodes stay float at 8 bits.")
        op_types = tuple(op for op in op_types if op != "Gather") or ("MatMul",)
    made = WeightOnlyFacts(
        bits=bits, block_size=int(spec.block_size), symmetric=bool(symmetric), op_types=list(op_types)
    )
    try:
        with quiet_ort(warnings), _written(prepared, out_path) as target:
            model = onnx.load(str(Path(prepared.path).resolve()), load_external_data=not prepared.streamed)
            config = DefaultWeightOnlyQuantConfig(
                block_size=int(spec.block_size),
                is_symmetric=bool(symmetric),
                accuracy_level=None,
                quant_format=OrtFormat.QOperator,
                op_types_to_quantize=op_types,
                bits=bits,
            )
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=int(spec.block_size),
                is_symmetric=bool(symmetric),
                nodes_to_exclude=list(spec.nodes_to_exclude or []),
                op_types_to_quantize=op_types,
                algo_config=config,
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), prepared.external)
        sort_model_file(out_path)
    except Exception as exc:
        raise _fail("weight_only", "Weight-only quantization (ONNX Runtime MatMulNBits)", exc) from exc
    return made


def _import_nbits() -> tuple[Any, Any]:
    """Import ORT's MatMulNBits quantizer without letting its import-time logging.basicConfig
    (root logger at INFO) reconfigure the worker's logging."""
    root = logging.getLogger()
    guard = None
    if not root.handlers:
        guard = logging.NullHandler()
        root.addHandler(guard)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer


def _fp16(
    prepared: Prepared,
    spec: Recipe,
    out_path: Path,
    warnings: list[str],
    calibration: DatasetSource | None,
    inputs: Sequence[TensorSpec],
) -> Fp16Facts:

    model = onnx.load(str(prepared.path), load_external_data=False)
    try:
        with quiet_ort():
            feeds: Iterator[dict[str, np.ndarray]]
            if calibration is not None:
                limit = min(16, spec.max_calibration_samples or 16)
                feeds = (b.feeds for b in iter_batches(calibration, inputs, batch_size=1, limit=limit))
            else:
                feeds = iter([synthesize_batch(inputs).feeds])
            if prepared.streamed:  # the augmented model must sit beside the weights it refers to
                folder = Path(prepared.path).resolve().parent
                with streaming.weights_read_in(folder):
                    ranges = fp16.tensor_ranges(folder / prepared.path.name, feeds, folder, external=True)
            else:
                ranges = fp16.tensor_ranges(
                    prepared.path, feeds, prepared.path.parent / "fp16_ranges", external=prepared.external
                )
        overflow_nodes = fp16.overflowing_nodes(model, ranges)
    except Exception as exc:  # the range check is a help, not a requirement
        overflow_nodes = []
        warnings.append(f"Could not measure value ranges before the float16 conversion ({str(exc)[:200]}).")
    del model
    made = Fp16Facts(
        op_block_list=fp16.block_op_types(),
        nodes_kept_float32=overflow_nodes,
        range_check_on="calibration data" if calibration is not None else "a made-up sample",
    )
    if overflow_nodes:
        warnings.append(
            f"{len(overflow_nodes)} node(s) produce or read values beyond float16's range (65504) "
            "on the data and stay in float32."
        )
    try:
        with quiet_ort(warnings):
            if prepared.streamed:
                _fp16_streamed(prepared, out_path, overflow_nodes)
            else:
                model = onnx.load(str(prepared.path))
                converted = fp16.convert(model, node_block_list=overflow_nodes, disable_shape_infer=prepared.external)
                save_model(converted, out_path, external=prepared.external)
        sort_model_file(out_path)
    except Exception as exc:
        raise _fail("fp16", "Float16 conversion (onnxconverter-common)", exc) from exc
    return made


# --------------------------------------------------------------------------------------------
# Streamed models (worker/engine/streaming.py)


def _fp16_streamed(prepared: Prepared, out_path: Path, overflow_nodes: list[str]) -> None:
    """The float16 conversion of the graph alone: the converter declares float16 the weights it cannot
    read; those are converted (as it converts a weight) while the weights are copied into the result."""
    model = onnx.load(str(prepared.path), load_external_data=False)
    before = streaming.external_types(model)
    converted = fp16.convert(model, node_block_list=overflow_nodes, disable_shape_infer=True)
    to_half = streaming.float16_converter()
    names = streaming.retyped(before, converted)
    streaming.write(converted, out_path, source_dir=Path(prepared.path).parent, convert=dict.fromkeys(names, to_half))


def calibrate_prepared(
    prepared: Prepared,
    spec: Recipe,
    calibration: DatasetSource,
    inputs: Sequence[TensorSpec],
    workdir: Path,
    progress: ProgressCallback,
) -> CalibrationResult:
    """calibrate(); a streamed model's calibrator reads the graph alone and keeps its augmented model
    beside the weights (the session maps them)."""
    if not prepared.streamed:
        return calibrate(
            prepared.path,
            spec,
            calibration,
            inputs,
            workdir,
            external=prepared.external,
            progress=lambda f: progress(Stage.CALIBRATING, f),
        )
    folder = Path(prepared.path).resolve().parent
    with streaming.weights_read_in(folder):
        return calibrate(
            folder / prepared.path.name,
            spec,
            calibration,
            inputs,
            folder,
            external=True,
            progress=lambda f: progress(Stage.CALIBRATING, f),
        )


def _written(prepared: Prepared, out_path: Path) -> contextlib.AbstractContextManager[Path]:
    """Where a mode saves ORT's result: `out_path`, or for a streamed model a file beside the weights that is
    then gathered into `out_path` tensor by tensor (see streaming.output_beside)."""
    if prepared.streamed:
        return streaming.output_beside(prepared.path, out_path, "streamed." + OUTPUT_NAME)
    return contextlib.nullcontext(out_path)


# --------------------------------------------------------------------------------------------
# Verification


def _first_sample(calibration: DatasetSource | None, inputs: Sequence[TensorSpec], spec: Recipe) -> tuple[Batch, bool]:
    """The first feed of the dataset, or a made-up one (second item True) when there is none."""
    if calibration is not None:
        it = iter_batches(calibration, inputs, batch_size=spec.calibration_batch_size, limit=1)
        try:
            first = next(iter(it), None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if first is not None:
            return first, False
    return synthesize_batch(inputs), True


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or not a.size:
        return None
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def verify_model(
    path: Path,
    original: Path | None,
    sample: Batch,
    warnings: list[str],
    *,
    synthesized: bool = False,
) -> ModelCheck:
    """onnx.checker (by path), an ORT session, one run on `sample`; compares with the original
    model on the same sample when given. Raises quantization_failed naming the step. A made-up
    sample (`synthesized`) that the original model cannot run either only gives a warning."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise _fail("onnx_checker", "The quantized model did not pass onnx.checker", exc) from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _fail("load_in_onnxruntime", "Loading the quantized model in ONNX Runtime", exc) from exc
    try:
        outputs = session.run(None, sample.feeds)
    except Exception as exc:
        if synthesized and original is not None and not _runs(original, sample, opts):
            warnings.append(
                "The quantized model was checked and loaded but not run: without a dataset the made-up "
                "sample does not fit the model (the original model cannot run it either)."
            )
            return ModelCheck(onnx_checker=True, ort_session=True, ran_on_sample=False)
        raise _fail("run_in_onnxruntime", "Running the quantized model on one sample in ONNX Runtime", exc) from exc
    names = [o.name for o in session.get_outputs()]
    del session
    result = ModelCheck(onnx_checker=True, ort_session=True, ran_on_sample=True)
    if original is None:
        return result
    try:
        ref_session = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
        reference = ref_session.run(None, sample.feeds)
        del ref_session
    except Exception:  # the float model itself may not run on a made-up sample
        return result
    cosines: dict[str, float | None] = {}
    for name, got, ref in zip(names, outputs, reference, strict=False):
        if np.asarray(ref).dtype.kind != "f":
            continue
        got_f = np.asarray(got, dtype=np.float64)
        if not np.all(np.isfinite(got_f)) and np.all(np.isfinite(np.asarray(ref, dtype=np.float64))):
            warnings.append(f"Output '{name}' of the quantized model holds NaN or infinite values on the first sample.")
        cosines[name] = _cosine(got, ref)
    result.cosine_on_sample = cosines
    return result


def _runs(model: Path, sample: Batch, opts: Any) -> bool:
    try:
        ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]).run(None, sample.feeds)
        return True
    except Exception:
        return False


def _output_files(out_path: Path, facts: ModelFacts) -> list[Path]:
    """The quantized model and the external data files it names."""
    return [out_path, *(p for loc in facts.external_files if (p := out_path.parent / loc).is_file())]
