"""What mode auto tries, chosen from the model's operators and the CPU's int8 features.

- The CPU: with int8 dot products (VNNI, AMX, ARM dot product) U8S8 (uint8 activations, int8
  weights) is the fast path; on x86 without them (AVX2 only) U8S8 products can saturate, so
  activations are int8 (S8S8) and weights use 7 bits (`reduce_range`).
- Every static candidate starts from better ranges: fast bias correction (`bias_correction`, unless the
  job's recipe turns it off), and the MinMax ones from the calibration method chosen per tensor where
  sensitivity says it matters (`range_choice`).
- Static int8, per-channel weights, whole graph (MinMax, Percentile) and Conv/MatMul/Gemm only, each in both
  formats: QDQ and QOperator run the same kernels yet do not round alike (on a real OCR recognizer whole-model
  QOperator kept argmax agreement 0.92 where QDQ kept 0.42), and share one calibration. S8S8 (int8
  activations) on a CPU whose U8S8 path is fast only when the pre-flight measured S8S8 fast there too (on
  AMX and VNNI Xeons S8S8 ran at 0.2-0.6x of float).
- Models with Conv and MatMul (text recognizers): a hybrid, static Conv/Gemm and dynamic MatMul.
- CNNs (Conv): dynamic quantization is left out: it makes Conv a ConvInteger, which ONNX Runtime runs at a
  fraction of float's speed on CPUs (tests/worker/engine/test_auto.py measures it).
- MatMul models (transformers, MLPs): static QDQ, dynamic int8, and MatMul/Gemm-only variants of
  both (quantizing LayerNorm, Softmax or the attention mask wrecks transformers); transformers also
  dynamic int8 after ONNX Runtime's transformer fusions, where they find something to fuse. Hybrids
  with a conv backbone (text recognizers) get dynamic int8 of their MatMuls only: dynamic Conv is
  ConvInteger, far slower than float.
- float16 always (a size option; it must measure faster to win on latency), and with objective
  `size` weight-only int4 for MatMul models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.recipe import ActivationType, CalibrationMethod, Mode, Objective, QType, QuantFormat

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Candidate:
    name: str
    changes: Mapping[str, Any]  # recipe fields over the job's recipe
    searchable: bool = False  # static or dynamic: mixed precision can start from it
    tags: tuple[str, ...] = field(default_factory=tuple)


def _both_formats(name: str, changes: dict[str, Any]) -> list[Candidate]:
    """A static candidate as QDQ and as QOperator (which mixed precision ranks on its QDQ twin)."""
    qoperator = {**changes, "format": QuantFormat.QOPERATOR}
    return [
        Candidate(f"static QDQ, {name}", changes, searchable=True),
        Candidate(f"static QOperator, {name}", qoperator, searchable=True),
    ]


def int8_settings(int8: str) -> dict[str, Any]:
    """Activation type and reduce_range for static QDQ on this CPU (see the module docstring)."""
    if int8 == "avx2":
        return {"activation_type": QType.INT8, "weight_type": QType.INT8, "reduce_range": True}
    return {"activation_type": QType.UINT8, "weight_type": QType.INT8, "reduce_range": False}


def model_family(op_counts: Mapping[str, int], token_inputs: bool) -> str:
    """ "cnn", "transformer" or "mlp" (anything else with MatMul/Gemm), or "other"."""
    convs = op_counts.get("Conv", 0)
    matmuls = op_counts.get("MatMul", 0) + op_counts.get("Gemm", 0)
    if convs and convs >= matmuls:
        return "cnn"
    attention_like = op_counts.get("Softmax", 0) and (
        op_counts.get("LayerNormalization", 0) or op_counts.get("ReduceMean", 0)
    )
    if matmuls and (token_inputs or attention_like):
        return "transformer"
    return "mlp" if matmuls else "other"


def candidates_for(
    op_counts: Mapping[str, int], *, token_inputs: bool, int8: str, objective: Objective, s8s8: bool = False
) -> list[Candidate]:
    """`s8s8`: the pre-flight measured static int8 activations fast on this CPU."""
    family = model_family(op_counts, token_inputs)
    static = {"mode": Mode.STATIC, "per_channel": True, "bias_correction": True, **int8_settings(int8)}
    compute = [op for op in COMPUTE_OPS if op_counts.get(op)]
    if "MatMul" in compute and "Gemm" not in compute:
        compute.append("Gemm")  # MatMul+Add may fuse into Gemm in pre-processing
    dynamic = {"mode": Mode.DYNAMIC, "reduce_range": int8 == "avx2"}
    # MinMax with Percentile ranges where they lower the output error, tensor by tensor (range_choice).
    chosen = {**static, "calibration_per_tensor": True}
    found: list[Candidate] = [
        *_both_formats("per-channel, MinMax", chosen),
        *_both_formats("per-channel, Percentile", {**static, "calibration_method": CalibrationMethod.PERCENTILE}),
    ]
    if compute and len(compute) < len({op for op, n in op_counts.items() if n}):
        found += _both_formats(
            f"per-channel, {'/'.join(compute)} only", {**chosen, "op_types_to_quantize": tuple(compute)}
        )
    if s8s8 and ActivationType(static["activation_type"]) != ActivationType.INT8:
        found.append(
            Candidate("static QDQ S8S8, per-channel, MinMax", {**static, "activation_type": ActivationType.INT8}, True)
        )
    if op_counts.get("Conv") and op_counts.get("MatMul"):
        hybrid = {**static, "op_types_to_quantize": ("Conv", "Gemm"), "dynamic_op_types": ("MatMul",)}
        found.append(Candidate("hybrid: static QDQ Conv/Gemm, dynamic int8 MatMul", hybrid, searchable=True))
    if family in ("transformer", "mlp"):
        matmuls = tuple(op for op in ("MatMul", "Gemm") if op_counts.get(op))
        if not op_counts.get("Conv"):  # in hybrids (a CNN backbone), dynamic Conv is ConvInteger: slow
            found.append(Candidate("dynamic int8", dynamic, searchable=True))
        found.append(
            Candidate(f"dynamic int8, {'/'.join(matmuls)} only", {**dynamic, "op_types_to_quantize": matmuls}, True)
        )
    if family == "transformer":
        fused = {**dynamic, "transformer_fusion": True}
        if op_counts.get("Conv"):
            fused["op_types_to_quantize"] = ("MatMul", "Gemm", "Attention")
        found.append(Candidate("transformer fusion + dynamic int8", fused, True))
    found.append(Candidate("float16", {"mode": Mode.FP16}))
    if objective == Objective.SIZE and op_counts.get("MatMul"):
        found.append(Candidate("weight-only int4", {"mode": Mode.WEIGHT_ONLY, "weight_type": QType.INT4}))
    return found
