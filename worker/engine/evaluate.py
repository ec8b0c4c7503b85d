"""Side-by-side evaluation of an original and a quantized model: fidelity, accuracy, latency, size.

One pass over the evaluation data runs both models on the same feeds and accumulates per-output
fidelity and (with labels) top-1/top-5 accuracy (`fidelity.FidelityPass`, judged by `core.judge`); then
both models are timed on one feed with the same session options, warm-up discarded and runs interleaved
(see `latency`). The whole evaluation is bounded by `spec.max_seconds`: the data pass may use up to
`DATA_PASS_SHARE` of it, latency the rest; what was cut short is said in a warning.

A big model whose quantized version keeps float16 weights (`streaming.measured_apart`) is measured one
session at a time (the original's outputs kept on disk for the comparison, each model timed alone), since
the two sessions side by side would hold its weights twice over; the result says `interleaved: false`.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.errors import RuleError
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.lifecycle import Stage
from core.model import TensorSpec
from core.recipe import FidelitySpec
from core.result import (
    AccuracyComparison,
    Comparison,
    EvaluationFacts,
    Machine,
    ModelMetrics,
)
from worker.engine import streaming
from worker.engine.checks import model_facts, model_size
from worker.engine.data import count_batches, model_inputs
from worker.engine.fidelity import (
    FidelityPass,
    Score,
    evaluation_batches,
    graph_hints,
    load_session,
    run_session,
)
from worker.engine.latency import InterleavedTimings, TimedRuns, time_interleaved
from worker.engine.machine import machine_info, usable_cores
from worker.engine.metrics import AccuracyAccumulator
from worker.engine.session import session_options, session_settings
from worker.engine.spec import ProgressCallback, no_progress

# Outputs of one model on one feed, in the order of the names asked for.
_Outputs = list[np.ndarray]

# Share of max_seconds the fidelity/accuracy pass may use before latency gets the rest.
DATA_PASS_SHARE = 0.6
# A quantized model slower by less than this fraction is called "no faster", not "slower".
SLOWER_NOISE = 0.05

_MODELS = ("original", "quantized")


def size_on_disk(model_path: Path) -> int:
    """Bytes of the model file plus every external-data file it references (each counted once)."""
    return model_size(Path(model_path), model_facts(Path(model_path)))


@dataclass
class Evaluation:
    """What `evaluate` measured: the result's `original`, `quantized`, `comparison`, `machine` and
    `evaluation`, the warnings, and the judged score the comparison's verdict came from."""

    original: ModelMetrics
    quantized: ModelMetrics
    comparison: Comparison
    machine: Machine
    facts: EvaluationFacts
    score: Score
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class _DataPass:
    fidelity: FidelityPass
    names: list[str]
    feeds: int
    samples: int
    cut_short: bool
    latency_feed: dict[str, np.ndarray]
    latency_samples: int


@dataclass
class _Sessions:
    sessions: dict[str, ort.InferenceSession]
    create_ms: dict[str, float]
    names: list[str]


