"""`python -m bench --only auto`: mode auto on the models its tests use (bigger), side by side with
the best whole-model recipe, a plain ONNX Runtime script, and NNCF's accuracy control.

Models, built in code (tests/onnx_models.py, tests/ocr_models.py, tests/worker/engine/pitfall_models.py):
- `encoder`: a 4-layer transformer encoder whose FFN down-projections read an outlier channel;
- `cnn`: a CNN whose first conv reads an input with one huge channel;
- `tiny_mlp`: a model so small that int8 cannot beat float (auto should keep float);
- `recognizer`: a PP-OCR-style text recognizer as Paddle2ONNX writes it (opset 11, batch -1,
  weights in Constant nodes), 3x48x320 text lines, per-step CTC scores (budget: per-step argmax
  agreement); its last conv carries an outlier channel;
- `detector`: a DBNet-style text detector, 3x320x320, a probability map (budget: cosine); its FPN
  levels differ in scale;
- `audio`: a streaming voice-activity model whose body sits in `If` branches (opset 15).
Paddle2ONNX's -1 dims are declared unknown first, as the job process does.

For each: auto's speedup (the final evaluation's p50 ratio, interleaved against float) and fidelity
(its worst budgeted output, default floor 0.99); the best whole-model candidate auto measured; a
plain script (`quantize_dynamic` for MatMul models, `quantize_static` for the CNN, defaults); and,
when the optional `bench` extra is installed (`pip install -e '.[bench]'`: nncf, without torch),
`nncf.quantize_with_accuracy_control` with the same data, a 0.01 absolute drop of the same fidelity
metric, and the same latency measurement. `measure(ctx)` returns the figures; `run(ctx)` the table.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Context
from bench.results import Baseline, Measurement
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.recipe import Recipe
from tests.ocr_models import ocr_detector, ocr_recognizer, scene_images, text_lines
from tests.onnx_models import encoder_inputs, matmul_mlp, outlier_encoder, spiky_cnn, spiky_images
from tests.worker.engine.pitfall_models import streaming_audio
from worker.engine.auto import auto_quantize
from worker.engine.data import iter_batches, model_inputs
from worker.engine.evaluate import LatencyMeter
from worker.engine.fidelity import FidelityEvaluator
from worker.engine.preprocess import runnable_original

LATENCY_RUNS = 50
NNCF_MAX_DROP = 0.01


@dataclass
class ModelFigures:
    model: str
    verdict: str
    chosen: str
    metric: str
    auto_speedup: float | None
    auto_fidelity: float | None
    auto_seconds: float
    best_whole: str | None
    best_whole_speedup: float | None
    best_whole_fidelity: float | None
    plain_recipe: str
    plain_speedup: float | None
    plain_fidelity: float | None
    plain_error: str | None = None
    # The pre-flight's verdict and its predicted best whole-model int8 speedup, beside the best one measured
    # (any budget): how far the one-layer timings are from the whole graph on this machine.
    preflight_verdict: str | None = None
    preflight_speedup: float | None = None
    best_int8_speedup: float | None = None
    nncf_speedup: float | None = None
    nncf_fidelity: float | None = None
    nncf_seconds: float | None = None
    nncf_error: str | None = None


@dataclass
class BenchModel:
    name: str
    path: Path
    data: Path
    plain: str  # "dynamic" | "static"


def _models(ctx: Context) -> list[BenchModel]:
    work = ctx.dir("auto")
    quick = ctx.quick
    seq, samples = (16, 16) if quick else (64, 48)
    enc = outlier_encoder(
        work / "encoder.onnx",
        vocab=1000,
        dim=64 if quick else 256,
        ffn=256 if quick else 1024,
        layers=2 if quick else 4,
    )
    np.savez(work / "encoder.npz", **encoder_inputs(samples, seq=seq, vocab=1000))
    cnn = spiky_cnn(work / "cnn.onnx", size=32 if quick else 64, hidden=32 if quick else 64)
    np.savez(work / "cnn.npz", input=spiky_images(samples, size=32 if quick else 64, spike=4000.0))
    mlp = matmul_mlp(work / "tiny_mlp.onnx")
    np.savez(work / "tiny_mlp.npz", x=np.random.default_rng(0).random((samples, 1, 16), dtype=np.float32))
    height, width = (32, 128) if quick else (48, 320)
    rec = ocr_recognizer(
        work / "recognizer.onnx",
        height=height,
        channels=(16, 32, 96, 128, 256) if quick else (32, 64, 192, 256, 512),
        dim=96 if quick else 128,
    )
    np.savez(work / "recognizer.npz", x=text_lines(samples, height=height, width=width, seed=3))
    size = 64 if quick else 320
    det = ocr_detector(
        work / "detector.onnx",
        size=size,
        channels=(16, 24, 40, 64) if quick else (16, 24, 48, 96),
        inner=32 if quick else 64,
        level_spread=20.0 if quick else 100.0,
    )
    np.savez(work / "detector.npz", x=scene_images(min(samples, 32), size=size, seed=3))
    hidden, layers = (16, 2) if quick else (64, 2)
    audio = streaming_audio(work / "audio.onnx", hidden=hidden, channels=8 if quick else 32, layers=layers)
    rng = np.random.default_rng(0)
    np.savez(
        work / "audio.npz",
        audio=rng.normal(0, 0.3, (samples, 1, 512 if quick else 1536)).astype(np.float32),
        state=rng.normal(0, 0.5, (samples, layers, 1, hidden)).astype(np.float32),
        sr=np.full((samples,), 16000, np.int64),
    )
    models = [
        BenchModel("encoder", enc, work / "encoder.npz", "dynamic"),
        BenchModel("cnn", cnn, work / "cnn.npz", "static"),
        BenchModel("tiny_mlp", mlp, work / "tiny_mlp.npz", "dynamic"),
        BenchModel("recognizer", rec, work / "recognizer.npz", "static"),
        BenchModel("detector", det, work / "detector.npz", "static"),
        BenchModel("audio", audio, work / "audio.npz", "dynamic"),
    ]
    for m in models:  # Paddle2ONNX's -1 dims declared unknown, as the job process does
        m.path, _ = runnable_original(m.path, work / f"{m.name}-runnable")
    return models


def _feeds(model: BenchModel) -> list[dict[str, np.ndarray]]:
    source = DatasetSource(model.data, "npz")
    return [b.feeds for b in iter_batches(source, model_inputs(model.path), batch_size=1)]


def _judge(model: BenchModel, evaluation: EvaluationSpec) -> tuple[FidelityEvaluator, LatencyMeter]:
    inputs = model_inputs(model.path)
    source = DatasetSource(model.data, "npz")
    evaluator = FidelityEvaluator(model.path, source, inputs, None, 0.01, max_samples=evaluation.max_samples or 64)
    meter = LatencyMeter(model.path, _feeds(model)[0], threads=None, warmup_runs=evaluation.warmup_runs)
    return evaluator, meter


def _plain(model: BenchModel, out: Path) -> Path:
    """What a user following ONNX Runtime's documentation writes: defaults, no pre-processing."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    if model.plain == "dynamic":
        quantize_dynamic(str(model.path), str(out))
        return out
    feeds = iter(_feeds(model))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    quantize_static(str(model.path), str(out), Reader())
    return out


