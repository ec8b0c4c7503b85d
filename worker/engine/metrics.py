"""The arithmetic of fidelity and accuracy: cosine and SQNR from running sums, top-k counts (the accumulator
and its verdicts are `worker.engine.fidelity` and `core.judge`).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SQNR_CAP_DB = 200.0


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
