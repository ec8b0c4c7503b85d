"""Mode `auto`: try a few recipes, measure each, keep the fastest one within the accuracy budget.

The budget is `accuracy_tolerance` on top-1 when the evaluation data has labels; without labels a
candidate must keep every output's cosine >= POOR_COSINE and SQNR >= POOR_SQNR_DB. Among the
candidates within budget the fastest p50 wins (smaller size breaks ties); when none is within
budget, the most faithful one is returned with a warning saying so."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError
from worker.engine.evaluate import evaluate
from worker.engine.metrics import POOR_COSINE, POOR_SQNR_DB
from worker.engine.quantize import quantize
from worker.engine.results import EvaluationOutcome, QuantizationOutcome
from worker.engine.spec import (
    CalibrationMethod,
    CandidateCallback,
    CandidateProgress,
    DatasetSource,
    EvaluationSpec,
    Mode,
    ProgressCallback,
    QuantizationSpec,
    Stage,
    TensorSpec,
    no_candidate,
    no_progress,
)

SEARCH_LATENCY_RUNS = 20
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Candidate:
    name: str
    changes: dict[str, Any]


CANDIDATES = (
    Candidate("static QDQ, per-channel, MinMax", {"mode": Mode.STATIC, "per_channel": True}),
    Candidate(
        "static QDQ, per-channel, Percentile",
        {"mode": Mode.STATIC, "per_channel": True, "calibration_method": CalibrationMethod.PERCENTILE},
    ),
    Candidate(
        "static QDQ, per-channel, Conv/MatMul/Gemm only",
        {"mode": Mode.STATIC, "per_channel": True, "op_types_to_quantize": COMPUTE_OPS},
    ),
    Candidate("dynamic int8", {"mode": Mode.DYNAMIC}),
    Candidate("float16", {"mode": Mode.FP16}),
)


@dataclass
class Trial:
    candidate: Candidate
    spec: QuantizationSpec
    quantized: QuantizationOutcome | None = None
    measured: EvaluationOutcome | None = None
    error: dict[str, Any] | None = None

    @property
    def p50(self) -> float:
        latency = (self.measured.quantized.get("latency_ms") if self.measured else None) or {}
        return float(latency.get("p50") or float("inf"))

    @property
    def size(self) -> int:
        return int(self.measured.quantized.get("size_bytes", 0)) if self.measured else 0

    def accuracy_drop(self) -> float | None:
        accuracy = self.measured.comparison.get("accuracy") if self.measured else None
        return None if not accuracy else -float(accuracy["delta"])

    def worst_fidelity(self) -> tuple[float, float]:
        outputs = self.measured.comparison.get("outputs", []) if self.measured else []
        cosines = [o["cosine"] for o in outputs if o.get("cosine") is not None] or [0.0]
        sqnrs = [o["sqnr_db"] for o in outputs if o.get("sqnr_db") is not None] or [0.0]
        return min(cosines), min(sqnrs)

    def within_budget(self, tolerance: float) -> bool:
        if self.measured is None:
            return False
        drop = self.accuracy_drop()
        if drop is not None:
            return drop <= tolerance + 1e-12
        cosine, sqnr = self.worst_fidelity()
        return cosine >= POOR_COSINE and sqnr >= POOR_SQNR_DB

    def summary(self, tolerance: float) -> dict[str, Any]:
        cosine, sqnr = self.worst_fidelity() if self.measured else (None, None)
        return {
            "name": self.candidate.name,
            "recipe": {
                k: (list(v) if isinstance(v, tuple) else str(v) if hasattr(v, "value") else v)
                for k, v in self.candidate.changes.items()
            },
            "ok": self.measured is not None,
            "within_budget": self.within_budget(tolerance),
            "size_bytes": self.size or None,
            "p50_ms": None if self.p50 == float("inf") else self.p50,
            "accuracy_drop": self.accuracy_drop(),
            "worst_cosine": cosine,
            "worst_sqnr_db": sqnr,
            "error": self.error,
        }


def choose(trials: Sequence[Trial], tolerance: float) -> tuple[Trial, list[str]]:
    """The fastest trial within budget (smaller size breaks ties), else the most faithful, with a warning."""
    ok = [t for t in trials if t.measured is not None]
    if not ok:
        raise EngineError(
            "quantization_failed",
            "Mode auto tried every candidate recipe and none could be produced; see detail for each error.",
            {"candidates": [t.summary(tolerance) for t in trials]},
        )
    within = [t for t in ok if t.within_budget(tolerance)]
    if within:
        return min(within, key=lambda t: (t.p50, t.size)), []
    best = max(ok, key=lambda t: (-(t.accuracy_drop() or 0.0), t.worst_fidelity()))
    return best, [
        f"No candidate stayed within the accuracy budget ({tolerance:.2%} top-1, or cosine >= {POOR_COSINE} "
        f"and SQNR >= {POOR_SQNR_DB} dB without labels); returning the most faithful one, "
        f"{best.candidate.name}. Consider excluding sensitive nodes or 16-bit activations."
    ]


def _scaled(progress: ProgressCallback, index: int, total: int) -> ProgressCallback:
    """Each candidate's own stages shown as a slice of one long `quantizing` stage."""
    order = (Stage.PREPROCESSING, Stage.CALIBRATING, Stage.QUANTIZING, Stage.EVALUATING)

    def report(stage: Stage, fraction: float) -> None:
        position = order.index(stage) if stage in order else 0
        inner = (position + max(0.0, min(1.0, fraction))) / len(order)
        progress(Stage.QUANTIZING, (index + inner) / total)

    return report


