"""Fidelity and accuracy metrics on arrays whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.engine import metrics
from worker.engine.metrics import AccuracyAccumulator, FidelityAccumulator


def test_cosine_of_identical_is_one_and_of_opposite_is_minus_one() -> None:
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    assert metrics.cosine_similarity(x, x) == pytest.approx(1.0)
    assert metrics.cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert metrics.cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    # Scale does not matter to cosine.
    assert metrics.cosine_similarity(x, 3 * x) == pytest.approx(1.0)


def test_cosine_of_zero_vectors() -> None:
    zero = np.zeros(5)
    assert metrics.cosine_similarity(zero, zero) == 1.0
    assert metrics.cosine_similarity(zero, np.ones(5)) == 0.0


def test_sqnr_of_known_noise() -> None:
    x = np.array([3.0, 4.0])  # ||x|| = 5
    y = x + np.array([0.05, 0.0])  # ||x - y|| = 0.05 -> 20*log10(100) = 40 dB
    assert metrics.sqnr_db(x, y) == pytest.approx(40.0)
    rng = np.random.default_rng(1)
    signal = rng.normal(size=100_000)
    noise = rng.normal(size=100_000) * 0.1  # power ratio 100 -> ~20 dB
    assert metrics.sqnr_db(signal, signal + noise) == pytest.approx(20.0, abs=0.1)


def test_sqnr_of_identical_outputs_is_the_cap() -> None:
    x = np.arange(10, dtype=np.float32)
    assert metrics.sqnr_db(x, x) == metrics.SQNR_CAP_DB
    assert math.isfinite(metrics.SQNR_CAP_DB)
    # A zero signal reproduced as non-zero is clamped on the other side.
    assert metrics.sqnr_db(np.zeros(3), np.ones(3)) == -metrics.SQNR_CAP_DB


def test_accumulating_batches_equals_one_pass_over_everything() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    y = x + rng.normal(size=x.shape).astype(np.float32) * 0.05
    whole = FidelityAccumulator("out")
    whole.add(x, y)
    parts = FidelityAccumulator("out")
    for i in range(0, 12, 5):
        parts.add(x[i : i + 5], y[i : i + 5])
    for attr in ("cosine", "sqnr_db", "max_abs_error", "mean_abs_error", "top1_agreement"):
        assert getattr(parts, attr) == pytest.approx(getattr(whole, attr)), attr
    diff = np.abs(x.astype(np.float64) - y)
    assert whole.max_abs_error == pytest.approx(diff.max())
    assert whole.mean_abs_error == pytest.approx(diff.mean())


def test_top1_agreement_on_class_scores() -> None:
    x = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.7], [0.5, 0.4, 0.1]], dtype=np.float32)
    y = np.array([[0.8, 0.2, 0.0], [0.6, 0.3, 0.1], [0.0, 0.2, 0.7], [0.3, 0.6, 0.1]], dtype=np.float32)
    assert metrics.top1_agreement(x, y) == pytest.approx(0.5)
    acc = FidelityAccumulator("logits")
    acc.add(x[:2], y[:2])
    acc.add(x[2:], y[2:])
    assert acc.top1_agreement == pytest.approx(0.5)


def test_top1_agreement_is_null_for_outputs_that_are_not_class_scores() -> None:
    for shape in [(4,), (4, 1), (2, 3, 4)]:
        acc = FidelityAccumulator("o")
        x = np.ones(shape, dtype=np.float32)
        acc.add(x, x)
        assert acc.top1_agreement is None, shape
        assert acc.cosine == pytest.approx(1.0)
    ints = FidelityAccumulator("ids")
    ints.add(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    assert ints.top1_agreement is None


def test_topk_accuracy() -> None:
    scores = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # ranking: 6 5 4 3 2 1 0
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # ranking: 0 1 2 3 4 5 6
            [0.0, 0.1, 1.0, 0.2, 0.3, 0.4, 0.5],  # label 0 ranks last
        ]
    )
    labels = np.array([6, 4, 0])
    assert metrics.topk_correct(scores, labels, 1) == 1  # only row 0
    assert metrics.topk_correct(scores, labels, 5) == 2  # rows 0 and 1 (its label ranks 5th)
    acc = AccuracyAccumulator()
    acc.add(scores, labels)
    assert acc.top1_accuracy == pytest.approx(1 / 3)
    assert acc.top5_accuracy == pytest.approx(2 / 3)


def test_top5_is_null_with_five_classes_or_fewer_and_labels_out_of_range_are_wrong() -> None:
    acc = AccuracyAccumulator()
    acc.add(np.eye(4), np.array([0, 1, 2, 7]))
    assert acc.top1_accuracy == pytest.approx(0.75)
    assert acc.top5_accuracy is None


def test_mismatched_shapes_and_non_finite_values() -> None:
    acc = FidelityAccumulator("o")
    acc.add(np.ones((2, 3)), np.ones((2, 4)))
    assert acc.to_dict() == {
        "name": "o",
        "cosine": None,
        "sqnr_db": None,
        "max_abs_error": None,
        "mean_abs_error": None,
        "top1_agreement": None,
    }
    nan = FidelityAccumulator("n")
    nan.add(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]))
    assert nan.nonfinite == 1
    assert nan.cosine == pytest.approx(1.0)
    assert metrics.finite_or_none(float("nan")) is None
    assert metrics.finite_or_none(float("inf")) is None
    assert metrics.finite_or_none(np.float32(1.5)) == 1.5
    assert type(metrics.finite_or_none(np.float32(1.5))) is float


def test_poor_fidelity_thresholds() -> None:
    x = np.random.default_rng(3).normal(size=1000)
    good = FidelityAccumulator("good")
    good.add(x, x * 1.001)
    assert not good.poor
    bad = FidelityAccumulator("bad")
    bad.add(x, x + np.random.default_rng(4).normal(size=1000) * 0.3)  # ~10 dB
    assert bad.poor
