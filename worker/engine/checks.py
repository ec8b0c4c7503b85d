"""Recipe checks: refuse what ONNX Runtime cannot honour before any work is done.

`check_recipe(spec)` needs nothing but the recipe (the service calls it at job submission);
`check_recipe_for_model(spec, facts, has_calibration=...)` also looks at the model.
Both raise EngineError("invalid_recipe", ...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from worker.engine.errors import EngineError
from worker.engine.spec import CalibrationMethod, FidelityMetric, Mode, QType, QuantFormat, QuantizationSpec

SIXTEEN_BIT = (QType.INT16, QType.UINT16)
FOUR_BIT = (QType.INT4, QType.UINT4)
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_ONLY_OP_TYPES = ("MatMul", "Gather")


def _invalid(message: str, **detail: object) -> EngineError:
    return EngineError("invalid_recipe", message, dict(detail))


def check_recipe(spec: QuantizationSpec) -> None:
    """Model-independent checks (mode `auto` passes: it is a search run elsewhere)."""
    mode = spec.mode
    if spec.calibration_batch_size < 1:
        raise _invalid("calibration_batch_size must be at least 1.", field="calibration_batch_size")
    if spec.max_calibration_samples is not None and spec.max_calibration_samples < 1:
        raise _invalid("max_calibration_samples must be at least 1 (or null for all).", field="max_calibration_samples")
    if not 0.0 < float(spec.percentile) <= 100.0:
        raise _invalid("percentile must be in (0, 100].", field="percentile")
    if spec.weight_type in FOUR_BIT and mode not in (Mode.WEIGHT_ONLY, Mode.AUTO):
        raise _invalid(
            f"weight_type {spec.weight_type} (4-bit) is only available with mode weight_only (blocked MatMulNBits).",
            field="weight_type",
            mode=str(mode),
        )
    if mode == Mode.STATIC:
        if spec.format == QuantFormat.QOPERATOR and (
            spec.activation_type in SIXTEEN_BIT or spec.weight_type in SIXTEEN_BIT
        ):
            raise _invalid(
                "16-bit activation or weight types need format qdq: ONNX Runtime's QOperator format "
                "(QLinearConv, QLinearMatMul) has no 16-bit kernels.",
                field="format",
                activation_type=str(spec.activation_type),
                weight_type=str(spec.weight_type),
            )
        if spec.activation_type == QType.INT8 and spec.weight_type == QType.UINT8:
            raise _invalid(
                "ONNX Runtime does not support int8 activations with uint8 weights; use int8 weights "
                "(or uint8 activations).",
                field="weight_type",
                activation_type="int8",
                weight_type="uint8",
            )
    elif mode == Mode.DYNAMIC:
        if spec.weight_type not in (QType.INT8, QType.UINT8):
            raise _invalid(
                f"Dynamic quantization supports int8 or uint8 weights, not {spec.weight_type}.",
                field="weight_type",
            )
        if spec.activation_type != QType.UINT8:
            raise _invalid(
                "Dynamic quantization computes activations as uint8 at run time; activation_type "
                f"{spec.activation_type} is not available (use static quantization for it).",
                field="activation_type",
            )
    elif mode == Mode.WEIGHT_ONLY:
        if spec.weight_type not in (*FOUR_BIT, QType.INT8, QType.UINT8):
            raise _invalid(
                f"Weight-only quantization supports int4, uint4, int8 or uint8 weights, not {spec.weight_type}.",
                field="weight_type",
            )
        bs = int(spec.block_size)
        if bs < 16 or bs & (bs - 1):
            raise _invalid(f"block_size must be a power of two, at least 16 (got {bs}).", field="block_size")
        if spec.op_types_to_quantize:
            unknown = sorted(set(spec.op_types_to_quantize) - set(WEIGHT_ONLY_OP_TYPES))
            if unknown:
                raise _invalid(
                    f"Weight-only quantization handles MatMul and Gather only, not {', '.join(unknown)}.",
                    field="op_types_to_quantize",
                    unknown=unknown,
                )
    if spec.calibration_method == CalibrationMethod.PERCENTILE and mode == Mode.STATIC and spec.percentile < 50:
        raise _invalid("percentile below 50 would clip most values; give e.g. 99.99.", field="percentile")
    _check_search_fields(spec)


def _check_search_fields(spec: QuantizationSpec) -> None:
    """The v2 fields: 16-bit tensors, mode auto's budget and time, mode compare."""
    if spec.sixteen_bit_tensors and (spec.mode not in (Mode.STATIC, Mode.AUTO) or spec.format != QuantFormat.QDQ):
        raise _invalid(
            "sixteen_bit_tensors needs static quantization in format qdq (16-bit activations are Q/DQ pairs).",
            field="sixteen_bit_tensors",
            mode=str(spec.mode),
        )
    if spec.sixteen_bit_tensors and spec.activation_type in SIXTEEN_BIT:
        raise _invalid(
            "sixteen_bit_tensors widens chosen tensors of an 8-bit recipe; activation_type is already 16-bit.",
            field="sixteen_bit_tensors",
        )
    if spec.transformer_fusion and spec.mode not in (Mode.STATIC, Mode.DYNAMIC, Mode.AUTO):
        raise _invalid(
            "transformer_fusion is a pre-processing step of static and dynamic quantization.",
            field="transformer_fusion",
            mode=str(spec.mode),
        )
    if not 1.0 <= float(spec.max_search_seconds) <= 86_400:
        raise _invalid("max_search_seconds must be between 1 and 86400.", field="max_search_seconds")
    fidelity = spec.fidelity
    if fidelity is not None and fidelity.min is not None:
        low, high = (-200.0, 200.0) if fidelity.metric == FidelityMetric.SQNR else (-1.0, 1.0)
        if not low <= float(fidelity.min) <= high:
            raise _invalid(
                f"fidelity.min for metric {fidelity.metric} must be between {low:g} and {high:g} "
                "(cosine and agreement are fractions, e.g. 0.99; sqnr is in dB, e.g. 20).",
                field="fidelity.min",
            )
    if fidelity is not None and fidelity.outputs is not None and not fidelity.outputs:
        raise _invalid("fidelity.outputs must name at least one output (or be null for all).", field="fidelity.outputs")


