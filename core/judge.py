"""The one judge of fidelity: whether an output is faithful, whether an accuracy drop is beyond the
tolerance, and whether a model is within its budget. The engine asks it for every verdict it records (the
search, the evaluation's per-output rows, the warnings); the report only reads those verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence

from core.recipe import FidelityMetric, OutputJudging

DEFAULT_FLOOR = 0.99  # cosine, agreement and detection F1
DEFAULT_SQNR_FLOOR_DB = 20.0
# Float noise: a drop of exactly the tolerance (0.80 -> 0.79 at 0.01 is 0.010000000000000009) is allowed,
# and a value of exactly the floor meets it.
EPSILON = 1e-9


def floor_of(spec: OutputJudging | None, metric: FidelityMetric | str) -> float:
    """The floor an output's `metric` must reach: the recipe's floor for it (`fidelity.per_output.<name>.min`,
    else `fidelity.min`: `FidelitySpec.judging` resolves which), else the default."""
    if spec is not None and spec.min is not None:
        return float(spec.min)
    return DEFAULT_SQNR_FLOOR_DB if metric == FidelityMetric.SQNR else DEFAULT_FLOOR


def faithful(value: float | None, floor: float) -> bool:
    """Does an output's value of its metric reach its floor? An output that could not be measured does not."""
    return value is not None and math.isfinite(value) and value >= floor - EPSILON


def beyond_tolerance(drop: float | None, tolerance: float) -> bool:
    """Is a top-1 drop (a fraction; negative is a gain) more than the recipe accepts?"""
    return drop is not None and drop > tolerance + EPSILON


def within_budget(
    budgeted: Sequence[bool], accuracy_drop: float | None, tolerance: float, *, labels_decide: bool
) -> bool:
    """A model's verdict from its budgeted outputs' verdicts and its top-1 drop. With labels and no explicit
    fidelity budget in the recipe (`labels_decide`), the drop decides alone."""
    if accuracy_drop is not None:
        if beyond_tolerance(accuracy_drop, tolerance):
            return False
        if labels_decide:
            return True
    return bool(budgeted) and all(budgeted)


# A quantized model must be at least this much faster than float (p50) to be worth shipping for latency:
# less is within the noise of interleaved timings.
FASTER_MARGIN = 0.05


def ships_quantized(
    within_budget: bool | None, speedup: float | None, *, objective: str, margin: float = FASTER_MARGIN
) -> bool:
    """On one worker class: is the quantized model the one to ship there, or the float model? Within the
    fidelity budget and, for the latency objective, faster than float there by at least `margin`."""
    if within_budget is not True:
        return False
    if objective == "size":
        return True
    return speedup is not None and math.isfinite(speedup) and speedup >= 1.0 + margin - EPSILON