def _nncf(model: BenchModel, out: Path, evaluator: FidelityEvaluator) -> Path:
    return nncf_quantize(model.path, _feeds(model), evaluator, out)


def nncf_quantize(
    model: Path,
    feeds: list[dict[str, np.ndarray]],
    evaluator: FidelityEvaluator,
    out: Path,
    evaluations: list[float] | None = None,
) -> Path:
    """NNCF's accuracy control on the ONNX model: calibrate on `feeds`, and keep the budget's metric (the
    evaluator's: the worst budgeted output's value of the metric its kind decides, against the float model's
    outputs on the evaluation data) within NNCF_MAX_DROP of float's 1.0: the floor mode auto works to.
    `evaluations` collects the metric of every model NNCF validated."""
    import nncf
    import onnx

    scratch = out.parent / "nncf-candidate.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)

    def validate(candidate: Any, data: Any) -> float:
        onnx.save(candidate, str(scratch))
        fidelity = evaluator.score(scratch).fidelity
        value = 0.0 if fidelity is None or not np.isfinite(fidelity) else float(fidelity)
        if evaluations is not None:
            evaluations.append(value)
        return value

    quantized = nncf.quantize_with_accuracy_control(
        onnx.load(str(model)),
        calibration_dataset=nncf.Dataset(feeds),
        validation_dataset=nncf.Dataset(feeds[:1]),  # `validate` scores on the evaluator's own data
        validation_fn=validate,
        max_drop=NNCF_MAX_DROP,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(feeds),
    )
    onnx.save(quantized, str(out))
    scratch.unlink(missing_ok=True)
    return out


