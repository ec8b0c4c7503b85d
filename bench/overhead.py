"""job_end_to_end_s: one static Percentile per-channel job with its evaluation, end to end through HTTP on
the embedded default (upload model, upload data, create job, poll, download every artifact), beside
`bench.ort_baseline` doing the same quantization and evaluation in one fresh Python process (imports
included); their ratio is the service's overhead. Each side runs `repeats` times, alternating; the fastest run of
each side is compared."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from bench import harness
from bench.common import MB, Context, run_json
from bench.models import calibration_npz, conv_model
from bench.results import Baseline, Measurement

TARGET = 1.15
SAMPLES = 32
LATENCY_RUNS = 50  # the service's default evaluation
WARMUP_RUNS = 5
RECIPE = {"mode": "static", "calibration_method": "percentile", "per_channel": True}


def _service_run(svc: harness.Service, model: Any, data: Any, dest: Any) -> dict[str, Any]:
    with svc.client() as c:
        t0 = time.perf_counter()
        model_id = harness.upload_model(c, model)["id"]
        dataset_id = harness.upload_dataset(c, data)["id"]
        t_uploaded = time.perf_counter()
        job = harness.create_job(
            c,
            {
                "model_id": model_id,
                "calibration_dataset_id": dataset_id,
                "recipe": RECIPE,
                "evaluation": {"latency_runs": LATENCY_RUNS, "warmup_runs": WARMUP_RUNS},
            },
        )
        job = harness.wait_job(c, job["id"])
        t_done = time.perf_counter()
        if job["status"] != "succeeded":
            raise RuntimeError(harness.job_error(job))
        received = harness.download_artifacts(c, job["id"], dest)
        t_end = time.perf_counter()
    result = job["result"]

    def at(key: str) -> float:
        return dt.datetime.fromisoformat(job[key].replace("Z", "+00:00")).timestamp()

    return {
        "queued_s": round(at("started_at") - at("created_at"), 3),  # server clock: message to claim
        "running_s": round(at("finished_at") - at("started_at"), 3),  # claim to result stored
        "total_s": t_end - t0,
        "uploads_s": t_uploaded - t0,
        "job_s": t_done - t_uploaded,
        "download_s": t_end - t_done,
        "downloaded_bytes": received,
        "engine_total_s": result["timings_s"].get("total"),
        "timings_s": result["timings_s"],
        "cosine": result["comparison"]["outputs"][0].get("cosine"),
        "sqnr_db": result["comparison"]["outputs"][0].get("sqnr_db"),
        "speedup_p50": result["comparison"].get("speedup_p50"),
        "peak_memory_mb": round(result.get("peak_memory_bytes", 0) / (1 << 20), 1),
    }


def run(ctx: Context) -> dict[str, Measurement]:
    size = 64 if ctx.quick else 224
    repeats = 1 if ctx.quick else 2
    work = ctx.dir("overhead")
    model = conv_model(work / "conv.onnx", image_size=size)
    data = calibration_npz(work / f"calib{SAMPLES}.npz", SAMPLES, image_size=size)
    runs: dict[str, list[dict[str, Any]]] = {"service": [], "baseline": []}
    with harness.service(work / "service") as svc:
        for i in range(repeats):
            r = _service_run(svc, model, data, work / f"download{i}")
            ctx.log(
                f"  service run {i + 1}: {r['total_s']:.2f} s (job {r['job_s']:.2f} s, engine {r['engine_total_s']} s)"
            )
            runs["service"].append(r)
            b, wall = run_json(
                [
                    "-m",
                    "bench.ort_baseline",
                    str(model),
                    str(data),
                    str(work / f"baseline{i}"),
                    "--preprocess",
                    "--evaluate",
                    "--latency-runs",
                    str(LATENCY_RUNS),
                    "--warmup-runs",
                    str(WARMUP_RUNS),
                ],
                timeout=1800,
            )
            b["wall_s"] = wall
            ctx.log(
                f"  baseline run {i + 1}: {wall:.2f} s "
                f"(quantize {b['quantize_s']:.2f} s, evaluate {b['evaluate_s']:.2f} s)"
            )
            runs["baseline"].append(b)
    ours = min(r["total_s"] for r in runs["service"])
    base = min(b["wall_s"] for b in runs["baseline"])
    ratio = ours / base
    what = (
        f"Static Percentile per-channel job + evaluation, {model.stat().st_size / MB:.0f} MB conv model, "
        f"{size}x{size}, {SAMPLES} samples, end to end over HTTP"
    )
    figure = Measurement(
        what=what,
        unit="s",
        value=round(ours, 2),
        baseline=Baseline(what="one ONNX Runtime script", value=round(base, 2)),
        ratio=round(ratio, 3),
        target=f"ratio ≤ {TARGET}",
        met=ratio <= TARGET,
        details={
            "model_bytes": model.stat().st_size,
            "image_size": size,
            "samples": SAMPLES,
            "latency_runs": LATENCY_RUNS,
            "warmup_runs": WARMUP_RUNS,
            "repeats": repeats,
            "service_runs": runs["service"],
            "baseline_runs": runs["baseline"],
        },
    )
    return {"job_end_to_end_s": figure}