def evaluate(
    original: Path,
    quantized: Path,
    spec: EvaluationSpec,
    *,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    reused_calibration: bool = False,
    budget: FidelitySpec | None = None,
    accuracy_tolerance: float = 0.01,
    progress: ProgressCallback = no_progress,
    apart: bool | None = None,
) -> Evaluation:
    """Measure `original` and `quantized` side by side on `data` (random inputs when None), and judge the
    quantized model against the fidelity `budget` and `accuracy_tolerance`. `apart`: one session at a time
    (default: `streaming.measured_apart`)."""
    started = time.perf_counter()
    # More threads than cores only makes the two models' runs fight over them (and a client could ask
    # for 256): clamp, and say so in the result.
    cores = usable_cores()
    threads = min(spec.threads or cores, cores)
    progress(Stage.EVALUATING, 0.0)
    inputs = list(inputs) if inputs is not None else model_inputs(Path(original))
    fidelity = FidelityPass(inputs, budget, accuracy_tolerance, hints=graph_hints(Path(original)))
    runs = max(1, int(spec.latency_runs))
    if apart is None:
        apart = streaming.measured_apart(Path(original), Path(quantized))
    if apart:
        opened, passed, timings, sessions_done, data_done = _apart(
            original, quantized, threads, inputs, spec, data, fidelity, started, progress
        )
    else:
        opened = _open(original, quantized, threads)
        sessions_done = time.perf_counter()
        passed = _data_pass(
            opened, inputs, spec, data, fidelity, started + DATA_PASS_SHARE * spec.max_seconds, progress
        )
        data_done = time.perf_counter()
        progress(Stage.EVALUATING, 0.5)
        timings = time_interleaved(
            [_runner(opened.sessions[w], opened.names, passed.latency_feed) for w in _MODELS],
            runs=runs,
            warmup_runs=max(0, int(spec.warmup_runs)),
            deadline=started + spec.max_seconds,
            on_round=lambda r: progress(Stage.EVALUATING, 0.5 + 0.5 * min(1.0, r / runs)),
        )
    latency_done = time.perf_counter()
    score = passed.fidelity.score(passed.names)
    score.samples = passed.samples
    stats = dict(zip(_MODELS, timings.stats(), strict=True))
    sizes = {"original": size_on_disk(Path(original)), "quantized": size_on_disk(Path(quantized))}
    accuracy = dict(zip(_MODELS, passed.fidelity.accuracy.values(), strict=True))
    metrics = {
        w: _model_metrics(sizes[w], stats[w], passed.latency_samples, opened.create_ms[w], accuracy[w]) for w in _MODELS
    }
    comparison = Comparison(
        size_ratio=sizes["quantized"] / sizes["original"] if sizes["original"] else None,
        speedup_p50=stats["original"].p50 / stats["quantized"].p50 if stats["quantized"].p50 > 0 else None,
        outputs=score.outputs,
        fidelity=score.verdict(),
        accuracy=_accuracy(passed.fidelity, score),
    )
    facts = EvaluationFacts(
        inputs="dataset" if data is not None else "random",
        samples=passed.samples,
        feeds=passed.feeds,
        batch_size=passed.latency_samples,
        batch_size_requested=max(1, int(spec.batch_size)),
        threads=threads,
        threads_requested=spec.threads,
        threads_clamped=spec.threads is not None and spec.threads > threads,
        execution_provider="CPUExecutionProvider",
        warmup_runs=timings.warmup_rounds,
        latency_runs_requested=runs,
        latency_runs=timings.rounds_done,
        interleaved=not apart,
        stopped_early=timings.stopped_early or passed.cut_short,
        max_seconds=spec.max_seconds,
        max_samples=_max_samples(spec),
        reused_calibration=reused_calibration,
        accuracy_output=passed.fidelity.accuracy_output,
        session_options=session_settings(threads),
    )
    warnings = [
        *_fidelity_warnings(score, passed.fidelity),
        *_latency_warnings(metrics, threads, passed.latency_samples),
        *_size_warnings(sizes),
        *_measurement_warnings(spec, data, passed, timings, cores, threads, reused_calibration, runs),
    ]
    if apart:
        warnings.append(
            "The two models were timed one after the other, not interleaved: side by side their sessions would "
            "hold this model's weights twice (ONNX Runtime keeps float16 weights as float32 on the CPU), so a "
            "change of the machine's load between the two can bias the speed-up."
        )
    progress(Stage.EVALUATING, 1.0)
    return Evaluation(
        original=metrics["original"],
        quantized=metrics["quantized"],
        comparison=comparison,
        machine=machine_info(threads),
        facts=facts,
        score=score,
        warnings=warnings,
        timings_s={
            "evaluation_sessions": sessions_done - started,
            "evaluation_data": data_done - sessions_done,
            "evaluation_latency": latency_done - data_done,
            "evaluation_total": time.perf_counter() - started,
        },
    )


# --------------------------------------------------------------------------------------------
# Steps


