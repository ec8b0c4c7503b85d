"""Fidelity and accuracy metrics on arrays whose answers are known by hand: the one accumulator
(`fidelity.OutputAccumulator`) and the arithmetic under it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.engine import metrics
from worker.engine.fidelity import OutputAccumulator, OutputKind, output_kind
from worker.engine.metrics import AccuracyAccumulator


def _acc(x: np.ndarray, y: np.ndarray, name: str = "out") -> OutputAccumulator:
    acc = OutputAccumulator(name, output_kind(np.asarray(x), token_model=False))
    acc.add(x, y)
    return acc


def cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    return _acc(x, y).cosine


def sqnr(x: np.ndarray, y: np.ndarray) -> float | None:
    return _acc(x, y).sqnr_db


def test_cosine_of_identical_is_one_and_of_opposite_is_minus_one() -> None:
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    assert cosine(x, x) == pytest.approx(1.0)
    assert cosine(x, -x) == pytest.approx(-1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    # Scale does not matter to cosine.
    assert cosine(x, 3 * x) == pytest.approx(1.0)


def test_cosine_of_zero_vectors() -> None:
    zero = np.zeros(5)
    assert cosine(zero, zero) == 1.0
    assert cosine(zero, np.ones(5)) == 0.0


def test_sqnr_of_known_noise() -> None:
    x = np.array([3.0, 4.0])  # ||x|| = 5
    y = x + np.array([0.05, 0.0])  # ||x - y|| = 0.05 -> 20*log10(100) = 40 dB
    assert sqnr(x, y) == pytest.approx(40.0)
    rng = np.random.default_rng(1)
    signal = rng.normal(size=100_000)
    noise = rng.normal(size=100_000) * 0.1  # power ratio 100 -> ~20 dB
    assert sqnr(signal, signal + noise) == pytest.approx(20.0, abs=0.1)


def test_sqnr_of_identical_outputs_is_the_cap() -> None:
    x = np.arange(10, dtype=np.float32)
    assert sqnr(x, x) == metrics.SQNR_CAP_DB
    assert math.isfinite(metrics.SQNR_CAP_DB)
    # A zero signal reproduced as non-zero is clamped on the other side.
    assert sqnr(np.zeros(3), np.ones(3)) == -metrics.SQNR_CAP_DB


def test_accumulating_batches_equals_one_pass_over_everything() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    y = x + rng.normal(size=x.shape).astype(np.float32) * 0.05
    whole = _acc(x, y)
    parts = OutputAccumulator("out", whole.kind)
    for i in range(0, 12, 5):
        parts.add(x[i : i + 5], y[i : i + 5])
    for attr in ("cosine", "mean_cosine", "sqnr_db", "max_abs_error", "mean_abs_error", "agreement"):
        assert getattr(parts, attr) == pytest.approx(getattr(whole, attr)), attr
    diff = np.abs(x.astype(np.float64) - y)
    assert whole.max_abs_error == pytest.approx(diff.max())
    assert whole.mean_abs_error == pytest.approx(diff.mean())


def test_top1_agreement_on_class_scores() -> None:
    x = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.7], [0.5, 0.4, 0.1]], dtype=np.float32)
    y = np.array([[0.8, 0.2, 0.0], [0.6, 0.3, 0.1], [0.0, 0.2, 0.7], [0.3, 0.6, 0.1]], dtype=np.float32)
    acc = OutputAccumulator("logits", OutputKind.CLASSIFICATION)
    acc.add(x[:2], y[:2])
    acc.add(x[2:], y[2:])
    assert acc.agreement == pytest.approx(0.5)


def test_agreement_is_null_for_outputs_that_are_not_scores() -> None:
    for shape in [(4,), (4, 1)]:
        x = np.ones(shape, dtype=np.float32)
        acc = _acc(x, x)
        assert acc.agreement is None, shape
        assert acc.cosine == pytest.approx(1.0)
    assert _acc(np.ones((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32)).agreement == 1.0  # per position
    assert _acc(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])).agreement is None  # integers


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
    row = _acc(np.ones((2, 3)), np.ones((2, 4)), "o").judged(None)
    assert (row.cosine, row.sqnr_db, row.max_abs_error, row.mean_abs_error, row.top1_agreement) == (None,) * 5
    assert row.faithful is None and not row.budgeted and row.problem is not None and "[2, 4]" in row.problem
    nan = _acc(np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]), "n")
    assert nan.nonfinite == 1
    assert nan.cosine == pytest.approx(1.0)
    assert metrics.finite_or_none(float("nan")) is None
    assert metrics.finite_or_none(float("inf")) is None
    assert metrics.finite_or_none(np.float32(1.5)) == 1.5
    assert type(metrics.finite_or_none(np.float32(1.5))) is float


def test_the_judge_reads_the_floor_of_the_output_kind() -> None:
    x = np.random.default_rng(3).normal(size=1000)
    good = _acc(x, x * 1.001, "good").judged(None)
    assert good.metric == "cosine" and good.min == 0.99 and good.faithful is True
    bad = _acc(x, x + np.random.default_rng(4).normal(size=1000) * 0.3, "bad").judged(None)  # ~10 dB
    assert bad.faithful is False