def measure(ctx: Context) -> dict[str, ModelFigures]:
    """Run everything; figures per model."""
    logging.getLogger("nncf").setLevel(logging.WARNING)
    evaluation = EvaluationSpec(latency_runs=10 if ctx.quick else LATENCY_RUNS, warmup_runs=3, max_samples=64)
    has_nncf = importlib.util.find_spec("nncf") is not None
    results: dict[str, ModelFigures] = {}
    for model in _models(ctx):
        ctx.log(f"  {model.name}: mode auto")
        source = DatasetSource(model.data, "npz")
        t = time.perf_counter()
        outcome, measured = auto_quantize(
            model.path,
            Recipe(mode="auto", max_search_seconds=300 if ctx.quick else 900),
            ctx.dir(f"auto/{model.name}-work"),
            evaluation,
            calibration=source,
            data=source,
            note=lambda note, name=model.name: ctx.log(f"    {name}: {note.text}"),
        )
        auto_seconds = time.perf_counter() - t
        assert outcome.facts.auto is not None
        search = outcome.facts.auto.model_dump(mode="json")
        fidelity = measured.comparison.fidelity.model_dump() if measured.comparison.fidelity else {}
        whole = [c for c in search["candidates"] if not c["error"]]
        fits = [c for c in whole if c["within_budget"]]
        best = (
            max(fits, key=lambda c: c["speedup"] or 0.0)
            if fits
            else max(whole, key=lambda c: c["fidelity"] or 0.0, default=None)
        )
        evaluator, meter = _judge(model, evaluation)
        ctx.log(f"  {model.name}: plain quantize_{model.plain}")
        plain_speedup = plain_fidelity = plain_error = None
        try:
            plain = _plain(model, ctx.dir(f"auto/{model.name}-plain") / "model.onnx")
            plain_ref, plain_p50 = meter.compare(plain, evaluation.latency_runs)
            plain_speedup = plain_ref / plain_p50 if plain_p50 else None
            plain_fidelity = evaluator.score(plain).fidelity
        except Exception as exc:  # what a user following the documentation meets is a figure too
            plain_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        figures = ModelFigures(
            model=model.name,
            verdict=search["verdict"],
            chosen=search["chosen"],
            metric=str(fidelity.get("metric") or evaluator.score(model.path).metric),
            auto_speedup=measured.comparison.speedup_p50,
            auto_fidelity=fidelity.get("fidelity") if fidelity else 1.0,  # no fidelity: the float model itself
            auto_seconds=round(auto_seconds, 1),
            best_whole=best["name"] if best else None,
            best_whole_speedup=best["speedup"] if best else None,
            best_whole_fidelity=best["fidelity"] if best else None,
            plain_recipe=f"quantize_{model.plain} (defaults)",
            plain_speedup=plain_speedup,
            plain_fidelity=plain_fidelity,
            plain_error=plain_error,
        )
        pre = search.get("preflight")
        if pre:
            predicted = [v for v in pre["speedups"].values() if v is not None]
            figures.preflight_verdict = pre["verdict"]
            figures.preflight_speedup = max(predicted, default=None)
        int8 = [c["speedup"] for c in whole if c["recipe"]["mode"] in ("static", "dynamic") and c["speedup"]]
        figures.best_int8_speedup = max(int8, default=None)
        if has_nncf:
            ctx.log(f"  {model.name}: nncf.quantize_with_accuracy_control")
            try:
                t = time.perf_counter()
                path = _nncf(model, ctx.dir(f"auto/{model.name}-nncf") / "model.onnx", evaluator)
                seconds = time.perf_counter() - t
                ref_p50, p50 = meter.compare(path, evaluation.latency_runs)
                figures.nncf_speedup = ref_p50 / p50 if p50 else None
                figures.nncf_fidelity = evaluator.score(path).fidelity
                figures.nncf_seconds = round(seconds, 1)
            except Exception as exc:  # a peer's failure is a figure too
                figures.nncf_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        results[model.name] = figures
        ctx.log(f"  {model.name}: {asdict(figures)}")
    return results


def run(ctx: Context) -> dict[str, Measurement]:
    """The figures, per model: auto's speedup against the best whole-model candidate, its
    fidelity against the plain ORT script's, and NNCF's speedup where the `bench` extra is installed."""
    results = measure(ctx)
    details = {m: asdict(f) for m, f in results.items()}
    nncf = {m: f.nncf_speedup for m, f in results.items() if f.nncf_speedup is not None}
    nncf_errors = [f"NNCF on {m}: {f.nncf_error}" for m, f in results.items() if f.nncf_error]
    return {
        "auto_speedup": Measurement(
            what="Mode auto: speedup of its pick over float (p50), per model",
            unit="x",
            value={m: _round(f.auto_speedup) for m, f in results.items()},
            baseline=Baseline(
                what="the best whole-model candidate",
                value={m: _round(f.best_whole_speedup) for m, f in results.items()},
            ),
            details=details,
        ),
        "auto_fidelity": Measurement(
            what="Mode auto: fidelity of its pick (the budget's metric), per model",
            unit="",
            value={m: _round(f.auto_fidelity) for m, f in results.items()},
            baseline=Baseline(
                what="a plain quantize_dynamic/quantize_static script",
                value={m: _round(f.plain_fidelity) for m, f in results.items()},
            ),
            target=">= 0.99",
            met=all(f.auto_fidelity is not None and f.auto_fidelity >= 0.99 - 1e-9 for f in results.values()),
        ),
        "nncf_speedup": Measurement(
            what="NNCF quantize_with_accuracy_control: speedup over float, per model",
            unit="x",
            value={m: _round(v) for m, v in nncf.items()} or None,
            errors=nncf_errors if nncf or nncf_errors else ["nncf is not installed (pip install -e '.[bench]')"],
        ),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