def _open(original: Path, quantized: Path, threads: int) -> _Sessions:
    """Both models' sessions with the same options; the quantized model must have every original output."""
    sessions: dict[str, ort.InferenceSession] = {}
    create_ms: dict[str, float] = {}
    for which, path in zip(_MODELS, (original, quantized), strict=True):
        t0 = time.perf_counter()
        sessions[which] = load_session(Path(path), session_options(threads), which)
        create_ms[which] = (time.perf_counter() - t0) * 1000.0
    names = [o.name for o in sessions["original"].get_outputs()]
    theirs = {o.name for o in sessions["quantized"].get_outputs()}
    missing = [n for n in names if n not in theirs]
    if missing:
        raise RuleError(
            "evaluation_failed",
            f"The quantized model lacks the original's output(s) {', '.join(missing)}; they cannot be compared.",
            {"missing_outputs": missing},
        )
    return _Sessions(sessions, create_ms, names)


def _runner(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(names, feed)


def _max_samples(spec: EvaluationSpec) -> int | None:
    return spec.max_samples if spec.max_samples and spec.max_samples > 0 else None


def _data_pass(
    opened: _Sessions,
    inputs: Sequence[TensorSpec],
    spec: EvaluationSpec,
    data: DatasetSource | None,
    fidelity: FidelityPass,
    deadline: float,
    progress: ProgressCallback,
    *,
    outputs: Callable[[int, dict[str, np.ndarray]], tuple[_Outputs | None, _Outputs | None]] | None = None,
    max_feeds: int | None = None,
    span: tuple[float, float] = (0.0, 0.5),
) -> _DataPass:
    """Both models on every feed up to max_samples or the deadline, and the feed latency is timed on.
    `outputs(feed index, feeds)`: the two models' outputs another way (one of them None: nothing is
    compared); `max_feeds`: stop after that many feeds; `span`: the share of the progress it reports."""
    batch_size = max(1, int(spec.batch_size))
    max_samples = _max_samples(spec)
    expected: int | None
    if data is None:
        expected = None
    else:
        try:
            expected = count_batches(data, inputs, batch_size=batch_size)
        except Exception:  # only used for progress
            expected = None
    feeds = samples = 0
    cut_short = False
    parts: list[dict[str, np.ndarray]] = []
    timed = 0
    stackable = all(s.shape and not isinstance(s.shape[0], int) for s in inputs)
    batches = evaluation_batches(data, inputs, batch_size, max_samples)
    try:
        for batch in batches:
            if max_feeds is not None and feeds >= max_feeds:
                break
            if outputs is not None:
                ref, got = outputs(feeds, batch.feeds)
            else:
                ref, got = (run_session(opened.sessions[w], opened.names, batch.feeds, w) for w in _MODELS)
            if ref is not None and got is not None:
                fidelity.add(batch, opened.names, ref, got)
            n = _samples_in(batch.feeds, inputs, batch.labels)
            samples += n
            feeds += 1
            # The timed feed: the first `batch_size` samples, stacked when the dataset gives fewer per feed.
            if timed < batch_size and (not parts or stackable):
                parts.append(batch.feeds)
                timed += n
            if expected:
                progress(Stage.EVALUATING, span[0] + (span[1] - span[0]) * min(1.0, feeds / expected))
            if max_samples is not None and samples >= max_samples:
                break
            if time.perf_counter() > deadline:
                cut_short = expected is None or feeds < expected
                break
    finally:
        batches.close()
    if feeds == 0:
        raise RuleError("invalid_dataset", "The evaluation dataset gave no samples.", {})
    feed = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    if len(parts) > 1 and timed > batch_size:
        feed = {k: v[:batch_size] for k, v in feed.items()}
        timed = batch_size
    fidelity.samples = samples
    return _DataPass(fidelity, opened.names, feeds, samples, cut_short, feed, timed)


def _apart(
    original: Path,
    quantized: Path,
    threads: int,
    inputs: Sequence[TensorSpec],
    spec: EvaluationSpec,
    data: DatasetSource | None,
    fidelity: FidelityPass,
    started: float,
    progress: ProgressCallback,
) -> tuple[_Sessions, _DataPass, InterleavedTimings, float, float]:
    """The evaluation with one session open at a time: the original on every feed (its outputs saved in a
    temporary folder) and timed alone, closed; then the quantized model on the same feeds, compared, and
    timed alone. The time budget is shared as the side-by-side evaluation shares it, in four parts."""
    runs = max(1, int(spec.latency_runs))
    warmup = max(0, int(spec.warmup_runs))
    budget = spec.max_seconds
    options = session_options(threads)
    create_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qaas-reference-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        session = load_session(Path(original), options, "original")
        create_ms["original"] = (time.perf_counter() - t0) * 1000.0
        sessions_done = time.perf_counter()
        names = [o.name for o in session.get_outputs()]
        alone = _Sessions({"original": session}, create_ms, names)

        def save_reference(i: int, feeds: dict[str, np.ndarray]) -> tuple[_Outputs | None, _Outputs | None]:
            for k, value in enumerate(run_session(alone.sessions["original"], names, feeds, "original")):
                np.save(folder / f"{i}_{k}.npy", np.asarray(value), allow_pickle=False)
            return None, None

        first = _data_pass(
            alone,
            inputs,
            spec,
            data,
            fidelity,
            started + DATA_PASS_SHARE * budget / 2,
            progress,
            outputs=save_reference,
            span=(0.0, 0.25),
        )
        data_done = time.perf_counter()
        reference = time_interleaved(
            [_runner(session, names, first.latency_feed)],
            runs=runs,
            warmup_runs=warmup,
            deadline=started + budget / 2,
            on_round=lambda r: progress(Stage.EVALUATING, 0.25 + 0.25 * min(1.0, r / runs)),
        )
        alone.sessions.clear()  # the original's session goes before the quantized model's opens
        del session
        t0 = time.perf_counter()
        candidate = load_session(Path(quantized), options, "quantized")
        create_ms["quantized"] = (time.perf_counter() - t0) * 1000.0
        theirs = {o.name for o in candidate.get_outputs()}
        missing = [n for n in names if n not in theirs]
        if missing:
            raise RuleError(
                "evaluation_failed",
                f"The quantized model lacks the original's output(s) {', '.join(missing)}; they cannot be compared.",
                {"missing_outputs": missing},
            )
        opened = _Sessions({"quantized": candidate}, create_ms, names)

        def compare(i: int, feeds: dict[str, np.ndarray]) -> tuple[_Outputs | None, _Outputs | None]:
            ref = [np.load(folder / f"{i}_{k}.npy", allow_pickle=False) for k in range(len(names))]
            return ref, run_session(candidate, names, feeds, "quantized")

        passed = _data_pass(
            opened,
            inputs,
            spec,
            data,
            fidelity,
            started + budget / 2 + DATA_PASS_SHARE * budget / 2,
            progress,
            outputs=compare,
            max_feeds=first.feeds,
            span=(0.5, 0.75),
        )
    timed = time_interleaved(
        [_runner(candidate, names, passed.latency_feed)],
        runs=runs,
        warmup_runs=warmup,
        deadline=started + budget,
        on_round=lambda r: progress(Stage.EVALUATING, 0.75 + 0.25 * min(1.0, r / runs)),
    )
    passed.cut_short = passed.cut_short or first.cut_short
    timings = InterleavedTimings(
        samples_ms=[reference.samples_ms[0], timed.samples_ms[0]],
        warmup_rounds=min(reference.warmup_rounds, timed.warmup_rounds),
        rounds_requested=runs,
        stopped_early=reference.stopped_early or timed.stopped_early,
        order=[0] * len(reference.samples_ms[0]) + [1] * len(timed.samples_ms[0]),
    )
    return opened, passed, timings, sessions_done, data_done


def _samples_in(feeds: dict[str, np.ndarray], inputs: Sequence[TensorSpec], labels: np.ndarray | None) -> int:
    """How many samples one feed holds: the labels' count when known, else the first input's
    leading dimension (symbolic: as fed; fixed: its value; scalar input: one sample)."""
    if labels is not None:
        return int(labels.shape[0])
    for spec in inputs:
        arr = feeds.get(spec.name)
        if arr is None or arr.ndim == 0 or not spec.shape:
            continue
        lead = spec.shape[0]
        return int(lead) if isinstance(lead, int) and lead > 0 else int(arr.shape[0])
    return 1


def _model_metrics(size: int, timed: TimedRuns, batch: int, create_ms: float, acc: AccuracyAccumulator) -> ModelMetrics:
    return ModelMetrics(
        size_bytes=size,
        latency_ms=timed.latency_ms(),
        throughput_per_s=timed.throughput_per_s(batch),
        accuracy=acc.top1_accuracy,
        top5_accuracy=acc.top5_accuracy,
        session_create_ms=create_ms,
        batch_size=batch,
        runs=timed.runs,
    )


def _accuracy(fidelity: FidelityPass, score: Score) -> AccuracyComparison | None:
    ref, cand = fidelity.accuracy["reference"], fidelity.accuracy["candidate"]
    if not ref.samples:
        return None
    a0, a1 = ref.top1_accuracy, cand.top1_accuracy
    delta = (a1 - a0) if a0 is not None and a1 is not None else None
    return AccuracyComparison(
        metric="top1",
        original=a0,
        quantized=a1,
        delta=delta,
        within_tolerance=None if delta is None else score.within_tolerance,
        top5_original=ref.top5_accuracy,
        top5_quantized=cand.top5_accuracy,
        samples=ref.samples,
        output=fidelity.accuracy_output,
    )


# --------------------------------------------------------------------------------------------
# Warnings, most important first: each says what the judge decided, in words


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def _fidelity_warnings(score: Score, fidelity: FidelityPass) -> list[str]:
    warnings = []
    ref, cand = fidelity.accuracy["reference"], fidelity.accuracy["candidate"]
    if not score.within_tolerance and ref.top1_accuracy is not None and cand.top1_accuracy is not None:
        drop = ref.top1_accuracy - cand.top1_accuracy
        warnings.append(
            f"Top-1 accuracy dropped by {drop * 100:.2f} points, from {_pct(ref.top1_accuracy)} to "
            f"{_pct(cand.top1_accuracy)} on {ref.samples} samples, more than the allowed "
            f"{score.tolerance * 100:.2f} points."
        )
    for row in score.outputs:
        if row.budgeted and row.faithful is False:
            value = "none" if row.value is None else f"{row.value:.4f}"
            warnings.append(
                f"Output '{row.name}' is outside the fidelity budget: {row.metric} {value} against a floor of "
                f"{row.min:g} (a {row.kind} output; cosine {_fmt(row.cosine)}, SQNR {_fmt(row.sqnr_db, 1)} dB)."
            )
        if row.problem is not None:
            warnings.append(f"Output '{row.name}' could not be compared: {row.problem}; its fidelity is not measured.")
        acc = fidelity.outputs.get(row.name)
        if acc is not None and acc.nonfinite:
            warnings.append(
                f"Output '{row.name}' held {acc.nonfinite} NaN or infinite values in at least one model; "
                "they were left out of its fidelity numbers."
            )
    if fidelity.labels_seen and fidelity.labels_unusable is not None:
        warnings.append(f"The dataset has labels but accuracy was not measured: {fidelity.labels_unusable}.")
    return warnings


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _latency_warnings(metrics: dict[str, ModelMetrics], threads: int, batch: int) -> list[str]:
    lat_o, lat_q = metrics["original"].latency_ms, metrics["quantized"].latency_ms
    assert lat_o is not None and lat_q is not None
    p50_o, p50_q = lat_o.p50, lat_q.p50
    if p50_q <= p50_o:
        return []
    noise = p50_q <= p50_o * (1 + SLOWER_NOISE)
    return [
        f"The quantized model is {'no faster than' if noise else 'slower than'} the original: median "
        f"latency {p50_q:.3f} ms against {p50_o:.3f} ms ({p50_o / p50_q:.2f}x) at batch size "
        f"{batch} with {threads} thread(s)"
        + (f"; a difference under {SLOWER_NOISE:.0%} may be measurement noise." if noise else ".")
    ]


def _size_warnings(sizes: dict[str, int]) -> list[str]:
    if not sizes["original"] or sizes["quantized"] < sizes["original"]:
        return []
    return [
        f"The quantized model is not smaller than the original: {sizes['quantized']} bytes against "
        f"{sizes['original']} ({sizes['quantized'] / sizes['original']:.2f}x); the quantization parameters "
        "and added nodes outweigh the savings, which happens on very small models or when few weights "
        "were quantized."
    ]


def _measurement_warnings(
    spec: EvaluationSpec,
    data: DatasetSource | None,
    passed: _DataPass,
    timings: InterleavedTimings,
    cores: int,
    threads: int,
    reused_calibration: bool,
    runs: int,
) -> list[str]:
    warnings = []
    if spec.threads is not None and spec.threads > threads:
        warnings.append(
            f"The evaluation asked for {spec.threads} threads; the worker has {cores} usable cores, so latency "
            f"was measured with {threads}."
        )
    if reused_calibration:
        warnings.append(
            "The evaluation reused the calibration samples: the quantizer has seen this data, so fidelity "
            "and accuracy may look better than on new data. Give a separate evaluation dataset."
        )
    if data is None:
        warnings.append(
            f"No evaluation dataset: fidelity was measured on {passed.samples} random inputs, which may not look "
            "like real data, and accuracy was not measured."
        )
    if passed.cut_short:
        warnings.append(
            f"The evaluation's time limit ({spec.max_seconds:g} s) cut the data pass short: fidelity and "
            f"accuracy were measured on the first {passed.samples} samples only."
        )
    if timings.stopped_early:
        warnings.append(
            f"The evaluation's time limit ({spec.max_seconds:g} s) cut latency measurement short: "
            f"{timings.rounds_done} of {runs} timed runs per model were done."
        )
    return warnings


# --------------------------------------------------------------------------------------------
# Timing candidates (mode auto)


class LatencyMeter:
    """Times a candidate against the reference model on one feed, interleaved (what mode auto's search
    uses; tests substitute a deterministic meter with the same `compare`). The reference's session is
    made once and kept. `apart` (a big model): one session open at a time, each model timed alone, the
    reference first, every time (its session is not kept)."""

    def __init__(
        self,
        reference: Path,
        feed: dict[str, np.ndarray],
        *,
        threads: int | None,
        warmup_runs: int,
        apart: bool = False,
    ) -> None:
        self.reference = Path(reference)
        self.feed = feed
        self.threads = threads or usable_cores()
        self.warmup_runs = warmup_runs
        self.apart = apart
        self._reference: ort.InferenceSession | None = None

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        """(reference p50 ms, candidate p50 ms) from `runs` interleaved rounds after warm-up."""
        ref, (p50,) = self.compare_many([candidate], runs)
        return ref, p50

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        """(reference p50 ms, each candidate's p50 ms) from `runs` rounds after warm-up, each round
        running the reference and every candidate once: one timing in which they all share the
        machine's state, so that candidates are compared with each other, not only with float."""
        options = session_options(self.threads)
        if self.apart:
            return self._apart(options, candidates, runs)
        if self._reference is None:
            self._reference = load_session(self.reference, options, "original")
        sessions = [self._reference, *(load_session(Path(c), options, "candidate") for c in candidates)]
        names = [[o.name for o in s.get_outputs()] for s in sessions]

        def runner(i: int) -> Callable[[], object]:
            return lambda: sessions[i].run(names[i], self.feed)

        timings = time_interleaved(
            [runner(i) for i in range(len(sessions))],
            runs=max(1, runs),
            warmup_runs=self.warmup_runs,
        )
        ref, *cands = timings.stats()
        return ref.p50, [c.p50 for c in cands]

    def _apart(self, options: ort.SessionOptions, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        """The reference, then each candidate, timed alone with `runs` runs; each session closed before the next
        opens."""
        p50s = []
        for path, which in [(self.reference, "original"), *((Path(c), "candidate") for c in candidates)]:
            session = load_session(path, options, which)
            names = [o.name for o in session.get_outputs()]
            timings = time_interleaved(
                [functools.partial(session.run, names, self.feed)], runs=max(1, runs), warmup_runs=self.warmup_runs
            )
            p50s.append(timings.stats()[0].p50)
            del session
        return p50s[0], p50s[1:]
