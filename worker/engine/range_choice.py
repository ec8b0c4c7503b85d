"""The calibration method chosen per tensor, where sensitivity says the tensor matters.

One method for every tensor is a compromise: MinMax keeps a rare outlier exact and crushes the rest of the
values into a few levels, Percentile clips the outlier and keeps the resolution. Which is better depends on
whether the outliers matter downstream, so the choice is measured on the output. Only the few activation
tensors that `sensitivity.static_sensitivity` ranks worst (by their local, per-channel error) are tried: for
each, the model is quantized again with that tensor's range from MinMax and from a few percentiles (the
recipe's, 99.99 and 99.9), and the range that gives less output error on a few calibration samples is kept
(the ranges kept for several tensors are checked together once more). Every other tensor keeps the recipe's
method.

Memory stays flat: the Percentile ranges come from histograms (fixed bins over the tensor's MinMax range,
summed batch by batch), never from stored activations; the float outputs of the few scoring samples are the
only values kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from core.result import RangeChoiceFacts, TensorRangeChoice
from worker.engine.data import Batch
from worker.engine.sensitivity import static_sensitivity
from worker.engine.session import session_options

TOP_TENSORS = 4  # the most sensitive activation tensors tried
SCORING_BATCHES = 8  # feeds the output error is measured on
SENSITIVITY_BATCHES = 8
BINS = 2048
# A range replaces the recipe's only when it lowers the output error by this share or more (noise of a few
# samples must not flip ranges back and forth).
MIN_GAIN = 0.02
# Percentiles tried beside the recipe's, least clipping first (on an OCR detector fixture 99.9 on two tensors
# gave +0.8 dB where the default 99.999 changed nothing).
PERCENTILE_LADDER = (99.99, 99.9)

Quantizer = Callable[[Any, Path], None]  # (ORT TensorsData, out path): a QDQ model with those ranges


@dataclass
class _Histogram:
    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        x = x[np.isfinite(x)]
        if x.size and self.hi > self.lo:
            self.counts += np.histogram(np.clip(x, self.lo, self.hi), bins=BINS, range=(self.lo, self.hi))[0]

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        total = int(self.counts.sum())
        if not total or self.hi <= self.lo:
            return self.lo, self.hi
        cdf = np.cumsum(self.counts) / total
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        tail = 1.0 - percentile / 100.0
        left = int(np.searchsorted(cdf, tail, side="right"))
        right = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        return float(edges[min(left, BINS)]), float(edges[min(right + 1, BINS)])


def _session(path: Path, threads: int | None) -> Any:
    return ort.InferenceSession(
        str(path), sess_options=session_options(threads or 1), providers=["CPUExecutionProvider"]
    )


def _exposing(float_model: Path, tensors: Sequence[str], path: Path) -> Path:
    model = onnx.load(str(float_model))
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tensor_minmax(
    float_model: Path, tensors: Sequence[str], batches: Iterable[Batch], workdir: Path, *, threads: int | None = None
) -> dict[str, tuple[float, float]]:
    """The MinMax range of `tensors` over `batches` (for recipes whose own ranges are not MinMax)."""
    path = _exposing(float_model, tensors, workdir / "range_choice_minmax.onnx")
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    names = list(tensors)
    try:
        session = _session(path, threads)
        for batch in batches:
            for name, value in zip(names, session.run(names, batch.feeds), strict=True):
                v = np.asarray(value, dtype=np.float32)
                v = v[np.isfinite(v)]
                if v.size:
                    lo[name], hi[name] = min(lo[name], float(v.min())), max(hi[name], float(v.max()))
        del session
    finally:
        path.unlink(missing_ok=True)
    return {t: (min(0.0, lo[t]), max(0.0, hi[t])) for t in tensors if np.isfinite(lo[t])}


def percentile_ranges(
    float_model: Path,
    tensors: Sequence[str],
    minmax: dict[str, tuple[float, float]],
    batches: Iterable[Batch],
    percentiles: Sequence[float],
    workdir: Path,
    *,
    threads: int | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """The ranges of `tensors` at each of `percentiles`, from histograms over their MinMax ranges, in one pass
    of the float model."""
    path = _exposing(float_model, tensors, workdir / "range_choice_hist.onnx")
    hists = {t: _Histogram(*minmax[t]) for t in tensors}
    names = list(tensors)
    try:
        session = _session(path, threads)
        for batch in batches:
            for name, value in zip(names, session.run(names, batch.feeds), strict=True):
                hists[name].add(value)
        del session
    finally:
        path.unlink(missing_ok=True)
    return {t: [h.percentile_range(p) for p in percentiles] for t, h in hists.items()}


class OutputError:
    """Noise-to-signal ratio of a model's float outputs against the float model's, on a few fixed feeds (the
    float outputs are computed once and kept: a few samples' outputs)."""

    def __init__(self, float_model: Path, batches: Sequence[Batch], threads: int | None = None) -> None:
        self.batches = list(batches)
        self.threads = threads
        session = _session(float_model, threads)
        self.names = [o.name for o in session.get_outputs()]
        self.reference = [session.run(self.names, b.feeds) for b in self.batches]
        del session

    def __call__(self, model: Path) -> float:
        session = _session(model, self.threads)
        signal: dict[str, float] = {}
        error: dict[str, float] = {}
        for batch, ref in zip(self.batches, self.reference, strict=True):
            for name, r, got in zip(self.names, ref, session.run(self.names, batch.feeds), strict=True):
                r64 = np.asarray(r, dtype=np.float64)
                if r64.dtype.kind != "f" or np.asarray(r).dtype.kind != "f" or r64.shape != np.shape(got):
                    continue
                diff = np.nan_to_num(r64 - np.asarray(got, dtype=np.float64), nan=1e30, posinf=1e30, neginf=1e30)
                signal[name] = signal.get(name, 0.0) + float(np.sum(r64 * r64))
                error[name] = error.get(name, 0.0) + float(np.sum(diff * diff))
        del session
        # Not capped: of two ranges that both lose an output, the one that loses less is still better.
        ratios = [error[n] / signal[n] if signal[n] > 0 else 0.0 for n in signal]
        return float(np.mean(ratios)) if ratios else 0.0


def _with_range(ranges: Any, tensor: str, lo: float, hi: float) -> Any:
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    data = dict(ranges.items())
    data[tensor] = TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
    return TensorsData(ranges.calibration_method, data)


def _range_of(ranges: Any, tensor: str) -> tuple[float, float] | None:
    try:
        lo, hi = ranges[tensor].range_value
    except (KeyError, AttributeError):
        return None
    lo_a, hi_a = np.asarray(lo).reshape(-1), np.asarray(hi).reshape(-1)
    if lo_a.size != 1 or hi_a.size != 1 or not (np.isfinite(lo_a[0]) and np.isfinite(hi_a[0])):
        return None
    return float(lo_a[0]), float(hi_a[0])


def choose_ranges(
    float_model: Path,
    qdq_model: Path,
    ranges: Any,
    minmax: Any,
    batches: Callable[[int], Iterable[Batch]],
    quantize_qdq: Quantizer,
    workdir: Path,
    *,
    method: str,
    percentile: float,
    ladder: Sequence[float] = PERCENTILE_LADDER,
    top: int = TOP_TENSORS,
    threads: int | None = None,
    deadline: float | None = None,
) -> tuple[Any, RangeChoiceFacts]:
    """`ranges` (the recipe's method's) with the range of some of the most sensitive activation tensors
    replaced by MinMax's or a percentile's, where that lowers the output error. `minmax`: every tensor's MinMax range
    (the same object as `ranges` for MinMax recipes); `batches(n)`: at most n calibration feeds;
    `quantize_qdq(ranges, path)` writes the QDQ model of the recipe with those ranges; `qdq_model` is the one
    with `ranges`. Returns the ranges and what was chosen."""
    started = time.perf_counter()
    facts = RangeChoiceFacts()
    sens = static_sensitivity(
        float_model, qdq_model, batches(SENSITIVITY_BATCHES), candidate="range choice", threads=threads
    )
    suspects = [
        t.tensor
        for t in sens.tensors
        if t.kind == "activation" and t.score > 0 and _range_of(ranges, t.tensor) is not None
    ][:top]
    if not suspects:
        facts.skipped = "no quantized activation tensor with a measurable error"
        facts.seconds = round(time.perf_counter() - started, 3)
        return ranges, facts
    full = (
        {t: r for t in suspects if (r := _range_of(minmax, t)) is not None}
        if minmax is not None
        else tensor_minmax(float_model, suspects, batches(SENSITIVITY_BATCHES * 4), workdir, threads=threads)
    )
    suspects = [t for t in suspects if t in full]
    percentiles = sorted({float(percentile), *ladder}, reverse=True)
    clipped = percentile_ranges(
        float_model, suspects, full, batches(SENSITIVITY_BATCHES * 4), percentiles, workdir, threads=threads
    )
    options: dict[str, list[tuple[str, tuple[float, float]]]] = {}
    for t in suspects:
        seen = [r for r in [_range_of(ranges, t)] if r is not None]  # the recipe's own range is the baseline
        options[t] = []
        named = [("minmax", full[t]), *((f"percentile {p:g}", r) for p, r in zip(percentiles, clipped[t], strict=True))]
        for name, r in named:
            if not any(np.allclose(r, other, rtol=1e-6, atol=0) for other in seen):
                options[t].append((name, r))
                seen.append(r)
    scoring = list(batches(SCORING_BATCHES))
    facts.samples = sum(b.num_samples for b in scoring)
    error = OutputError(float_model, scoring, threads)
    baseline = error(qdq_model)
    trial = workdir / "range_choice.onnx"
    chosen = ranges
    accepted: list[TensorRangeChoice] = []
    try:
        for t in suspects:
            if deadline is not None and time.perf_counter() > deadline:
                break
            facts.tensors_tried += 1
            best: tuple[float, str, tuple[float, float]] | None = None
            for name, (lo, hi) in options[t]:
                quantize_qdq(_with_range(ranges, t, lo, hi), trial)
                err = error(trial)
                if err <= baseline * (1.0 - MIN_GAIN) and (best is None or err < best[0]):
                    best = (err, name, (lo, hi))
                lowest = min(baseline, best[0] if best is not None else baseline)
                if name != "minmax" and err > lowest * (1.0 + MIN_GAIN):
                    break  # clipping more than a percentile that is already worse only gets worse
            if best is None:
                facts.choices.append(
                    TensorRangeChoice(tensor=t, method=method, output_error=baseline, baseline_error=baseline)
                )
                continue
            choice = TensorRangeChoice(tensor=t, method=best[1], output_error=best[0], baseline_error=baseline)
            accepted.append(choice)
            facts.choices.append(choice)
            chosen = _with_range(chosen, t, *best[2])
        if len(accepted) > 1:  # each helped alone; together they must still beat the best of them alone
            quantize_qdq(chosen, trial)
            together = error(trial)
            alone = min(accepted, key=lambda c: c.output_error or 0.0)
            if together > (alone.output_error or 0.0):
                chosen = ranges
                for c in facts.choices:
                    if c is not alone and c in accepted:
                        c.method = method
                lo_hi = next(r for name, r in options[alone.tensor] if name == alone.method)
                chosen = _with_range(ranges, alone.tensor, *lo_hi)
                accepted = [alone]
    finally:
        trial.unlink(missing_ok=True)
    facts.tensors_changed = len(accepted)
    facts.seconds = round(time.perf_counter() - started, 3)
    return chosen, facts
