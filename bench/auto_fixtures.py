"""`python -m bench --only auto_fixtures`: mode auto on the fixtures of issue #22 (tests/auto_fixtures.py, built
larger), one row each, beside every whole-model int8 variant and NNCF measured in the same run.

Per fixture:
- mode auto (objective latency, the default budget): its verdict and pick, the search's time and the number of
  models it measured (candidates and mixed-precision steps, each scored and timed);
- the whole-model variants, quantized by the engine's own quantizer with this CPU's int8 types (per-channel,
  MinMax): QDQ, QOperator, S8S8 QDQ (int8 activations) and dynamic int8, each scored by the same judge
  (the fidelity budget auto works to);
- NNCF's accuracy control (bench/auto.py's `nncf_quantize`: same data, same metric, a 0.01 absolute drop), when
  the optional `bench` extra is installed;
- auto's pick, every variant and NNCF's model timed together in one loop interleaved with float, so that the
  speedups compare under the same load.
Target: auto's pick within budget and at least TARGET_SHARE of the fastest in-budget variant the fixture was
built to reward (float, 1.0x, always counts: keep_float is right where no rewarded variant beats it).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.auto import LATENCY_RUNS, nncf_quantize
from bench.common import Context
from bench.results import Baseline, Measurement
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.recipe import Recipe
from tests.auto_fixtures import FIXTURES, Fixture
from worker.engine.auto import auto_quantize
from worker.engine.candidates import int8_settings
from worker.engine.data import iter_batches, model_inputs
from worker.engine.evaluate import LatencyMeter
from worker.engine.fidelity import FidelityEvaluator
from worker.engine.machine import int8_kernels
from worker.engine.quantize import quantize

TARGET_SHARE = 0.9
SAMPLES = 64
TIMING_SECONDS = 2.0


@dataclass
class Variant:
    name: str
    speedup: float | None = None
    fidelity: float | None = None
    within_budget: bool | None = None
    seconds: float | None = None
    evaluations: int | None = None  # models validated (NNCF)
    error: str | None = None


@dataclass
class FixtureFigures:
    fixture: str
    rewards: list[str]
    verdict: str
    chosen: str
    metric: str
    auto_speedup: float | None
    auto_fidelity: float | None
    auto_within_budget: bool
    search_seconds: float
    evaluations: int
    preflight: str | None
    variants: dict[str, Variant] = field(default_factory=dict)
    nncf: Variant | None = None
    reference: str = "float"
    reference_speedup: float = 1.0
    met: bool = False

    def best_whole(self) -> Variant | None:
        fits = [v for v in self.variants.values() if v.within_budget and v.speedup is not None]
        return max(fits, key=lambda v: v.speedup or 0.0, default=None)


def _variants(int8: str) -> dict[str, Recipe]:
    static = {"mode": "static", "per_channel": True, **int8_settings(int8)}
    return {
        "qdq": Recipe(**static),
        "qoperator": Recipe(**static, format="qoperator"),
        "s8s8": Recipe(**{**static, "activation_type": "int8"}),
        "dynamic": Recipe(mode="dynamic", reduce_range=int8 == "avx2"),
    }


def _one(ctx: Context, f: Fixture, evaluation: EvaluationSpec, has_nncf: bool) -> FixtureFigures:
    work = ctx.dir(f"auto_fixtures/{f.name}")
    model = f.build(work / "model.onnx", bench=not ctx.quick)
    np.savez(work / "data.npz", **f.data(16 if ctx.quick else SAMPLES, bench=not ctx.quick, seed=11))
    source = DatasetSource(work / "data.npz", "npz")
    inputs = model_inputs(model)
    ctx.log(f"  {f.name}: mode auto")
    t = time.perf_counter()
    outcome, measured = auto_quantize(
        model,
        Recipe(mode="auto", max_search_seconds=120 if ctx.quick else 600),
        work / "auto",
        evaluation,
        calibration=source,
        data=source,
        note=lambda note: ctx.log(f"    {f.name}: {note.text}"),
    )
    seconds = time.perf_counter() - t
    search = outcome.facts.auto
    assert search is not None
    verdict = measured.comparison.fidelity
    figures = FixtureFigures(
        fixture=f.name,
        rewards=list(f.rewards),
        verdict=str(search.verdict),
        chosen=search.chosen,
        metric=verdict.metric if verdict else "none",
        auto_speedup=None,
        auto_fidelity=verdict.fidelity if verdict else None,
        auto_within_budget=bool(verdict and verdict.within_budget),
        search_seconds=round(search.search_seconds or seconds, 1),
        evaluations=len(search.candidates) + len(search.steps),
        preflight=search.preflight.verdict if search.preflight else None,
    )
    evaluator = FidelityEvaluator(model, source, inputs, None, 0.01, max_samples=SAMPLES)
    # keep_float with the float model itself: the user keeps the model they have, 1.0x by definition.
    paths: dict[str, Path] = {} if search.effective_recipe is None else {"auto": outcome.model_path}
    for name, recipe in _variants(int8_kernels()).items():
        ctx.log(f"  {f.name}: whole-model {name}")
        variant = figures.variants[name] = Variant(name)
        try:
            t = time.perf_counter()
            paths[name] = quantize(model, recipe, work / name, calibration=source).model_path
            variant.seconds = round(time.perf_counter() - t, 1)
            score = evaluator.score(paths[name])
            variant.fidelity, variant.within_budget = score.fidelity, score.within_budget
        except Exception as exc:  # a variant ONNX Runtime cannot make is a figure too
            variant.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    feeds = [b.feeds for b in iter_batches(source, inputs, batch_size=1)]
    if has_nncf:
        ctx.log(f"  {f.name}: nncf.quantize_with_accuracy_control")
        figures.nncf = Variant("nncf")
        try:
            t, validated = time.perf_counter(), list[float]()
            paths["nncf"] = nncf_quantize(model, feeds, evaluator, work / "nncf" / "model.onnx", validated)
            figures.nncf.seconds = round(time.perf_counter() - t, 1)
            figures.nncf.evaluations = len(validated)
            score = evaluator.score(paths["nncf"])
            figures.nncf.fidelity, figures.nncf.within_budget = score.fidelity, score.within_budget
        except Exception as exc:  # a peer's failure is a figure too
            figures.nncf.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    # Everything timed in one loop, interleaved with float: speedups that compare under the same load.
    meter = LatencyMeter(model, feeds[0], threads=evaluation.threads, warmup_runs=evaluation.warmup_runs)
    names = list(paths)
    float_ms, _ = meter.compare(model, 3)
    # Sub-millisecond models need more runs than the count to time something: TIMING_SECONDS of float at least.
    runs = max(evaluation.latency_runs, min(20 * evaluation.latency_runs, math.ceil(TIMING_SECONDS * 1000 / float_ms)))
    float_p50, p50s = meter.compare_many([paths[n] for n in names], runs)
    speedups = {n: float_p50 / p if p > 0 else None for n, p in zip(names, p50s, strict=True)}
    figures.auto_speedup = speedups.get("auto", 1.0)
    for name, variant in [*figures.variants.items(), ("nncf", figures.nncf)]:
        if variant is not None and name in speedups:
            variant.speedup = speedups[name]
    rewarded = [v for n, v in figures.variants.items() if n in f.rewards and v.within_budget and v.speedup]
    best = max(rewarded, key=lambda v: v.speedup or 0.0, default=None)
    if best is not None and (best.speedup or 0.0) > 1.0:
        figures.reference, figures.reference_speedup = best.name, best.speedup or 1.0
    figures.met = figures.auto_within_budget and (figures.auto_speedup or 0.0) >= (
        TARGET_SHARE * figures.reference_speedup
    )
    shutil.rmtree(work, ignore_errors=True)
    return figures


def measure(ctx: Context) -> dict[str, FixtureFigures]:
    logging.getLogger("nncf").setLevel(logging.WARNING)
    evaluation = EvaluationSpec(latency_runs=10 if ctx.quick else LATENCY_RUNS, warmup_runs=3, max_samples=SAMPLES)
    has_nncf = importlib.util.find_spec("nncf") is not None
    results = {}
    for f in FIXTURES:
        results[f.name] = _one(ctx, f, evaluation, has_nncf)
        ctx.log(f"  {f.name}: {asdict(results[f.name])}")
    return results


def run(ctx: Context) -> dict[str, Measurement]:
    results = measure(ctx)
    details = {name: asdict(r) for name, r in results.items()}

    def best(r: FixtureFigures) -> float | None:
        whole = r.best_whole()
        return _round(whole.speedup) if whole else None

    nncf = {n: r.nncf for n, r in results.items() if r.nncf is not None}
    return {
        "auto_fixture_speedup": Measurement(
            what="Mode auto on issue #22's fixtures: speedup of its pick over float (p50), per fixture",
            unit="x",
            value={n: _round(r.auto_speedup) for n, r in results.items()},
            baseline=Baseline(
                what="the fastest whole-model variant within budget (QDQ, QOperator, S8S8, dynamic), same loop",
                value={n: best(r) for n, r in results.items()},
            ),
            target=f"pick within budget and >= {TARGET_SHARE} of the fastest in-budget variant the fixture rewards",
            met=all(r.met for r in results.values()),
            details=details,
        ),
        "auto_fixture_search_s": Measurement(
            what="Mode auto on issue #22's fixtures: search time (s), per fixture",
            unit="s",
            value={n: r.search_seconds for n, r in results.items()},
            baseline=Baseline(
                what="NNCF's accuracy control, same data and budget",
                value={n: r.nncf.seconds if r.nncf else None for n, r in results.items()},
            ),
            details={
                n: {"evaluations": r.evaluations, "nncf_evaluations": r.nncf.evaluations if r.nncf else None}
                for n, r in results.items()
            },
        ),
        "auto_fixture_nncf_speedup": Measurement(
            what="NNCF quantize_with_accuracy_control on issue #22's fixtures: speedup over float, same loop",
            unit="x",
            value={n: _round(v.speedup) for n, v in nncf.items() if v.speedup is not None} or None,
            errors=[f"NNCF on {n}: {v.error}" for n, v in nncf.items() if v.error]
            if nncf
            else ["nncf is not installed (pip install -e '.[bench]')"],
        ),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
