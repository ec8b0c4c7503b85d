"""One-pass Percentile ranges against ONNX Runtime's one-shot histogram of every value."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import HistogramCollector

from worker.engine import tail_ranges
from worker.engine.tail_ranges import NeedsTwoPasses, PercentileTails


def _feeds(kind: str, n: int = 7) -> list[dict[str, np.ndarray]]:
    """Heavy-tailed values whose count (7 * 3 * 47 * 43) times 1 - p/100 is never whole: no ties (see
    tail_ranges.py: on a tie ONNX Runtime's pick turns on float rounding)."""
    rng = np.random.default_rng(7)
    feeds = []
    for i in range(n):
        x = rng.standard_t(3, (3, 47, 43)).astype(np.float32) * np.float32([1, 5, 0.1, 3, 2, 1, 8][i % 7])
        if kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "positive":  # min |x| well above 0: the histogram does not start at 0
            x = np.abs(x) + np.float32(0.5)
        elif kind == "negative":  # |x| is -x
            x = -np.abs(x) - np.float32(0.25)
        elif kind == "rounded":  # many equal values
            x = np.round(x)
        feeds.append({"t": x})
    return feeds


def _one_shot(feeds: list[dict[str, np.ndarray]], percentile: float) -> tuple[np.ndarray, np.ndarray]:
    collector = HistogramCollector("percentile", True, 2048, 128, percentile, "same")
    collector.collect({"t": [f["t"] for f in feeds]})
    lo, hi, _, _ = collector.compute_collection_result()["t"]
    return lo, hi


@pytest.mark.parametrize("kind", ["plain", "relu", "positive", "negative", "rounded"])
@pytest.mark.parametrize("percentile", [99.999, 99.99, 99.0, 90.0, 60.0])
def test_one_pass_equals_the_one_shot_histogram(kind: str, percentile: float) -> None:
    feeds = _feeds(kind)
    tails = PercentileTails(percentile, 2048, len(feeds))
    for feed in feeds:
        tails.add(feed)
    lo, hi = tails.ranges()["t"]
    ref_lo, ref_hi = _one_shot(feeds, percentile)
    assert (lo, hi) == (ref_lo, ref_hi) and lo.dtype == np.asarray(ref_lo).dtype
    kept = tails.tails["t"].kept
    assert kept is not None and kept.size <= tails.tails["t"].capacity  # never every value


def test_too_many_values_to_keep_needs_two_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_ranges, "TAIL_BUDGET_BYTES", 1000)
    with pytest.raises(NeedsTwoPasses):
        PercentileTails(60.0, 2048, 7).add(_feeds("plain")[0])


def test_more_values_than_announced_needs_two_passes() -> None:
    feeds = _feeds("plain")
    tails = PercentileTails(90.0, 2048, expected_feeds=2)
    for feed in feeds:
        tails.add(feed)
    with pytest.raises(NeedsTwoPasses):
        tails.ranges()


def test_values_that_are_not_finite_need_two_passes() -> None:
    x = np.ones((4, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(NeedsTwoPasses):
        PercentileTails(99.9, 2048, 1).add({"t": x})
