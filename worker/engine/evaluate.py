"""Side-by-side evaluation of an original and a quantized model: fidelity, accuracy, latency, size.

One pass over the evaluation data runs both models on the same feeds and accumulates per-output
fidelity and (with labels) top-1/top-5 accuracy; then both models are timed on one feed with
the same session options, warm-up discarded and runs interleaved (see `latency`). The whole
evaluation is bounded by `spec.max_seconds`: the data pass may use up to `DATA_PASS_SHARE` of it,
latency the rest; what was cut short is said in a warning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from worker.engine import metrics
from worker.engine.checks import model_facts, model_size
from worker.engine.data import Batch, count_batches, iter_batches, model_inputs, synthesize_batch
from worker.engine.errors import EngineError
from worker.engine.latency import LatencyStats, time_interleaved
from worker.engine.machine import machine_info, usable_cores
from worker.engine.results import EvaluationOutcome
from worker.engine.spec import DatasetSource, EvaluationSpec, ProgressCallback, Stage, TensorSpec, no_progress

# Share of max_seconds the fidelity/accuracy pass may use before latency gets the rest.
DATA_PASS_SHARE = 0.6
# Samples of random inputs fed when there is no evaluation dataset.
RANDOM_SAMPLES = 32
# A quantized model slower by less than this fraction is called "no faster", not "slower".
SLOWER_NOISE = 0.05
# Session option: idle intra-op threads of one session must not spin on cores while the other
# model is being timed (the two sessions own separate thread pools).
_NO_SPIN = ("session.intra_op.allow_spinning", "0")

_MODELS = ("original", "quantized")


def session_options(threads: int) -> ort.SessionOptions:
    """The one SessionOptions every session of a job is made with (evaluation, and mode auto's timing,
    scoring and sensitivity): `threads` at most the usable cores, whoever asked for more."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, min(threads, usable_cores()))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry(*_NO_SPIN)
    so.log_severity_level = 3  # errors only: ORT's warnings are not for the user
    return so


def size_on_disk(model_path: Path) -> int:
    """Bytes of the model file plus every external-data file it references (each counted once)."""
    return model_size(Path(model_path), model_facts(Path(model_path)))


def _ort_error(which: str, action: str, exc: Exception) -> EngineError:
    msg = str(exc).strip() or type(exc).__name__
    return EngineError(
        "evaluation_failed",
        f'ONNX Runtime could not {action} the {which} model: "{msg}"',
        {"model": which, "ort_message": msg},
    )


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


