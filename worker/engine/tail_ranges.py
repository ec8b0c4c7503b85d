"""Percentile ranges in one streamed pass, equal to ONNX Runtime's one-shot histogram.

ONNX Runtime's Percentile calibration (symmetric, its default) builds, per tensor, a histogram of |x| over
all samples with `num_bins` equal bins from min|x| to max|x|, and takes the edge where the cumulative count
reaches the percentile, clipped to [min x, max x]. Streamed with bounded memory, that histogram needs its
range before the first sample: a pass of its own over the data, so the model ran twice (`calibration.py`).

The bin the percentile falls in depends only on the global min|x| and max|x| (exact, kept per feed) and on
how many values lie at or above each edge near the top: for percentile p of N values, at most
(1 - p/100) * N of them. So each tensor keeps its K largest |x| (K a little above that count; a few
thousand values for the usual 99.999 over millions) and its exact extremes, the model runs once, and the
histogram's counts above every edge are read from the kept values at the end. The ranges are ONNX
Runtime's to the bit, except where the count at an edge meets the percentile exactly (N * (1 - p/100) a
whole number): ONNX Runtime's pick between the two neighbouring edges then turns on the rounding of its
running float sum, and this takes the tie as reached. Where K would be too large
to keep (low percentiles over many values), `NeedsTwoPasses` says so before much work is done and the
caller falls back to two passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TAIL_BUDGET_BYTES = 64 << 20  # what the kept values of every tensor may take together
_GUESS_SAMPLE = 1 << 16
_TIE = 1e-12  # values looked at to guess where a first feed's largest K start


class NeedsTwoPasses(Exception):
    """The values to keep would exceed TAIL_BUDGET_BYTES (or a tensor held NaN or infinity): calibrate in
    two passes instead."""


@dataclass
class _Tail:
    """One tensor's running facts: count, extremes and its largest |x| (`kept`, unsorted)."""

    count: int = 0
    lowest: Any = None  # min x (0-d array of the tensor's dtype)
    highest: Any = None  # max x
    abs_lowest: Any = None  # min |x|
    abs_highest: Any = None  # max |x|
    kept: np.ndarray | None = None
    full: bool = False  # `kept` holds exactly `capacity` values and every value above its minimum
    floor: Any = None  # the minimum of `kept` when full
    capacity: int = 0


def tail_size(values: int, percentile: float) -> int:
    """How many of the largest values settle the percentile's bin among `values` values (with margin)."""
    return math.floor(values * (1.0 - percentile / 100.0)) + 2


