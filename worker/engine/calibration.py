"""Calibration with bounded memory.

`quantize_static` with a data reader hands every sample to the calibrator at once; histogram
calibrators (Entropy, Percentile, Distribution) then hold every intermediate tensor of every
sample before building histograms (plain `quantize_static`'s peak grows with every sample: the
`calibration_peak_mb` figure in bench/results/figures.json). Here the calibrator's `collect_data` is
called once per small chunk of feeds (it merges across calls and clears its intermediate outputs at
the end of each call), so peak memory is that of one chunk.

Histogram calibrators merge a new chunk into a histogram whose bin width was fixed by the first
chunk, growing it bin by bin when a later chunk has a wider range (unbounded when the first
chunk's range is tiny). So for them a cheap MinMax pass runs first and every histogram is seeded
with the global range: later chunks then fall inside it, and the result equals a one-shot
histogram over all samples.

Percentile (ONNX Runtime's is symmetric: a histogram of |x|) needs no first pass: its bin is settled by each
tensor's exact extremes and its few largest values, kept as the model runs once (`tail_ranges.py`); it falls
back to the two passes when those would not fit in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import TensorSpec
from core.recipe import CalibrationMethod, Recipe
from worker.engine.data import Batch, count_batches, feed_limit, iter_batches
from worker.engine.quiet import quiet_ort
from worker.engine.tail_ranges import NeedsTwoPasses, PercentileTails

MINMAX_CHUNK = 16  # feeds per collect_data call for MinMax (its per-call state is tiny)
HISTOGRAM_CHUNK = 1  # feeds per call for histogram methods (shapes may differ between feeds)


@dataclass
class CalibrationResult:
    tensors_range: Any  # onnxruntime.quantization.calibrate.TensorsData
    samples: int
    feeds: int
    collect_calls: int
    max_chunk_feeds: int
    passes: int
    timings_s: dict[str, float] = field(default_factory=dict)
    # Ranges inside If/Loop/Scan bodies (subgraphs.BodyRanges or None), by static op types: filled on first use.
    bodies: dict[tuple[str, ...], Any] = field(default_factory=dict)


class ListReader:
    """A CalibrationDataReader over a list of feeds (one chunk)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        feed = self._feeds[self._i]
        self._i += 1
        return feed

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:  # pragma: no cover - not used
        self._feeds = self._feeds[start_index:end_index]
        self._i = 0


def _chunks(batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    chunk: list[Batch] = []
    for b in batches:
        chunk.append(b)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ort_method(method: CalibrationMethod) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod

    return {
        CalibrationMethod.MINMAX: OrtMethod.MinMax,
        CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
        CalibrationMethod.DISTRIBUTION: OrtMethod.Distribution,
    }[CalibrationMethod(method)]


def default_op_types(spec: Recipe) -> list[str]:
    """The op types quantize_static calibrates/quantizes when none are given."""
    if spec.op_types_to_quantize:
        return list(spec.op_types_to_quantize)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibrate(
    model_path: Path,
    spec: Recipe,
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    workdir: Path,
    *,
    external: bool = False,
    progress: Callable[[float], None] = lambda f: None,
) -> CalibrationResult:
    """Compute activation ranges (ORT TensorsData) for `model_path` on the dataset, chunk by chunk."""
    from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, create_calibrator

    workdir.mkdir(parents=True, exist_ok=True)
    method = CalibrationMethod(spec.calibration_method)
    op_types = default_op_types(spec)
    batch_size = spec.calibration_batch_size
    limit = feed_limit(source, inputs, batch_size=batch_size, max_samples=spec.max_calibration_samples)
    total_feeds = count_batches(source, inputs, batch_size=batch_size, limit=limit)
    if total_feeds == 0:
        raise RuleError("invalid_dataset", "The calibration dataset holds no samples.", {})
    histogram = method != CalibrationMethod.MINMAX
    passes = 2 if histogram else 1
    stats = {"calls": 0, "max_chunk": 0}
    counted = {"samples": 0, "feeds": 0}
    timings: dict[str, float] = {}

    def feeds_of_pass(chunk_size: int, pass_index: int, calibrator: Any) -> None:
        t = time.perf_counter()
        calls_total = max(1, math.ceil(total_feeds / chunk_size))
        calls = 0
        samples = feeds = 0
        batches = iter_batches(source, inputs, batch_size=batch_size, limit=limit)
        try:
            for chunk in _chunks(batches, chunk_size):
                reader = ListReader([b.feeds for b in chunk])
                samples += sum(b.num_samples for b in chunk)
                feeds += len(chunk)
                stats["calls"] += 1
                stats["max_chunk"] = max(stats["max_chunk"], len(chunk))
                try:
                    with quiet_ort():  # histogram collectors print per call
                        calibrator.collect_data(reader)
                except Exception as exc:
                    raise RuleError(
                        "quantization_failed",
                        f"Calibration failed while running the model on the calibration data: {str(exc).strip()[:300]}",
                        {"step": "calibration"},
                    ) from exc
                del reader, chunk
                calls += 1
                progress((pass_index + min(1.0, calls / calls_total)) / passes)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        counted["samples"], counted["feeds"] = samples, feeds
        timings[f"pass{pass_index + 1}"] = time.perf_counter() - t

    def make(ort_method: Any, extra: dict[str, Any], name: str) -> Any:
        try:
            with quiet_ort():
                return create_calibrator(
                    Path(model_path),
                    op_types,
                    augmented_model_path=str(workdir / f"augmented_{name}.onnx"),
                    calibrate_method=ort_method,
                    use_external_data_format=external,
                    extra_options=extra,
                )
        except Exception as exc:
            raise RuleError(
                "quantization_failed",
                f"Preparing the model for calibration failed: {str(exc).strip()[:300]}",
                {"step": "calibration_setup"},
            ) from exc

    if method == CalibrationMethod.PERCENTILE:
        # ORT's Percentile (symmetric: |x| histograms, whatever symmetric_activations says) in one pass.
        percentile = make(OrtMethod.Percentile, {"percentile": float(spec.percentile)}, method.value)
        try:
            one = _percentile_one_pass(percentile, source, inputs, batch_size, limit, total_feeds, progress)
        except NeedsTwoPasses:
            one = None
        _release(percentile)
        if one is not None:
            return one

    # Pass 1: MinMax (the result itself for minmax; the global ranges for histogram methods).
    minmax_extra: dict[str, Any] = {}
    if spec.symmetric_activations and not histogram:
        minmax_extra["symmetric"] = True
    minmax = make(OrtMethod.MinMax, minmax_extra, "minmax")
    feeds_of_pass(MINMAX_CHUNK, 0, minmax)
    ranges = minmax.compute_data()
    _release(minmax)
    if not histogram:
        return CalibrationResult(
            ranges, counted["samples"], counted["feeds"], stats["calls"], stats["max_chunk"], passes, timings
        )

    # Pass 2: histograms seeded with the global ranges, one feed per collect_data call.
    extra: dict[str, Any] = {}
    if method == CalibrationMethod.PERCENTILE:
        extra["percentile"] = float(spec.percentile)
    if spec.symmetric_activations:
        extra["symmetric"] = True
    hist = make(_ort_method(method), extra, method.value)
    hist.collector = HistogramCollector(
        method=hist.method,
        symmetric=hist.symmetric,
        num_bins=hist.num_bins,
        num_quantized_bins=hist.num_quantized_bins,
        percentile=hist.percentile,
        scenario=hist.scenario,
    )
    seed_histograms(hist.collector, ranges, getattr(hist, "tensors_to_calibrate", None))
    feeds_of_pass(HISTOGRAM_CHUNK, 1, hist)
    try:
        with quiet_ort():
            tensors_range = hist.compute_data()
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"Computing {method.value} calibration ranges failed: {str(exc).strip()[:300]}",
            {"step": "calibration"},
        ) from exc
    _release(hist)
    return CalibrationResult(
        tensors_range,
        counted["samples"],
        counted["feeds"],
        stats["calls"],
        stats["max_chunk"],
        passes,
        timings,
    )


