"""Mode auto: the fastest (or, with objective `size`, the smallest) model within the fidelity budget,
or the plain verdict that float is best on this CPU.

The search has the three parts NNCF's accuracy control has: a ranker (`sensitivity`), an evaluator
(`fidelity.FidelityEvaluator` for the budget, `evaluate.LatencyMeter` for speed, injectable) and
this loop:
0. With objective latency, the pre-flight (`preflight`): float against int8 per layer of the model on this
   CPU (cached per CPU and ONNX Runtime version), which predicts each recipe's speedup. A candidate or step
   predicted clearly slower than float (below PRUNE_BELOW) is not tried (a step's prediction is scaled by what
   its start measured); S8S8 is offered only where it is predicted fast.
1. Candidates (`candidates`), each quantized from one shared pre-processing and calibration per
   method, scored on the evaluation data and timed against float with few runs.
2. Mixed precision from the best candidates that miss the budget yet would win: rank what hurts
   (tensors for static QDQ, ranked on the QDQ twin of a QOperator start; nodes for dynamic), order the
   groups by damage per share of time their return to float costs (the pre-flight's), return the top
   groups to float in doubling steps until the budget holds, then bisect to the fewest; also try 16-bit
   activations on the worst tensors, and leaving the worst elementwise op type in float. Every step is
   re-measured.
3. Finalists re-timed with the full run count, all in one loop interleaved with float. With objective latency
   a model must be faster than float beyond noise (FASTER_MARGIN) to be chosen; otherwise the
   verdict is `keep_float` and the artifact is the smallest in-budget model that measured not
   slower than float (p50 ratio >= 1) in NOT_SLOWER_CONFIRMATIONS full-count timings in a row,
   or the float model itself when there is none.
Run counts grow for small models (SEARCH_TIMING_SECONDS, FINAL_TIMING_SECONDS): ten runs of a
sub-millisecond model are noise. Speed is compared as each trial's speedup over float (measured
interleaved), never as p50s taken at different times. Everything stops starting new work at
`max_search_seconds`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from core.errors import ErrorInfo, RuleError
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.judge import FASTER_MARGIN
from core.lifecycle import Stage
from core.model import TensorSpec
from core.progress import CandidateProgress, Note
from core.recipe import Mode, Objective, QuantFormat, Recipe
from core.result import (
    AutoSearch,
    AutoTrial,
    PrunedCandidate,
    QuantizationFacts,
    SensitiveNode,
    SensitivitySummary,
)
from worker.engine import streaming
from worker.engine.calibration import CalibrationResult, default_op_types
from worker.engine.candidates import COMPUTE_OPS, Candidate, candidates_for, int8_settings
from worker.engine.checks import ModelFacts, model_facts, model_size
from worker.engine.data import model_inputs
from worker.engine.evaluate import SLOWER_NOISE, Evaluation, LatencyMeter, evaluate, size_on_disk
from worker.engine.fidelity import FidelityEvaluator, Score, is_token_model
from worker.engine.machine import int8_kernels, machine_info, usable_cores
from worker.engine.metrics import finite_or_none
from worker.engine.preflight import (
    NOT_WORTH_BELOW,
    KernelTimer,
    OrtKernelTimer,
    PreflightResult,
    cache_for,
    preflight,
)
from worker.engine.preprocess import Prepared
from worker.engine.quantize import OUTPUT_NAME, Reuse, calibrate_prepared, preparation, prepare_for, quantize
from worker.engine.results import QuantizationOutcome
from worker.engine.sensitivity import SensitivityRanking, confirm_by_ablation, dynamic_sensitivity, static_sensitivity
from worker.engine.spec import NoteCallback, ProgressCallback, no_note, no_progress

SEARCH_LATENCY_RUNS = 10  # per candidate and step; finalists get the job's full count
# A few runs of a sub-millisecond model are noise: run counts grow until each comparison times each
# model for at least this long (the search's and the final count), up to RUNS_GROWTH times the count.
SEARCH_TIMING_SECONDS = 0.25
FINAL_TIMING_SECONDS = 1.0
RUNS_GROWTH = 20
# A keep_float artifact must measure at least as fast as float (p50 ratio >= 1) in this many
# full-count interleaved timings in a row; otherwise the artifact is the float model itself.
NOT_SLOWER_CONFIRMATIONS = 2
FINALISTS = 3
MAX_STARTS = 4  # candidates the mixed-precision search starts from, at most (time permitting)
# The pre-flight gets this share of max_search_seconds, at most PREFLIGHT_SECONDS; untimed layers count as
# neither faster nor slower.
PREFLIGHT_SHARE = 0.1
PREFLIGHT_SECONDS = 60.0
# A candidate or step predicted below this speedup is not tried (with objective latency).
PRUNE_BELOW = NOT_WORTH_BELOW
# Ranking fallback groups: time costs below this share of the model's predicted time count as this much (a
# nearly free group is not worth an unbounded lead over a damaging one).
COST_FLOOR = 0.02
SEARCH_SAMPLES = 64  # evaluation samples each candidate and step is scored on
SENSITIVITY_SAMPLES = 16
ABLATION_SAMPLES = 8
FLOAT_NAME = "float (the original model)"
# Float's outputs on the evaluation batches, for a big model's search (one session at a time), in the workdir.
REFERENCE_FOLDER = "reference"


class Verdict(StrEnum):
    QUANTIZED = "quantized"
    KEEP_FLOAT = "keep_float"


class Meter(Protocol):
    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        """(float p50 ms, candidate p50 ms), timed interleaved."""
        ...

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        """(float p50 ms, each candidate's p50 ms), all timed in one interleaved loop."""
        ...


def recipe_of(spec: Recipe) -> dict[str, Any]:
    """A recipe (JSON) that a plain static/dynamic/... job reproduces this spec with."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name in ("objective", "fidelity", "max_search_seconds"):
            continue
        value = getattr(spec, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, StrEnum):
            value = str(value)
        out[f.name] = value
    return out


@dataclass
class Trial:
    """One measured model: a whole-model candidate or a step of the mixed-precision search."""

    name: str
    stage: str  # "candidate" | "step"
    spec: Recipe
    folder: Path
    searchable: bool = False
    parent: str | None = None
    outcome: QuantizationOutcome | None = None
    score: Score | None = None
    float_p50: float | None = None
    p50: float | None = None
    runs: int = 0
    size: int | None = None
    error: ErrorInfo | None = None
    not_slower_checks: list[float] = field(default_factory=list)  # keep_float's confirmations
    predicted: float | None = None  # the pre-flight's speedup for this recipe

    @property
    def ok(self) -> bool:
        return self.outcome is not None and self.score is not None and self.error is None

    @property
    def within(self) -> bool:
        return self.ok and self.score is not None and self.score.within_budget

    @property
    def speedup(self) -> float | None:
        if self.p50 is None or self.float_p50 is None or self.p50 <= 0:
            return None
        return self.float_p50 / self.p50

    def faster(self) -> bool:
        s = self.speedup
        return s is not None and s >= 1.0 + FASTER_MARGIN

    def not_slower(self) -> bool:
        s = self.speedup
        return s is not None and s >= 1.0 - SLOWER_NOISE

    def measured(self) -> AutoTrial:
        """This trial as the result records it."""
        score = self.score
        return AutoTrial(
            name=self.name,
            stage="step" if self.stage == "step" else "candidate",
            parent=self.parent,
            recipe=recipe_of(self.spec),
            p50_ms=self.p50,
            float_p50_ms=self.float_p50,
            speedup=self.speedup,
            latency_runs=self.runs,
            size_bytes=self.size,
            metric=score.metric if score else None,
            fidelity=finite_or_none(score.fidelity) if score else None,
            accuracy_drop=finite_or_none(score.accuracy_drop) if score else None,
            within_budget=self.within,
            not_slower_checks=list(self.not_slower_checks),
            error=self.error,
            predicted_speedup=None if self.predicted is None else round(self.predicted, 3),
        )


@dataclass
class Search:
    """The loop's state: shared pre-processing and calibration, trials, time."""

    model_path: Path
    spec: Recipe
    workdir: Path
    facts: ModelFacts
    inputs: list[TensorSpec]
    calibration: DatasetSource | None
    evaluator: FidelityEvaluator
    meter: Meter
    search_runs: int
    final_runs: int
    clock: Callable[[], float]
    deadline: float
    progress: ProgressCallback
    note: NoteCallback
    prepared: dict[tuple[Any, ...], Prepared] = field(default_factory=dict)
    calibrations: dict[tuple[Any, ...], CalibrationResult] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    sensitivities: list[SensitivityRanking] = field(default_factory=list)
    finalists: list[str] = field(default_factory=list)  # re-timed with the full count to decide
    out_of_time: bool = False
    steps_done: int = 0
    preflight: PreflightResult | None = None
    rankings: dict[Recipe, SensitivityRanking] = field(default_factory=dict)  # by the QDQ recipe ranked
    refined: dict[Any, Any] = field(default_factory=dict)  # per-tensor ranges and bias shifts (quantize.refine)
    apart: bool = False  # one session at a time: models timed one after the other, not interleaved
    # A model on the streaming path: no mixed precision, whose sensitivity ranking holds the float and the
    # quantized sessions together and asks for every weight's dequantized output (5x the model on 2 GB).
    whole_models_only: bool = False
    skipped_mixed_precision: bool = False

    def time_left(self) -> bool:
        if self.clock() >= self.deadline:
            self.out_of_time = True
        return not self.out_of_time

    # -- shared pre-processing and calibration ------------------------------------------------

    def prepared_for(self, spec: Recipe) -> Prepared:
        key = preparation(spec, self.facts)
        prepared = self.prepared.get(key)
        if prepared is None:
            prepared = prepare_for(
                self.model_path, spec, self.facts, self.workdir / f"prep-{len(self.prepared)}", no_progress
            )
            self.prepared[key] = prepared
        return prepared

    def reuse_for(self, spec: Recipe) -> Reuse:
        key = preparation(spec, self.facts)
        prepared = self.prepared_for(spec)
        if spec.mode != Mode.STATIC or self.calibration is None:
            return Reuse(prepared, refined=self.refined)
        cal_key = (
            key,
            str(spec.calibration_method),
            spec.percentile,
            spec.symmetric_activations,
            spec.calibration_batch_size,
            spec.max_calibration_samples,
        )
        cal = self.calibrations.get(cal_key)
        if cal is None:
            # Every op type's tensors, so that variants quantizing fewer op types reuse the ranges.
            full = dataclasses.replace(spec, op_types_to_quantize=None)
            # As a plain job calibrates: a streamed model's calibrator reads the graph alone.
            folder = self.workdir / f"calib-{len(self.calibrations)}"
            cal = calibrate_prepared(prepared, full, self.calibration, self.inputs, folder, no_progress)
            self.calibrations[cal_key] = cal
        return Reuse(prepared, cal, self.refined)

    # -- one measured model ----------------------------------------------------------------

    def run(
        self,
        name: str,
        stage: str,
        spec: Recipe,
        *,
        searchable: bool = False,
        parent: str | None = None,
        predicted: float | None = None,
    ) -> Trial:
        trial = Trial(name, stage, spec, self.workdir / f"trial-{len(self.trials)}", searchable, parent)
        trial.predicted = predicted
        self.trials.append(trial)
        try:
            reuse = self.reuse_for(spec)
            if spec.transformer_fusion and not reuse.prepared.fused_ops:
                raise RuleError(
                    "not_applicable", "ONNX Runtime's transformer fusion found nothing to fuse in this model.", {}
                )
            trial.outcome = quantize(self.model_path, spec, trial.folder, calibration=self.calibration, reuse=reuse)
            trial.size = size_on_disk(trial.outcome.model_path)
            trial.score = self.evaluator.score(trial.outcome.model_path)
            trial.float_p50, trial.p50 = self.meter.compare(trial.outcome.model_path, self.search_runs)
            trial.runs = self.search_runs
        except RuleError as exc:
            trial.error = exc.info
            trial.outcome = None
            shutil.rmtree(trial.folder, ignore_errors=True)
        return trial

    def step(self, start: Trial, name: str, **changes: Any) -> Trial | None:
        """The step measured, or None when the pre-flight says it cannot beat float (then it is not tried)."""
        spec = dataclasses.replace(start.spec, **changes)
        predicted = self.predicted_step(start, spec)
        if predicted is not None and predicted < PRUNE_BELOW and self.spec.objective == Objective.LATENCY:
            self.prune(name, predicted, f"predicted {predicted:.2f}x of float ({start.name} measured, scaled)")
            return None
        self.steps_done += 1
        self.note(Note(f"search step {self.steps_done}: {name}"))
        self.progress(Stage.QUANTIZING, min(0.95, 0.5 + 0.03 * self.steps_done))
        trial = self.run(name, "step", spec, parent=start.name, predicted=predicted)
        if not trial.within:
            self.discard(trial)
        return trial

    # -- the pre-flight's predictions ------------------------------------------------------------

    def predicted_step(self, start: Trial, spec: Recipe) -> float | None:
        """A step's speedup as its start measured it, times the change the pre-flight predicts: the one-layer
        models miss the whole graph's fusions, the ratio between two recipes of one graph less so."""
        if self.preflight is None or start.speedup is None:
            return None
        mine, theirs = self.preflight.predict(spec), self.preflight.predict(start.spec)
        return None if mine is None or not theirs else start.speedup * mine / theirs

    def prune(self, name: str, predicted: float | None, reason: str) -> None:
        if self.preflight is not None:
            rounded = None if predicted is None else round(predicted, 3)
            self.preflight.pruned.append(PrunedCandidate(name=name, predicted_speedup=rounded, reason=reason))

    def exclusion_cost(self, start: Trial, group: Sequence[str]) -> float | None:
        """The share of time returning `group` to float adds to `start` (negative: saves), by the pre-flight."""
        return None if self.preflight is None else self.preflight.exclusion_cost(start.spec, group)

    def discard(self, trial: Trial) -> None:
        shutil.rmtree(trial.folder, ignore_errors=True)

    # -- choosing ------------------------------------------------------------------------------

    def better(self, a: Trial, b: Trial | None) -> bool:
        """Is `a` preferable to `b` under the objective (both within budget)? Speed compares speedups,
        not p50s: each trial was timed interleaved with float, so its ratio is free of the machine's
        drift between trials."""
        if b is None:
            return True
        if self.spec.objective == Objective.SIZE:
            return (a.size or 0, -(a.speedup or 0.0)) < (b.size or 0, -(b.speedup or 0.0))
        return (-(a.speedup or 0.0), a.size or 0) < (-(b.speedup or 0.0), b.size or 0)

    def confirmed_not_slower(self, trial: Trial, runs: int) -> bool:
        """Timed NOT_SLOWER_CONFIRMATIONS times in a row with `runs` runs, interleaved against float:
        was its p50 at most float's every time? The speedups go to `not_slower_checks`; the trial's
        own timing stays the one the verdict was decided on."""
        assert trial.outcome is not None
        for _ in range(NOT_SLOWER_CONFIRMATIONS):
            float_p50, p50 = self.meter.compare(trial.outcome.model_path, runs)
            speedup = float_p50 / p50 if p50 > 0 else 0.0
            trial.not_slower_checks.append(speedup)
            if speedup < 1.0:
                return False
        return True

    def retime(self, trial: Trial, runs: int) -> None:
        """Time `trial` again against float, interleaved, with `runs` runs."""
        assert trial.outcome is not None
        trial.float_p50, trial.p50 = self.meter.compare(trial.outcome.model_path, runs)
        trial.runs = runs

    @property
    def float_size(self) -> int:
        """The float model's size on disk, external data included."""
        return model_size(self.model_path, self.facts)

    def eligible(self, trial: Trial) -> bool:
        """Could win: within budget and beating float on the objective."""
        if not trial.within:
            return False
        if self.spec.objective == Objective.SIZE:
            return trial.size is not None and trial.size < self.float_size
        return trial.faster()

    def best_eligible(self) -> Trial | None:
        best: Trial | None = None
        for t in self.trials:
            if self.eligible(t) and self.better(t, best):
                best = t
        return best


# --------------------------------------------------------------------------------------------
# Mixed precision


def _confirmed_best(search: Search) -> Trial | None:
    """The best eligible trial, re-timed with the full count: a few search runs of a model that is
    not really faster (float16 on a CPU) must not stop the search from starting where it would win."""
    while True:
        best = search.best_eligible()
        if best is None or best.runs >= search.final_runs or search.spec.objective == Objective.SIZE:
            return best
        search.note(Note(f"timing {best.name} with {search.final_runs} runs"))
        search.retime(best, search.final_runs)


def _twin_key(spec: Recipe) -> Recipe:
    """QDQ and QOperator twins share one key (one calibration, one ranking)."""
    return dataclasses.replace(spec, format=QuantFormat.QDQ) if spec.mode == Mode.STATIC else spec


def _start_points(search: Search) -> list[Trial]:
    best = _confirmed_best(search)
    pool = [t for t in search.trials if t.searchable and t.ok and not t.within]
    # Of two twins, the search starts from the one closer to the budget (then the faster): the same ranking
    # would return the same groups to float from both, and the closer one needs fewer.
    closest: dict[Recipe, Trial] = {}

    def nearness(t: Trial) -> tuple[float, float]:
        return (t.score.margin() if t.score is not None else -math.inf, t.speedup or 0.0)

    for t in pool:
        other = closest.get(_twin_key(t.spec))
        if other is None or nearness(t) > nearness(other):
            closest[_twin_key(t.spec)] = t
    pool = [t for t in pool if closest[_twin_key(t.spec)] is t]
    if search.spec.objective == Objective.SIZE:
        pool = [t for t in pool if t.size is not None and (best is None or t.size < (best.size or 0))]
        pool.sort(key=lambda t: t.size or 0)
    else:
        # At least as fast as float in the search's few runs: noise can hide a few percent.
        pool = [t for t in pool if (t.speedup or 0) >= 1.0 and (best is None or (t.speedup or 0) > (best.speedup or 0))]
        pool.sort(key=lambda t: -(t.speedup or 0.0))
    return pool[:MAX_STARTS]


def _ranked(search: Search, start: Trial) -> tuple[Recipe, Path, str]:
    """The recipe, model and name the ranking reads: the start itself, or for a QOperator start its QDQ twin
    (same calibration and nodes; the ranking needs Q/DQ pairs, and nodes_to_exclude works in both formats),
    the twin candidate's model when there is one."""
    assert start.outcome is not None
    if start.spec.mode != Mode.STATIC or start.spec.format == QuantFormat.QDQ:
        return start.spec, start.outcome.model_path, start.name
    twin = dataclasses.replace(start.spec, format=QuantFormat.QDQ)
    for trial in search.trials:
        if trial.spec == twin and trial.outcome is not None and trial.outcome.model_path.is_file():
            return twin, trial.outcome.model_path, trial.name
    made = quantize(
        search.model_path,
        twin,
        search.workdir / f"twin-{len(search.rankings)}",
        calibration=search.calibration,
        reuse=search.reuse_for(twin),
    )
    return twin, made.model_path, f"{start.name} (its QDQ twin)"


def _sensitivity(search: Search, start: Trial) -> SensitivityRanking:
    """The ranking of what quantization damages in `start`, made once per QDQ recipe ranked."""
    ranked_spec, ranked_model, name = _ranked(search, start)
    known = search.rankings.get(ranked_spec)
    if known is not None:
        return known
    reuse = search.reuse_for(ranked_spec)
    batches = list(search.evaluator.subset(SENSITIVITY_SAMPLES).batches())
    if start.spec.mode == Mode.DYNAMIC:
        search.rankings[ranked_spec] = dynamic_sensitivity(
            reuse.prepared.path,
            batches,
            candidate=name,
            op_types=[op for op in (start.spec.op_types_to_quantize or ("MatMul", "Gemm")) if op in ("MatMul", "Gemm")],
            per_channel=start.spec.per_channel,
            reduce_range=start.spec.reduce_range,
            nodes_to_exclude=start.spec.nodes_to_exclude or (),
            threads=search.evaluator.threads,
            deadline=search.deadline,
            clock=search.clock,
        )
        return search.rankings[ranked_spec]
    sens = static_sensitivity(
        reuse.prepared.path,
        ranked_model,
        batches,
        candidate=name,
        threads=search.evaluator.threads,
        deadline=search.deadline,
        clock=search.clock,
    )
    quick = search.evaluator.subset(ABLATION_SAMPLES)

    def closeness(path: Path) -> float:
        # Mean cosine is continuous where agreement on a few samples is not.
        outputs = quick.score(path).budgeted
        return min((o.mean_cosine for o in outputs if o.mean_cosine is not None), default=0.0)

    confirm_by_ablation(
        sens, reuse.prepared.path, ranked_model, closeness, deadline=search.deadline, clock=search.clock
    )
    search.rankings[ranked_spec] = sens
    return sens


def rank_groups(
    scored: Sequence[tuple[Sequence[str], float, bool]], cost: Callable[[Sequence[str]], float | None]
) -> list[list[str]]:
    """Fallback groups in the order to return them to float: groups whose damage ablation confirmed on the
    output first, then the rest; within each, most damage per share of time the return to float costs
    (`cost`: that share, negative when it saves time; None: unknown, taken as free), costs below COST_FLOOR
    counting as COST_FLOOR. At equal damage the cheaper group comes first, and of two in-budget sets the one
    built from cheaper groups is the faster."""
    keyed = []
    for index, (group, damage, confirmed) in enumerate(scored):
        share = cost(group) or 0.0
        keyed.append(((not confirmed, -damage / max(COST_FLOOR, share), share, index), list(group)))
    return [group for _, group in sorted(keyed, key=lambda entry: entry[0])]


def _exclusion_sets(groups: Sequence[Sequence[str]], known: set[str], base: Sequence[str]) -> list[list[str]]:
    """Cumulative unions of the ranked groups (names the original model has), each one larger."""
    sets: list[list[str]] = []
    current = list(base)
    for group in groups:
        added = [n for n in group if n in known and n not in current]
        if added:
            current = [*current, *added]
            sets.append(list(current))
    return sets


def _mixed_precision(search: Search, start: Trial) -> None:
    if _uncorrected_step(search, start):
        return
    if search.whole_models_only:
        search.skipped_mixed_precision = True
        return
    search.note(Note(f"ranking sensitivity of {start.name}"))
    try:
        sens = _sensitivity(search, start)
    except RuleError:  # a QOperator start whose QDQ twin could not be made: nothing to rank
        return
    if not any(s is sens for s in search.sensitivities):
        search.sensitivities.append(sens)
    groups = rank_groups(sens.scored_groups(), lambda group: search.exclusion_cost(start, group))
    sets = _exclusion_sets(groups, set(search.facts.node_names), start.spec.nodes_to_exclude or ())
    if not sets:
        return

    def attempt(k: int) -> Trial | None:
        exclude = sets[k - 1]
        return search.step(start, f"{start.name}, {len(exclude)} node(s) in float", nodes_to_exclude=tuple(exclude))

    best = search.best_eligible()
    lo, hi, k = 0, None, 1
    while search.time_left():
        t = attempt(k)
        if t is None:  # predicted slower than float: more float only gets slower
            break
        if t.within:
            hi = k
            break
        if search.spec.objective == Objective.LATENCY and t.ok and not _can_still_win(search, t, best):
            break
        if k == len(sets):
            break
        lo, k = k, min(2 * k, len(sets))
    while hi is not None and hi - lo > 1 and search.time_left():
        mid = (lo + hi) // 2
        t = attempt(mid)
        if t is not None and t.within:
            hi = mid
        else:
            lo = mid
    _sixteen_bit_step(search, start, sens, hi)
    _op_type_step(search, start, sens)


def _uncorrected_step(search: Search, start: Trial) -> bool:
    """A start with corrected biases, as calibrated instead: the correction lowers the output error on the
    whole, yet on a near tie (class scores a hair apart) any change can flip an argmax the plain model kept.
    One step, at the start's speed; True when it is within the budget (nothing left to search from here)."""
    if start.spec.mode != Mode.STATIC or not start.spec.corrects_bias or not search.time_left():
        return False
    outcome = start.outcome
    facts = outcome.facts.bias_correction if outcome is not None else None
    if facts is None or not facts.applied:
        return False
    step = search.step(start, f"{start.name}, biases as calibrated", bias_correction=False)
    return step is not None and step.within


def _can_still_win(search: Search, step: Trial, best: Trial | None) -> bool:
    """More float only gets slower: is this step faster than float, and than the best model already
    within the budget?"""
    return (step.speedup or 0.0) >= 1.0 and (best is None or search.better(step, best))


def _sixteen_bit_step(search: Search, start: Trial, sens: SensitivityRanking, fitting: int | None) -> None:
    """16-bit activations on the tensors the fewest-nodes fallback returned to float (or the worst
    few): kept only if it measures better than leaving them in float."""
    if start.spec.mode != Mode.STATIC or start.spec.format != QuantFormat.QDQ or not search.time_left():
        return
    ranked = [t for t in sens.tensors if t.kind == "activation" and ((t.gain or 0) > 0 or t.score > 0.05)]
    tensors = tuple(t.tensor for t in ranked[: max(1, fitting or 3)])
    if tensors:
        search.step(start, f"{start.name}, 16-bit activations on {len(tensors)} tensor(s)", sixteen_bit_tensors=tensors)


def _op_type_step(search: Search, start: Trial, sens: SensitivityRanking) -> None:
    """Leave the elementwise op type whose activations hurt most in float (when it dominates)."""
    if start.spec.mode != Mode.STATIC or not sens.op_types or not search.time_left():
        return
    total = sum(float(r["score"]) for r in sens.op_types) or 1.0
    top = sens.op_types[0]
    if top["op_type"] in COMPUTE_OPS or float(top["score"]) < 0.5 * total:
        return
    present = [op for op in default_op_types(start.spec) if search.facts.op_counts.get(op) and op != top["op_type"]]
    if present:
        search.step(start, f"{start.name}, {top['op_type']} left in float", op_types_to_quantize=tuple(present))


# --------------------------------------------------------------------------------------------
# The entry point


def auto_quantize(
    model_path: Path,
    spec: Recipe,
    workdir: Path,
    evaluation: EvaluationSpec,
    *,
    calibration: DatasetSource | None,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    reused_calibration: bool = False,
    progress: ProgressCallback = no_progress,
    note: NoteCallback = no_note,
    meter: Meter | None = None,
    int8: str | None = None,
    preflight_timings: Path | None = None,
    preflight_out: Path | None = None,
    kernels: KernelTimer | None = None,
    clock: Callable[[], float] = time.perf_counter,
    apart: bool | None = None,
    whole_models_only: bool | None = None,
) -> tuple[QuantizationOutcome, Evaluation]:
    """Search (see the module docstring) and evaluate the pick like any job. `preflight_timings`: the
    pre-flight's timings the worker has for this CPU (a file only read; None: every layer is timed);
    `preflight_out`: where the timings measured here go, for the worker to keep (None: nowhere). `meter`,
    `int8` (the CPU's int8 kind, see `machine.int8_kernels`) and `kernels` (what times the pre-flight's
    layers) are for tests; so are `apart` (one session at a time) and `whole_models_only` (no mixed precision),
    both by default for a model on the streaming path."""
    if calibration is None:
        raise RuleError(
            "invalid_recipe",
            "Mode auto compares static variants and needs calibration data.",
            {"mode": "auto"},
        )
    model_path = Path(model_path)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = clock()
    inputs = list(inputs) if inputs is not None else model_inputs(model_path)
    facts = model_facts(model_path)
    # A big model's search holds one model's session at a time: float's outputs wait on disk (the evaluator's
    # spill), each model is timed alone (the meter's apart).
    big = streaming.should_stream(model_path)
    apart = big if apart is None else apart
    evaluator = FidelityEvaluator(
        model_path,
        data if data is not None else calibration,
        inputs,
        spec.fidelity,
        spec.accuracy_tolerance,
        batch_size=evaluation.batch_size,
        max_samples=min(evaluation.max_samples or SEARCH_SAMPLES, SEARCH_SAMPLES),
        threads=evaluation.threads,
        spill=workdir / REFERENCE_FOLDER if apart else None,
    )
    first = next(iter(evaluator.batches()))
    if meter is None:
        meter = LatencyMeter(
            model_path,
            first.feeds,
            threads=evaluation.threads,
            warmup_runs=min(3, evaluation.warmup_runs),
            apart=apart,
        )
    int8 = int8 or int8_kernels()
    float_ms, _ = meter.compare(model_path, 3)  # the scale of one run, for the run counts
    full_runs = _timed_runs(max(1, evaluation.latency_runs), float_ms, FINAL_TIMING_SECONDS)
    search = Search(
        model_path=model_path,
        spec=spec,
        workdir=workdir,
        facts=facts,
        inputs=inputs,
        calibration=calibration,
        evaluator=evaluator,
        meter=meter,
        search_runs=min(full_runs, _timed_runs(SEARCH_LATENCY_RUNS, float_ms, SEARCH_TIMING_SECONDS)),
        final_runs=full_runs,
        clock=clock,
        deadline=started + spec.max_search_seconds,
        progress=progress,
        note=note,
        apart=apart,
        whole_models_only=big if whole_models_only is None else whole_models_only,
    )
    base = dataclasses.replace(spec, mode=Mode.STATIC)
    if spec.objective == Objective.LATENCY:
        threads = evaluation.threads or usable_cores()
        note(Note("pre-flight: timing float against int8 per layer on this CPU"))
        search.preflight = preflight(
            search.prepared_for(dataclasses.replace(base, per_channel=True, **int8_settings(int8))).path,
            first.feeds,
            workdir / "preflight",
            int8=int8,
            cache=cache_for(preflight_timings, threads, preflight_out),
            timer=kernels or OrtKernelTimer(threads),
            deadline=min(search.deadline, started + min(PREFLIGHT_SECONDS, PREFLIGHT_SHARE * spec.max_search_seconds)),
            clock=clock,
            threads=threads,
        )
        search.preflight.cpu_model = machine_info(threads).cpu_model
        shutil.rmtree(workdir / "preflight", ignore_errors=True)
    candidates = candidates_for(
        facts.op_counts,
        token_inputs=is_token_model(inputs),
        int8=int8,
        objective=spec.objective,
        s8s8=search.preflight is not None and search.preflight.fast("s8s8", FASTER_MARGIN),
    )
    plan = _plan(search, base, candidates)
    progress(Stage.QUANTIZING, 0.0)
    for k, (candidate, recipe, predicted) in enumerate(plan, start=1):
        if k > 1 and not search.time_left():
            break
        trying = CandidateProgress(k, len(plan), candidate.name)
        note(Note(f"candidate {k} of {len(plan)}: {candidate.name}", trying))
        progress(Stage.QUANTIZING, 0.5 * (k - 1) / len(plan))
        search.run(candidate.name, "candidate", recipe, searchable=candidate.searchable, predicted=predicted)
    if not any(t.ok for t in search.trials) and not (search.preflight and search.preflight.pruned):
        raise RuleError(
            "quantization_failed",
            "Mode auto tried every candidate recipe and none could be produced; see detail for each error.",
            {"candidates": [t.measured().model_dump(mode="json") for t in search.trials]},
        )
    for start in _start_points(search):
        if not search.time_left():
            break
        _mixed_precision(search, start)

    winner = _finalists(search, full_runs)
    verdict = Verdict.QUANTIZED if winner is not None else Verdict.KEEP_FLOAT
    chosen = winner if winner is not None else _keep_float_artifact(search, full_runs)
    search_seconds = clock() - started
    for trial in search.trials:
        if trial is not chosen:
            search.discard(trial)
    for path in [
        *(workdir / f"prep-{i}" for i in range(len(search.prepared))),
        *workdir.glob("calib-*"),
        workdir / REFERENCE_FOLDER,
    ]:
        shutil.rmtree(path, ignore_errors=True)
    outcome = (
        chosen.outcome if chosen is not None and chosen.outcome is not None else _float_copy(model_path, facts, workdir)
    )
    note(Note(f"evaluating {chosen.name}" if chosen is not None else "evaluating the float model"))
    progress(Stage.EVALUATING, 0.0)
    measured = evaluate(
        model_path,
        outcome.model_path,
        evaluation,
        data=data,
        inputs=inputs,
        reused_calibration=reused_calibration,
        budget=spec.fidelity,
        accuracy_tolerance=spec.accuracy_tolerance,
        progress=progress,
        # A big model's float copy beside the original would hold its weights twice: one session at a time.
        apart=True if apart and chosen is None else None,
    )
    summary = _summary(search, verdict, chosen, full_runs, search_seconds)
    warnings = _verdict_warnings(search, verdict, chosen)
    outcome.warnings = [*warnings, *outcome.warnings]
    outcome.facts.auto = summary
    if search.sensitivities:  # the ranking, when the mixed-precision search made one
        sensitivity_path = workdir / "sensitivity.json"
        sensitivity_path.write_text(
            json.dumps({"sensitivities": [s.to_dict() for s in search.sensitivities]}, indent=2, default=str)
        )
        outcome.artifacts["sensitivity.json"] = sensitivity_path
    outcome.preprocessing_steps = [f"auto: {summary.headline}", *outcome.preprocessing_steps]
    return outcome, measured


def _timed_runs(runs: int, float_ms: float, seconds: float) -> int:
    """`runs`, or more so that the float model is timed for `seconds` (at most RUNS_GROWTH times more)."""
    if float_ms <= 0:
        return runs
    return max(runs, min(runs * RUNS_GROWTH, math.ceil(seconds * 1000.0 / float_ms)))


def _apply(base: Recipe, candidate: Candidate) -> Recipe:
    changes = dict(candidate.changes)
    if base.bias_correction is not None:  # the job said whether to correct biases
        changes.pop("bias_correction", None)
    return dataclasses.replace(base, **changes)


def _plan(
    search: Search, base: Recipe, candidates: Sequence[Candidate]
) -> list[tuple[Candidate, Recipe, float | None]]:
    """The candidates to try, with their predicted speedups; those predicted slower than float are pruned."""
    plan = []
    for candidate in candidates:
        recipe = _apply(base, candidate)
        predicted = search.preflight.predict(recipe) if search.preflight is not None else None
        if predicted is not None and predicted < PRUNE_BELOW:
            search.prune(candidate.name, predicted, f"predicted {predicted:.2f}x of float on this CPU")
            continue
        if predicted is not None and search.preflight is not None:
            search.preflight.kept[candidate.name] = round(predicted, 3)
        plan.append((candidate, recipe, predicted))
    return plan


def _finalists(search: Search, full_runs: int) -> Trial | None:
    """The winner after re-timing the best few with the full run count (None: nothing beats float)."""
    eligible = sorted((t for t in search.trials if search.eligible(t)), key=lambda t: -(t.speedup or 0.0))
    if search.spec.objective == Objective.SIZE:
        eligible.sort(key=lambda t: (t.size or 0, -(t.speedup or 0.0)))
        winner = eligible[0] if eligible else None
        if winner is not None:
            search.retime(winner, full_runs)
            search.finalists.append(winner.name)
        return winner
    finalists = [(t, t.outcome.model_path) for t in eligible[:FINALISTS] if t.outcome is not None]
    if not finalists:
        return None
    # A fresh timing, all finalists and float in one interleaved loop: a winner must be faster in one
    # more measurement than made it eligible, and the finalists are compared under the same load
    # (timed one by one, the machine's drift between their timings could pick the slower one).
    names = ", ".join(t.name for t, _ in finalists)
    search.note(Note(f"timing finalists together with {full_runs} runs: {names}"))
    float_p50, p50s = search.meter.compare_many([path for _, path in finalists], full_runs)
    best: Trial | None = None
    for (trial, _), p50 in zip(finalists, p50s, strict=True):
        trial.float_p50, trial.p50, trial.runs = float_p50, p50, full_runs
        search.finalists.append(trial.name)
        if trial.faster() and search.better(trial, best):
            best = trial
    return best


def _keep_float_artifact(search: Search, full_runs: int) -> Trial | None:
    """The smallest in-budget model that measured not slower than float (p50 ratio >= 1) in
    NOT_SLOWER_CONFIRMATIONS full-count interleaved timings in a row. None: the float model itself
    (always so with objective size, where nothing smaller fits)."""
    if search.spec.objective == Objective.SIZE:
        return None
    # Within noise of float in the search's timing: worth confirming.
    fits = [t for t in search.trials if t.within and t.not_slower() and (t.size or 0) < search.float_size]
    for trial in sorted(fits, key=lambda t: (t.size or 0, -(t.speedup or 0.0)))[:FINALISTS]:
        search.note(Note(f"checking that {trial.name} is not slower than float"))
        if search.confirmed_not_slower(trial, full_runs):
            return trial
    return None


def _float_copy(model_path: Path, facts: ModelFacts, workdir: Path) -> QuantizationOutcome:
    out = workdir / "float" / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = out / OUTPUT_NAME
    shutil.copyfile(model_path, target)
    files = [target]
    for name in facts.external_files:
        shutil.copyfile(model_path.parent / name, out / name)
        files.append(out / name)
    return QuantizationOutcome(model_path=target, files=files, facts=QuantizationFacts(mode="float"))


def _summary(search: Search, verdict: Verdict, chosen: Trial | None, full_runs: int, seconds: float) -> AutoSearch:
    name = chosen.name if chosen is not None else FLOAT_NAME
    summary = search.preflight.summary() if search.preflight is not None else None
    if verdict == Verdict.QUANTIZED:
        headline = f"chose {name}"
    elif summary is not None and not summary.int8_helps:
        headline = f"keep float: the pre-flight on this CPU says {summary.verdict}; returned {name}"
    else:
        headline = f"keep float: no model within the budget beats float on {search.spec.objective}; returned {name}"
    return AutoSearch(
        verdict=verdict.value,
        headline=headline,
        objective=search.spec.objective.value,
        chosen=name,
        effective_recipe=recipe_of(chosen.spec) if chosen is not None else None,
        candidates=[t.measured() for t in search.trials if t.stage == "candidate"],
        steps=[t.measured() for t in search.trials if t.stage == "step"],
        search_seconds=round(seconds, 3),
        time_budget_exhausted=search.out_of_time,
        search_latency_runs=search.search_runs,
        final_latency_runs=full_runs,
        finalists=list(search.finalists),
        interleaved=not search.apart,
        sensitivity=[
            SensitivitySummary(
                candidate=s.candidate,
                method=s.method,
                top=[SensitiveNode(node=n.node, op_type=n.op_type, score=n.score) for n in s.nodes[:10]],
            )
            for s in search.sensitivities
        ],
        preflight=summary,
    )


def _verdict_warnings(search: Search, verdict: Verdict, chosen: Trial | None) -> list[str]:
    warnings = []
    if verdict == Verdict.KEEP_FLOAT:
        what = "ran faster than" if search.spec.objective == Objective.LATENCY else "is smaller than"
        artifact = chosen.name if chosen is not None else "the float model itself"
        warnings.append(
            f"Keep float: no model within the fidelity budget {what} the float model on this CPU "
            f"({len(search.trials)} measured). The artifact is {artifact}."
        )
    if search.preflight is not None and search.preflight.pruned:
        pruned = search.preflight.pruned
        warnings.append(
            f"The pre-flight on this CPU: {search.preflight.verdict()[0]}. Not tried: "
            f"{', '.join(p.name for p in pruned[:5])}{' and more' if len(pruned) > 5 else ''}."
        )
    if search.apart:
        warnings.append(
            "The search timed each model alone, one after the other, not interleaved with float: side by side, "
            "the sessions of this big model would hold its weights more than twice over. Speed-ups are less "
            "certain on a busy machine."
        )
    if search.skipped_mixed_precision:
        warnings.append(
            "Mixed precision was not searched: this model is big enough to be quantized tensor by tensor, and "
            "ranking which nodes to keep in float would hold it several times over in memory. Only whole-model "
            "candidates were measured; a job with nodes_to_exclude sets mixed precision by hand."
        )
    if search.out_of_time:
        warnings.append(
            f"The search stopped at max_search_seconds ({search.spec.max_search_seconds:g} s); "
            "a larger budget may find a better model."
        )
    return warnings