def auto_quantize(
    model_path: Path,
    spec: QuantizationSpec,
    workdir: Path,
    evaluation: EvaluationSpec,
    *,
    calibration: DatasetSource | None,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    reused_calibration: bool = False,
    progress: ProgressCallback = no_progress,
    on_candidate: CandidateCallback = no_candidate,
) -> tuple[QuantizationOutcome, EvaluationOutcome]:
    if calibration is None:
        raise EngineError(
            "invalid_recipe",
            "Mode auto compares static variants and needs calibration data.",
            {"mode": "auto"},
        )
    search_eval = dataclasses.replace(
        evaluation,
        latency_runs=min(evaluation.latency_runs, SEARCH_LATENCY_RUNS),
        warmup_runs=min(evaluation.warmup_runs, 3),
        max_seconds=evaluation.max_seconds / (len(CANDIDATES) + 1),
    )
    base = dataclasses.replace(spec, mode=Mode.STATIC)

    def measure(quantized: Path, how: EvaluationSpec, report: ProgressCallback) -> EvaluationOutcome:
        return evaluate(
            model_path,
            quantized,
            how,
            data=data,
            inputs=inputs,
            reused_calibration=reused_calibration,
            accuracy_tolerance=spec.accuracy_tolerance,
            progress=report,
        )

    trials: list[Trial] = []
    for index, candidate in enumerate(CANDIDATES):
        trial = Trial(candidate, dataclasses.replace(base, **candidate.changes))
        folder = workdir / f"candidate-{index}"
        report = _scaled(progress, index, len(CANDIDATES))
        on_candidate(CandidateProgress(index + 1, len(CANDIDATES), candidate.name))
        try:
            trial.quantized = quantize(model_path, trial.spec, folder, calibration=calibration, progress=report)
            trial.measured = measure(trial.quantized.model_path, search_eval, report)
        except EngineError as exc:
            trial.error = exc.to_dict()
        trials.append(trial)

    best, warnings = choose(trials, spec.accuracy_tolerance)
    for index, trial in enumerate(trials):
        if trial is not best:
            shutil.rmtree(workdir / f"candidate-{index}", ignore_errors=True)

    assert best.quantized is not None
    on_candidate(None)
    progress(Stage.EVALUATING, 0.0)
    measured = measure(best.quantized.model_path, evaluation, progress)
    outcome = best.quantized
    outcome.warnings = [*warnings, *outcome.warnings]
    outcome.details["auto"] = {
        "chosen": best.candidate.name,
        "recipe": best.summary(spec.accuracy_tolerance)["recipe"],
        "candidates": [t.summary(spec.accuracy_tolerance) for t in trials],
        "search_latency_runs": search_eval.latency_runs,
    }
    outcome.preprocessing_steps = [f"auto: chose {best.candidate.name}", *outcome.preprocessing_steps]
    return outcome, measured