def _percentile_one_pass(
    calibrator: Any,
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    batch_size: int,
    limit: int | None,
    total_feeds: int,
    progress: Callable[[float], None],
) -> CalibrationResult:
    """ORT's symmetric Percentile ranges, the model run once per feed (raises NeedsTwoPasses)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    t = time.perf_counter()
    if not calibrator.symmetric:
        raise NeedsTwoPasses("asymmetric percentile")
    session = calibrator.infer_session
    names = [o.name for o in session.get_outputs() if o.name in calibrator.tensors_to_calibrate]
    tails = PercentileTails(float(calibrator.percentile), int(calibrator.num_bins), total_feeds)
    samples = feeds = 0
    batches = iter_batches(source, inputs, batch_size=batch_size, limit=limit)
    try:
        for batch in batches:
            try:
                outputs = session.run(names, batch.feeds)
            except Exception as exc:
                raise RuleError(
                    "quantization_failed",
                    f"Calibration failed while running the model on the calibration data: {str(exc).strip()[:300]}",
                    {"step": "calibration"},
                ) from exc
            tails.add(dict(zip(names, outputs, strict=True)))
            del outputs
            samples += batch.num_samples
            feeds += 1
            progress(min(1.0, feeds / total_feeds))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    ranges = tails.ranges()
    data = {name: TensorData(lowest=lo, highest=hi) for name, (lo, hi) in ranges.items()}
    return CalibrationResult(
        TensorsData(OrtMethod.Percentile, data), samples, feeds, feeds, 1, 1, {"pass1": time.perf_counter() - t}
    )


def _release(calibrator: Any) -> None:
    calibrator.infer_session = None
    calibrator.model = None
    if hasattr(calibrator, "intermediate_outputs"):
        calibrator.intermediate_outputs = []


def seed_histograms(collector: Any, ranges: Any, tensors: Any = None) -> int:
    """Start every histogram at the tensor's global range (from a MinMax pass), exactly as the
    collector would have built it from all samples at once. Returns how many were seeded."""
    seeded = 0
    for name, data in ranges.items():
        if tensors is not None and name not in tensors:
            continue
        lo, hi = data.range_value
        lo = np.asarray(lo).reshape(-1)
        hi = np.asarray(hi).reshape(-1)
        if lo.size != 1 or hi.size != 1 or not (np.isfinite(lo[0]) and np.isfinite(hi[0])):
            continue
        dtype = lo.dtype if lo.dtype in (np.float16, np.float32) else np.dtype(np.float32)
        lo_v = np.array(lo[0], dtype=dtype)
        hi_v = np.array(hi[0], dtype=dtype)
        empty = np.zeros((0,), dtype=dtype)
        if collector.method == "percentile" and collector.symmetric:
            amax = np.array(max(abs(float(lo_v)), abs(float(hi_v))), dtype=dtype)
            hist, edges = np.histogram(empty, bins=collector.num_bins, range=(0, float(amax) if amax > 0 else 1.0))
            collector.histogram_dict[name] = (hist, edges.astype(dtype), lo_v, hi_v)
        else:
            threshold = np.array(max(abs(lo_v), abs(hi_v)), dtype=dtype)
            hist, edges = np.histogram(empty, collector.num_bins, range=(-threshold, threshold))  # type: ignore[arg-type]
            collector.histogram_dict[name] = (hist, edges, lo_v, hi_v, threshold)
        seeded += 1
    return seeded