def _stack_feeds(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def _random_batches(inputs: Sequence[TensorSpec], batch_size: int, samples: int) -> Iterator[Batch]:
    for seed in range(max(1, math.ceil(samples / batch_size))):
        yield synthesize_batch(inputs, seed=seed, batch=batch_size)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def evaluate(
    original: Path,
    quantized: Path,
    spec: EvaluationSpec,
    *,
    data: DatasetSource | None,
    inputs: Sequence[TensorSpec] | None = None,
    reused_calibration: bool = False,
    accuracy_tolerance: float = 0.01,
    progress: ProgressCallback = no_progress,
) -> EvaluationOutcome:
    """Measure `original` and `quantized` side by side on `data` (random inputs when None)."""
    started = time.perf_counter()
    deadline = started + spec.max_seconds
    data_deadline = started + DATA_PASS_SHARE * spec.max_seconds
    # More threads than cores only makes the two models' runs fight over them (and a client could ask
    # for 256): clamp, and say so in the result.
    cores = usable_cores()
    threads = min(spec.threads or cores, cores)
    batch_size = max(1, int(spec.batch_size))
    warnings: list[str] = []
    progress(Stage.EVALUATING, 0.0)

    # --- sessions --------------------------------------------------------------------------
    sessions: dict[str, ort.InferenceSession] = {}
    create_ms: dict[str, float] = {}
    for which, path in zip(_MODELS, (original, quantized), strict=True):
        t0 = time.perf_counter()
        try:
            sessions[which] = ort.InferenceSession(
                str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise _ort_error(which, "load", exc) from exc
        create_ms[which] = (time.perf_counter() - t0) * 1000.0
    sessions_done = time.perf_counter()

    if inputs is None:
        inputs = model_inputs(Path(original))
    inputs = list(inputs)
    output_names = [o.name for o in sessions["original"].get_outputs()]
    quantized_outputs = {o.name for o in sessions["quantized"].get_outputs()}
    missing = [n for n in output_names if n not in quantized_outputs]
    if missing:
        raise EngineError(
            "evaluation_failed",
            f"The quantized model lacks the original's output(s) {', '.join(missing)}; they cannot be compared.",
            {"missing_outputs": missing},
        )

    def run(which: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return sessions[which].run(output_names, feeds)
        except Exception as exc:
            raise _ort_error(which, "run", exc) from exc

    # --- fidelity and accuracy on the evaluation data -----------------------------------------
    max_samples = spec.max_samples if spec.max_samples and spec.max_samples > 0 else None
    if data is None:
        random_samples = min(max_samples or RANDOM_SAMPLES, RANDOM_SAMPLES)
        batches: Iterator[Batch] = _random_batches(inputs, batch_size, random_samples)
        expected_feeds: int | None = max(1, math.ceil(random_samples / batch_size))
    else:
        batches = iter_batches(data, inputs, batch_size=batch_size)
        try:
            expected_feeds = count_batches(data, inputs, batch_size=batch_size)
        except Exception:  # only used for progress
            expected_feeds = None

    fidelity = {name: metrics.FidelityAccumulator(name) for name in output_names}
    accuracy = {which: metrics.AccuracyAccumulator() for which in _MODELS}
    accuracy_output: str | None = None
    labels_seen = False
    labels_unusable: str | None = None
    samples = 0
    feeds_done = 0
    data_cut_short = False
    latency_parts: list[dict[str, np.ndarray]] = []
    latency_samples = 0
    stackable = all(s.shape and not isinstance(s.shape[0], int) for s in inputs)
    try:
        for batch in batches:
            outs = dict(zip(_MODELS, (run(w, batch.feeds) for w in _MODELS), strict=True))
            for i, name in enumerate(output_names):
                fidelity[name].add(outs["original"][i], outs["quantized"][i])
            if batch.labels is not None:
                labels_seen = True
                if accuracy_output is None and labels_unusable is None:
                    accuracy_output = next(
                        (n for i, n in enumerate(output_names) if metrics.is_class_scores(outs["original"][i])),
                        None,
                    )
                    if accuracy_output is None:
                        labels_unusable = "no output of the model holds class scores [batch, classes]"
                if accuracy_output is not None and labels_unusable is None:
                    k = output_names.index(accuracy_output)
                    scores = {w: np.asarray(outs[w][k]) for w in _MODELS}
                    rows_ok = all(
                        metrics.is_class_scores(s) and s.shape[0] == batch.labels.shape[0] for s in scores.values()
                    )
                    if rows_ok:
                        for w in _MODELS:
                            accuracy[w].add(scores[w], batch.labels)
                    else:
                        accuracy = {w: metrics.AccuracyAccumulator() for w in _MODELS}
                        labels_unusable = (
                            f"output '{accuracy_output}' has {scores['original'].shape[0]} rows for "
                            f"{batch.labels.shape[0]} labels"
                        )
            n = _samples_in(batch.feeds, inputs, batch.labels)
            samples += n
            feeds_done += 1
            # The timed feed: the first `batch_size` samples, stacked when the dataset gives fewer per feed.
            if latency_samples < batch_size and (not latency_parts or stackable):
                latency_parts.append(batch.feeds)
                latency_samples += n
            if expected_feeds:
                progress(Stage.EVALUATING, 0.5 * min(1.0, feeds_done / expected_feeds))
            if max_samples is not None and samples >= max_samples:
                break
            if time.perf_counter() > data_deadline:
                data_cut_short = expected_feeds is None or feeds_done < expected_feeds
                break
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if feeds_done == 0:
        raise EngineError("invalid_dataset", "The evaluation dataset gave no samples.", {})
    data_done = time.perf_counter()
    progress(Stage.EVALUATING, 0.5)

    # --- latency ---------------------------------------------------------------------------
    latency_feed = latency_parts[0] if len(latency_parts) == 1 else _stack_feeds(latency_parts)
    if len(latency_parts) > 1 and latency_samples > batch_size:
        latency_feed = {k: v[:batch_size] for k, v in latency_feed.items()}
        latency_samples = batch_size
    runs_requested = max(1, int(spec.latency_runs))
    runners = [lambda w=w: run(w, latency_feed) for w in _MODELS]
    timings = time_interleaved(
        runners,
        runs=runs_requested,
        warmup_runs=max(0, int(spec.warmup_runs)),
        deadline=deadline,
        on_round=lambda r: progress(Stage.EVALUATING, 0.5 + 0.5 * min(1.0, r / runs_requested)),
    )
    stats = dict(zip(_MODELS, timings.stats(), strict=True))
    latency_done = time.perf_counter()

    # --- assemble -----------------------------------------------------------------------------
    sizes = {"original": size_on_disk(Path(original)), "quantized": size_on_disk(Path(quantized))}
    model_metrics = {w: _model_metrics(sizes[w], stats[w], latency_samples, create_ms[w], accuracy[w]) for w in _MODELS}
    accuracy_cmp = None
    if accuracy["original"].samples:
        a0, a1 = accuracy["original"].top1_accuracy, accuracy["quantized"].top1_accuracy
        accuracy_cmp = {
            "metric": "top1",
            "original": a0,
            "quantized": a1,
            "delta": (a1 - a0) if a0 is not None and a1 is not None else None,
            "top5_original": accuracy["original"].top5_accuracy,
            "top5_quantized": accuracy["quantized"].top5_accuracy,
            "samples": accuracy["original"].samples,
            "output": accuracy_output,
        }
    comparison = {
        "size_ratio": sizes["quantized"] / sizes["original"] if sizes["original"] else None,
        "speedup_p50": stats["original"].p50 / stats["quantized"].p50 if stats["quantized"].p50 > 0 else None,
        "outputs": [fidelity[n].to_dict() for n in output_names],
        "accuracy": accuracy_cmp,
    }

    # --- warnings, most important first -----------------------------------------------------
    top1 = {w: accuracy[w].top1_accuracy for w in _MODELS}
    if top1["original"] is not None and top1["quantized"] is not None:
        drop = top1["original"] - top1["quantized"]
        if drop > accuracy_tolerance + 1e-9:  # a drop of exactly the tolerance is allowed
            warnings.append(
                f"Top-1 accuracy dropped by {drop * 100:.2f} points, from {_pct(top1['original'])} to "
                f"{_pct(top1['quantized'])} on {accuracy['original'].samples} samples, more than the allowed "
                f"{accuracy_tolerance * 100:.2f} points."
            )
    for name in output_names:
        acc = fidelity[name]
        if acc.poor:
            warnings.append(
                f"Output '{name}' is poorly reproduced by the quantized model: cosine similarity "
                f"{acc.cosine:.4f}, SQNR {acc.sqnr_db:.1f} dB (good is cosine >= {metrics.POOR_COSINE} and "
                f"SQNR >= {metrics.POOR_SQNR_DB:.0f} dB)."
            )
        if acc.shape_mismatch is not None:
            warnings.append(
                f"Output '{name}' has shape {list(acc.shape_mismatch[0])} in the original and "
                f"{list(acc.shape_mismatch[1])} in the quantized model; its fidelity could not be measured."
            )
        if acc.unsupported_dtype is not None:
            warnings.append(f"Output '{name}' holds {acc.unsupported_dtype} values; its fidelity is not measured.")
        if acc.nonfinite:
            warnings.append(
                f"Output '{name}' held {acc.nonfinite} NaN or infinite values in at least one model; "
                "they were left out of its fidelity numbers."
            )
    p50_o, p50_q = stats["original"].p50, stats["quantized"].p50
    if p50_q > p50_o:
        noise = p50_q <= p50_o * (1 + SLOWER_NOISE)
        warnings.append(
            f"The quantized model is {'no faster than' if noise else 'slower than'} the original: median "
            f"latency {p50_q:.3f} ms against {p50_o:.3f} ms ({p50_o / p50_q:.2f}x) at batch size "
            f"{latency_samples} with {threads} thread(s)"
            + (f"; a difference under {SLOWER_NOISE:.0%} may be measurement noise." if noise else ".")
        )
    if sizes["original"] and sizes["quantized"] >= sizes["original"]:
        warnings.append(
            f"The quantized model is not smaller than the original: {sizes['quantized']} bytes against "
            f"{sizes['original']} ({sizes['quantized'] / sizes['original']:.2f}x); the quantization parameters "
            "and added nodes outweigh the savings, which happens on very small models or when few weights "
            "were quantized."
        )
    if spec.threads is not None and spec.threads > threads:
        warnings.append(
            f"The evaluation asked for {spec.threads} threads; the worker has {cores} usable cores, so latency "
            f"was measured with {threads}."
        )
    if labels_seen and labels_unusable is not None:
        warnings.append(f"The dataset has labels but accuracy was not measured: {labels_unusable}.")
    if reused_calibration:
        warnings.append(
            "The evaluation reused the calibration samples: the quantizer has seen this data, so fidelity "
            "and accuracy may look better than on new data. Give a separate evaluation dataset."
        )
    if data is None:
        warnings.append(
            f"No evaluation dataset: fidelity was measured on {samples} random inputs, which may not look "
            "like real data, and accuracy was not measured."
        )
    if data_cut_short:
        warnings.append(
            f"The evaluation's time limit ({spec.max_seconds:g} s) cut the data pass short: fidelity and "
            f"accuracy were measured on the first {samples} samples only."
        )
    if timings.stopped_early:
        warnings.append(
            f"The evaluation's time limit ({spec.max_seconds:g} s) cut latency measurement short: "
            f"{timings.rounds_done} of {runs_requested} timed runs per model were done."
        )

    evaluation = {
        "inputs": "dataset" if data is not None else "random",
        "samples": samples,
        "feeds": feeds_done,
        "batch_size": latency_samples,
        "batch_size_requested": batch_size,
        "threads": threads,
        "threads_requested": spec.threads,
        "threads_clamped": spec.threads is not None and spec.threads > threads,
        "execution_provider": "CPUExecutionProvider",
        "warmup_runs": timings.warmup_rounds,
        "latency_runs_requested": runs_requested,
        "latency_runs": timings.rounds_done,
        "interleaved": True,
        "stopped_early": timings.stopped_early or data_cut_short,
        "max_seconds": spec.max_seconds,
        "max_samples": max_samples,
        "reused_calibration": reused_calibration,
        "accuracy_output": accuracy_output,
        "accuracy_tolerance": accuracy_tolerance,
        "session_options": {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "all",
            "allow_spinning": False,
        },
        "fidelity_thresholds": {
            "cosine": metrics.POOR_COSINE,
            "sqnr_db": metrics.POOR_SQNR_DB,
            "sqnr_cap_db": metrics.SQNR_CAP_DB,
        },
    }
    progress(Stage.EVALUATING, 1.0)
    return EvaluationOutcome(
        original=_json_safe(model_metrics["original"]),
        quantized=_json_safe(model_metrics["quantized"]),
        comparison=_json_safe(comparison),
        warnings=warnings,
        machine=_json_safe(machine_info(threads)),
        evaluation=_json_safe(evaluation),
        timings_s={
            "evaluation_sessions": sessions_done - started,
            "evaluation_data": data_done - sessions_done,
            "evaluation_latency": latency_done - data_done,
            "evaluation_total": time.perf_counter() - started,
        },
    )


def _model_metrics(
    size: int, stats: LatencyStats, batch: int, create_ms: float, acc: metrics.AccuracyAccumulator
) -> dict[str, Any]:
    """The contract's ModelMetrics, plus session_create_ms, top5_accuracy, batch_size and runs."""
    return {
        "size_bytes": size,
        "latency_ms": stats.latency_ms(),
        "throughput_per_s": stats.throughput_per_s(batch),
        "accuracy": acc.top1_accuracy,
        "top5_accuracy": acc.top5_accuracy,
        "session_create_ms": create_ms,
        "batch_size": batch,
        "runs": stats.runs,
    }


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return metrics.finite_or_none(value)
    return value


class LatencyMeter:
    """Times a candidate against the reference model on one feed, interleaved (what mode auto's search
    uses; tests substitute a deterministic meter with the same `compare`). The reference's session is
    made once and kept."""

    def __init__(self, reference: Path, feed: dict[str, np.ndarray], *, threads: int | None, warmup_runs: int) -> None:
        self.reference = Path(reference)
        self.feed = feed
        self.threads = threads or usable_cores()
        self.warmup_runs = warmup_runs
        self._reference: ort.InferenceSession | None = None

    def _session(self, path: Path, which: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(path), sess_options=session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise _ort_error(which, "load", exc) from exc

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        """(reference p50 ms, candidate p50 ms) from `runs` interleaved rounds after warm-up."""
        ref, (p50,) = self.compare_many([candidate], runs)
        return ref, p50

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        """(reference p50 ms, each candidate's p50 ms) from `runs` rounds after warm-up, each round
        running the reference and every candidate once: one timing in which they all share the
        machine's state, so that candidates are compared with each other, not only with float."""
        if self._reference is None:
            self._reference = self._session(self.reference, "original")
        sessions = [self._reference, *(self._session(c, "candidate") for c in candidates)]
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
