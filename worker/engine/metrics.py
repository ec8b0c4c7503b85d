"""Fidelity and accuracy metrics, accumulated batch by batch (sums, never every sample).

Conventions (they show up in reports, so they are fixed here):
- Cosine similarity and SQNR are computed over all samples of an output taken together (the
  outputs of every batch flattened into one long vector), not averaged per sample: a few
  badly reproduced samples with large values weigh more than many tiny ones, which is what
  "how much of the signal survives" means.
- SQNR is `20*log10(||x|| / ||x - y||)` with x the original's output and y the quantized
  model's. Identical outputs have an infinite SQNR; it is reported as `SQNR_CAP_DB` (a value
  no real float32 computation reaches) so that it stays a finite, comparable number. It is
  clamped to `-SQNR_CAP_DB` on the other side (a zero signal reproduced as non-zero).
- Cosine of two all-zero outputs is 1.0; of an all-zero and a non-zero output, 0.0.
- An output "holds class scores" when each batch of it is a 2-D float array
  [batch, classes] with classes > 1; only then are top-1 agreement and accuracy defined.
- Top-5 accuracy is null when the output has 5 classes or fewer (it would always be 1.0).
- Fidelity is "poor" when cosine < `POOR_COSINE` or SQNR < `POOR_SQNR_DB`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SQNR_CAP_DB = 200.0
POOR_COSINE = 0.99
POOR_SQNR_DB = 20.0


def finite_or_none(value: Any) -> float | None:
    """A plain Python float, or None for None/NaN/inf (JSON has no NaN)."""
    if value is None:
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def sqnr_from_energies(signal: float, error: float) -> float:
    """SQNR in dB from the summed squares of the signal and of the error, capped (module docstring)."""
    if error == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal / error)))


def is_class_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and np.issubdtype(array.dtype, np.floating)


def cosine_from_sums(xx: float, yy: float, xy: float, ee: float) -> float:
    """Cosine of two vectors from the sums of x*x, y*y, x*y and (x-y)^2 over their elements."""
    if ee == 0.0:  # identical (rounding would give 0.9999999999999998)
        return 1.0
    if xx == 0.0 or yy == 0.0:
        return 0.0
    # Rounding can push |cos| a hair past 1.
    return max(-1.0, min(1.0, xy / (math.sqrt(xx) * math.sqrt(yy))))


def cosine_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine of two arrays taken as flat vectors (see the module docstring for zero vectors)."""
    acc = FidelityAccumulator("x")
    acc.add(x, y)
    cos = acc.cosine
    assert cos is not None
    return cos


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """SQNR of `y` as a reproduction of `x`, in dB, capped at +/-SQNR_CAP_DB."""
    acc = FidelityAccumulator("x")
    acc.add(x, y)
    value = acc.sqnr_db
    assert value is not None
    return value


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows of `scores` [n, classes] have their label among their k highest scores.
    Labels outside [0, classes) are never correct."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    k = min(k, scores.shape[1])
    if k == 1:
        return int(np.count_nonzero(np.argmax(scores, axis=1) == labels))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return int(np.count_nonzero((top == labels[:, None]).any(axis=1)))


def top1_agreement(x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows where both score arrays [n, classes] pick the same class."""
    return float(np.mean(np.argmax(x, axis=1) == np.argmax(y, axis=1)))


class FidelityAccumulator:
    """Running sums for one output, so fidelity over any number of samples costs O(1) memory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.elements = 0
        self.batches = 0
        self.xx = 0.0  # sum x^2
        self.yy = 0.0  # sum y^2
        self.xy = 0.0  # sum x*y
        self.ee = 0.0  # sum (x-y)^2
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.nonfinite = 0  # elements where either model produced NaN/inf (left out of the sums)
        self.shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.unsupported_dtype: str | None = None
        self._class_scores = True
        self.agree = 0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            self.unsupported_dtype = str(x.dtype if x.dtype.kind not in "biuf" else y.dtype)
            return
        if x.shape != y.shape:
            self.shape_mismatch = self.shape_mismatch or (tuple(x.shape), tuple(y.shape))
            self._class_scores = False
            return
        self.batches += 1
        if is_class_scores(x) and is_class_scores(y):
            self.agree += int(np.count_nonzero(np.argmax(x, axis=1) == np.argmax(y, axis=1)))
            self.rows += x.shape[0]
        else:
            self._class_scores = False
        xf = x.astype(np.float64, copy=False).reshape(-1)
        yf = y.astype(np.float64, copy=False).reshape(-1)
        finite = np.isfinite(xf) & np.isfinite(yf)
        if not finite.all():
            self.nonfinite += int(finite.size - np.count_nonzero(finite))
            xf = xf[finite]
            yf = yf[finite]
        diff = xf - yf
        self.elements += xf.size
        self.xx += float(np.dot(xf, xf))
        self.yy += float(np.dot(yf, yf))
        self.xy += float(np.dot(xf, yf))
        self.ee += float(np.dot(diff, diff))
        if diff.size:
            absdiff = np.abs(diff)
            self.abs_sum += float(absdiff.sum())
            self.abs_max = max(self.abs_max, float(absdiff.max()))

    @property
    def comparable(self) -> bool:
        return self.elements > 0 and self.shape_mismatch is None and self.unsupported_dtype is None

    @property
    def cosine(self) -> float | None:
        return cosine_from_sums(self.xx, self.yy, self.xy, self.ee) if self.comparable else None

    @property
    def sqnr_db(self) -> float | None:
        return sqnr_from_energies(self.xx, self.ee) if self.comparable else None

    @property
    def max_abs_error(self) -> float | None:
        return self.abs_max if self.comparable else None

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_sum / self.elements if self.comparable else None

    @property
    def top1_agreement(self) -> float | None:
        if not self.comparable or not self._class_scores or self.rows == 0:
            return None
        return self.agree / self.rows

    @property
    def poor(self) -> bool:
        cos, sqnr = self.cosine, self.sqnr_db
        return (cos is not None and cos < POOR_COSINE) or (sqnr is not None and sqnr < POOR_SQNR_DB)

    def to_dict(self) -> dict[str, Any]:
        """The contract's `comparison.outputs[]` item."""
        return {
            "name": self.name,
            "cosine": finite_or_none(self.cosine),
            "sqnr_db": finite_or_none(self.sqnr_db),
            "max_abs_error": finite_or_none(self.max_abs_error),
            "mean_abs_error": finite_or_none(self.mean_abs_error),
            "top1_agreement": finite_or_none(self.top1_agreement),
        }


@dataclass
class AccuracyAccumulator:
    """Top-1/top-5 counts of one model on labelled samples."""

    samples: int = 0
    top1: int = 0
    top5: int = 0
    classes: int = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.classes = max(self.classes, int(scores.shape[1]))
        self.samples += int(labels.shape[0])
        self.top1 += topk_correct(scores, labels, 1)
        self.top5 += topk_correct(scores, labels, 5)

    @property
    def top1_accuracy(self) -> float | None:
        return self.top1 / self.samples if self.samples else None

    @property
    def top5_accuracy(self) -> float | None:
        if not self.samples or self.classes <= 5:
            return None
        return self.top5 / self.samples