@dataclass
class PercentileTails:
    """Feed it each feed's tensors (`add`); `ranges()` gives ONNX Runtime's one-shot Percentile ranges.

    `expected_feeds`: how many feeds will come (sizes the kept values from the first feed's tensors)."""

    percentile: float
    num_bins: int
    expected_feeds: int
    tails: dict[str, _Tail] = field(default_factory=dict)

    def add(self, tensors: Mapping[str, np.ndarray]) -> None:
        if not self.tails:
            self._size(tensors)
        for name, value in tensors.items():
            self._add(self.tails[name], np.asarray(value))

    def _size(self, tensors: Mapping[str, np.ndarray]) -> None:
        total = 0
        for name, value in tensors.items():
            capacity = tail_size(int(np.asarray(value).size) * self.expected_feeds, self.percentile)
            self.tails[name] = _Tail(capacity=capacity)
            total += capacity * np.asarray(value).dtype.itemsize
        if total > TAIL_BUDGET_BYTES:
            raise NeedsTwoPasses(f"{total} bytes of tail values")

    def _add(self, tail: _Tail, value: np.ndarray) -> None:
        flat = value.reshape(-1)
        if flat.size == 0:
            return
        low, high = flat.min(), flat.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            raise NeedsTwoPasses("values that are not finite")  # ORT's own histogram refuses them
        # |x| is x itself after a Relu (or its negation): no copy, and its extremes are x's.
        magnitude: np.ndarray | None = None
        if low >= 0:
            magnitude, abs_low, abs_high = flat, abs(low), abs(high)
        elif high <= 0:
            abs_low, abs_high = abs(high), abs(low)
        else:
            magnitude = np.abs(flat)
            abs_low, abs_high = magnitude.min(), max(abs(low), abs(high))
        if tail.count == 0:
            tail.lowest, tail.highest, tail.abs_lowest, tail.abs_highest = low, high, abs_low, abs_high
        else:
            tail.lowest = min(tail.lowest, low)
            tail.highest = max(tail.highest, high)
            tail.abs_lowest = min(tail.abs_lowest, abs_low)
            tail.abs_highest = max(tail.abs_highest, abs_high)
        tail.count += flat.size
        if tail.full and not abs_high > tail.floor:
            return  # nothing here reaches the kept values (the usual case after the first feeds)
        tail.kept = _largest(tail, np.negative(flat) if magnitude is None else magnitude)
        if tail.full:
            tail.floor = tail.kept.min()

    def ranges(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(lowest, highest) per tensor, as ONNX Runtime's symmetric Percentile computes them from a
        histogram of every value at once. Raises NeedsTwoPasses when more values came than were sized for."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, tail in self.tails.items():
            if tail.count == 0 or tail.kept is None:
                continue
            if tail.full and tail.capacity < tail_size(tail.count, self.percentile):
                raise NeedsTwoPasses(f"{name}: more values than the first feed announced")
            out[name] = self._range(tail)
        return out

    def _range(self, tail: _Tail) -> tuple[np.ndarray, np.ndarray]:
        assert tail.kept is not None
        dtype = tail.kept.dtype
        # The very edges np.histogram(|x|, bins=num_bins) uses for the whole data (range = its min and max).
        edges = np.histogram_bin_edges(
            np.empty(0, dtype), bins=self.num_bins, range=(tail.abs_lowest, tail.abs_highest)
        ).astype(dtype)
        kept = np.sort(tail.kept)
        inner = edges[1:-1]  # values at or above edges[i + 1] lie in the bins after bin i
        above = (kept.size - np.searchsorted(kept, inner, side="left")).astype(np.float64)
        if tail.full:  # at or below the kept minimum the count is only known to be at least the capacity
            above[inner <= kept[0]] = np.inf
        above = np.append(above, 0.0)  # nothing lies after the last bin
        cdf = (tail.count - above) / tail.count
        # A count that meets the percentile exactly counts as reaching it: there ONNX Runtime's answer turns
        # on the rounding of its running float sum, either neighbouring edge.
        index = int(np.argmax(cdf >= self.percentile / 100.0 - _TIE))
        threshold = edges[index]
        lowest = -np.array(threshold, dtype=dtype)
        highest = np.array(threshold, dtype=dtype)
        if lowest < tail.lowest:
            lowest = np.array(tail.lowest, dtype=dtype)
        if highest > tail.highest:
            highest = np.array(tail.highest, dtype=dtype)
        return lowest, highest


def _largest(tail: _Tail, magnitude: np.ndarray) -> np.ndarray:
    """The `capacity` largest of what `tail` kept and `magnitude`, keeping every value above the result's
    minimum (values equal to it may go: the counts read later are of values above it)."""
    capacity = tail.capacity
    if tail.full:
        assert tail.kept is not None
        candidates = magnitude[magnitude > tail.floor]
        if candidates.size == 0:
            return tail.kept
        merged = np.concatenate((tail.kept, candidates))
    else:
        candidates = _first_candidates(magnitude, capacity)
        merged = candidates if tail.kept is None else np.concatenate((tail.kept, candidates))
    if merged.size <= capacity:
        tail.full = False
        return merged.copy() if merged is magnitude else merged
    tail.full = True
    return np.partition(merged, merged.size - capacity)[merged.size - capacity :].copy()


def _first_candidates(magnitude: np.ndarray, capacity: int) -> np.ndarray:
    """The values of a first feed that may be among its `capacity` largest: those above a guess made from
    a strided sample (all of them when the guess leaves too few)."""
    if magnitude.size <= max(capacity, _GUESS_SAMPLE):
        return magnitude
    sample = magnitude[:: magnitude.size // _GUESS_SAMPLE]
    rank = min(sample.size - 1, math.ceil(capacity * sample.size / magnitude.size * 2) + 16)
    guess = np.partition(sample, sample.size - 1 - rank)[sample.size - 1 - rank]
    candidates = magnitude[magnitude > guess]
    return candidates if candidates.size >= capacity else magnitude


def percentile_ranges(
    feeds: Iterable[Mapping[str, np.ndarray]], percentile: float, num_bins: int, expected_feeds: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ONNX Runtime's symmetric Percentile ranges of the tensors in `feeds`, in one pass."""
    tails = PercentileTails(percentile, num_bins, expected_feeds)
    for tensors in feeds:
        tails.add(tensors)
    return tails.ranges()
