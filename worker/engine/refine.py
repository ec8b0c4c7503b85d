"""Better ranges before quantizing a static recipe: the calibration method chosen per tensor where it matters
(`range_choice`, recipe `calibration_per_tensor`) and fast bias correction (`bias_correction`, recipe
`bias_correction`), both measured on a QDQ model of the recipe with the job's ranges."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from core.jobfile import DatasetSource
from core.model import TensorSpec
from core.recipe import BIAS_CORRECTION_SAMPLES, CalibrationMethod, QuantFormat, Recipe
from core.result import BiasCorrectionFacts, QuantizationFacts, RangeChoiceFacts
from worker.engine.bias_correction import BiasShifts, apply_shifts, measure_shifts, without
from worker.engine.data import Batch, feed_limit, iter_batches
from worker.engine.preprocess import Prepared
from worker.engine.range_choice import SCORING_BATCHES, OutputError, choose_ranges

# (prepared model, recipe, ranges, out path): quantize.py's static quantizer, with the job's options.
StaticQuantizer = Callable[[Prepared, Recipe, Any, Path], None]


def _key(spec: Recipe, what: str) -> tuple[Any, ...]:
    """What a refinement of `spec` depends on: not its format, nor the nodes a search step leaves in float."""
    plain = dataclasses.replace(
        spec, format=QuantFormat.QDQ, nodes_to_exclude=None, sixteen_bit_tensors=None, fidelity=None
    )
    return (what, plain)


def refine(
    prepared: Prepared,
    spec: Recipe,
    ranges: Any,
    calibration: DatasetSource,
    inputs: Sequence[TensorSpec],
    workdir: Path,
    facts: QuantizationFacts,
    static: StaticQuantizer,
    memo: dict[Any, Any] | None = None,
) -> tuple[Any, Prepared]:
    """The ranges to quantize with and the model to quantize (the float model with corrected biases), with
    what was done recorded in `facts`. `memo` (mode auto's) keeps what was measured for the QDQ and QOperator
    twins and every search step of one candidate: the per-tensor choice is made once, before any step, and
    bias shifts are per layer, so a step that leaves layers in float drops theirs."""
    memo = memo if memo is not None else {}
    qdq = dataclasses.replace(spec, format=QuantFormat.QDQ)
    limit = feed_limit(
        calibration, inputs, batch_size=spec.calibration_batch_size, max_samples=spec.max_calibration_samples
    )

    def batches(n: int) -> Iterator[Batch]:
        return iter_batches(calibration, inputs, batch_size=spec.calibration_batch_size, limit=min(n, limit or n))

    def quantize_qdq(with_ranges: Any, path: Path, recipe: Recipe = qdq) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        static(prepared, recipe, with_ranges, path)

    base = workdir / "base.onnx"
    # Both load the whole model and write copies of it: not for models that keep their weights outside.
    external = "the model keeps its weights in external data" if prepared.external or prepared.streamed else None
    if spec.calibration_per_tensor and external:
        facts.range_choice = RangeChoiceFacts(skipped=external)
    elif spec.calibration_per_tensor:
        key = _key(spec, "ranges")
        if key not in memo:
            start = dataclasses.replace(qdq, nodes_to_exclude=None, sixteen_bit_tensors=None)
            quantize_qdq(ranges, base, start)
            memo[key] = choose_ranges(
                prepared.path,
                base,
                ranges,
                ranges if spec.calibration_method == CalibrationMethod.MINMAX else None,
                batches,
                lambda r, path: quantize_qdq(r, path, start),
                workdir,
                method=str(spec.calibration_method),
                percentile=float(spec.percentile),
            )
            base.unlink(missing_ok=True)
        ranges, facts.range_choice = memo[key][0], memo[key][1].model_copy(deep=True)
    if not spec.corrects_bias:
        return ranges, prepared
    if external:
        facts.bias_correction = BiasCorrectionFacts(applied=False, skipped=external)
        return ranges, prepared
    key = (_key(spec, "bias"), spec.sixteen_bit_tensors, id(ranges))
    if key not in memo:
        memo[key] = _measured_shifts(
            prepared, dataclasses.replace(qdq, nodes_to_exclude=None), ranges, batches, workdir, static
        )
    shifts, before, after, _ = memo[key]
    shifts = without(shifts, spec.nodes_to_exclude or ())
    helps = before is None or after is None or after < before
    facts.bias_correction = BiasCorrectionFacts(
        applied=bool(shifts.biases) and helps,
        biases_changed=len(shifts.biases) if helps else 0,
        layers_considered=shifts.considered,
        samples=shifts.samples,
        seconds=round(shifts.seconds, 3),
        output_error=after,
        baseline_error=before,
        skipped=(
            "no quantized Conv, Gemm or MatMul+Add with a bias of its own"
            if not shifts.considered
            else None
            if helps
            else "the corrected biases did not lower the output error on the calibration data"
        ),
    )
    if not shifts.biases or not helps:
        return ranges, prepared
    corrected = apply_shifts(prepared.path, shifts, workdir / "corrected.onnx")
    return ranges, dataclasses.replace(prepared, path=corrected)


def _measured_shifts(
    prepared: Prepared,
    qdq: Recipe,
    ranges: Any,
    batches: Callable[[int], Iterator[Batch]],
    workdir: Path,
    static: StaticQuantizer,
) -> tuple[BiasShifts, float | None, float | None, Any]:
    """The shifts, and the output error (noise-to-signal ratio on a few calibration batches) of the QDQ model
    without and with them: a correction that does not lower it is not applied (the shifts are each layer's
    own, and what they do downstream is only seen on the output). The ranges ride along, keeping their id."""
    base, check = workdir / "base.onnx", workdir / "checked.onnx"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        static(prepared, qdq, ranges, base)
        shifts = measure_shifts(prepared.path, base, batches(BIAS_CORRECTION_SAMPLES), workdir)
        if not shifts.biases:
            return shifts, None, None, ranges
        error = OutputError(prepared.path, list(batches(SCORING_BATCHES)))
        before = error(base)
        fixed = apply_shifts(prepared.path, shifts, workdir / "corrected.onnx")
        static(dataclasses.replace(prepared, path=fixed), qdq, ranges, check)
        after = error(check)
    finally:
        for path in (base, check, workdir / "corrected.onnx"):
            path.unlink(missing_ok=True)
    shifts.seconds = time.perf_counter() - started
    return shifts, before, after, ranges