# --------------------------------------------------------------------------------------------
# Model facts


@dataclass
class ModelFacts:
    """What the checks and the pipeline need to know about a model (read without its weights)."""

    opset: int
    ir_version: int
    op_counts: dict[str, int]
    node_names: set[str]
    has_external_data: bool
    has_subgraphs: bool
    size_bytes: int  # model file plus the external data files it names
    qdq_nodes: int
    external_files: list[str] = field(default_factory=list)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for g in iter_graphs(model.graph):
        counts.update(n.op_type for n in g.node)
    return dict(sorted(counts.items()))


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def model_facts(model_path: Path) -> ModelFacts:
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise EngineError("invalid_model", f"The model could not be read: {exc}", {}) from exc
    names: set[str] = set()
    has_sub = False
    external: set[str] = set()
    for i, g in enumerate(iter_graphs(model.graph)):
        has_sub = has_sub or i > 0
        names.update(n.name for n in g.node if n.name)
        for t in g.initializer:
            if uses_external_data(t):
                for kv in t.external_data:
                    if kv.key == "location":
                        external.add(kv.value)
    counts = op_counts(model)
    size = Path(model_path).stat().st_size
    for loc in external:
        p = Path(model_path).parent / loc
        if p.is_file():
            size += p.stat().st_size
    return ModelFacts(
        opset=ai_onnx_opset(model),
        ir_version=int(model.ir_version),
        op_counts=counts,
        node_names=names,
        has_external_data=bool(external),
        has_subgraphs=has_sub,
        size_bytes=size,
        qdq_nodes=sum(counts.get(op, 0) for op in QDQ_OP_TYPES),
        external_files=sorted(external),
    )


def check_recipe_for_model(spec: QuantizationSpec, facts: ModelFacts, *, has_calibration: bool) -> list[str]:
    """Checks that need the model. Returns warnings (things that work but deserve a word)."""
    check_recipe(spec)
    warnings: list[str] = []
    if spec.mode == Mode.STATIC and not has_calibration:
        raise _invalid(
            "Static quantization needs calibration data: give a calibration dataset, or use mode dynamic.",
            field="calibration_dataset_id",
        )
    if spec.nodes_to_exclude:
        unknown = sorted(set(spec.nodes_to_exclude) - facts.node_names)
        if unknown:
            raise _invalid(
                f"nodes_to_exclude names node(s) the model does not have: {', '.join(unknown[:10])}.",
                field="nodes_to_exclude",
                unknown=unknown,
            )
    if spec.mode == Mode.WEIGHT_ONLY:
        wanted = spec.op_types_to_quantize or ("MatMul",)
        if not any(facts.op_counts.get(op, 0) for op in wanted):
            raise _invalid(
                f"Weight-only quantization rewrites {' and '.join(wanted)} nodes and the model has none; "
                "use static or dynamic quantization.",
                field="mode",
                op_types=list(wanted),
            )
    elif spec.op_types_to_quantize and spec.mode in (Mode.STATIC, Mode.DYNAMIC):
        present = [op for op in spec.op_types_to_quantize if facts.op_counts.get(op, 0)]
        if not present:
            raise _invalid(
                f"None of op_types_to_quantize ({', '.join(spec.op_types_to_quantize)}) occurs in the model, "
                "so nothing would be quantized.",
                field="op_types_to_quantize",
            )
        missing = [op for op in spec.op_types_to_quantize if op not in present]
        if missing:
            warnings.append(f"op_types_to_quantize lists {', '.join(missing)}, which the model does not contain.")
    if facts.qdq_nodes:
        warnings.append(
            f"The model already holds {facts.qdq_nodes} QuantizeLinear/DequantizeLinear nodes "
            "(a quantization-aware trained or already quantized export); those parts are kept as they are."
        )
    return warnings
