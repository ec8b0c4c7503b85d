"""calibration_peak_mb: peak resident memory of a static Percentile
per-channel job with 32, 128 and 512 calibration samples, beside plain `quantize_static` (same model,
same data, same method) in its own process at the counts this machine can hold.

Ours: the maximum of the job's own `result.peak_memory_bytes` (ru_maxrss of `worker.job_process`) and
the RSS of the job process subtree sampled with psutil while the job runs; the whole worker tree
(Celery main + pool child + job process) is reported beside it. The evaluation runs on a separate small
dataset so that the figure is about calibration and the run stays short.

Baseline: `bench.ort_baseline` without evaluation; its RSS is sampled too and it is stopped if it
passes a cap. A count is skipped when the growth measured so far predicts more than the cap
(`CAP_SHARE` of the memory available just before that run: the machine may be shared)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psutil

from bench import harness
from bench.common import MB, ROOT, Context, mb
from bench.models import calibration_npz, conv_model
from bench.results import Baseline, Measurement

TARGET_MB = 1024
FLAT_TARGET = 1.25  # largest / smallest peak over the sample counts
CAP_SHARE = 0.6
RECIPE = {"mode": "static", "calibration_method": "percentile", "per_channel": True}
EVALUATION = {"latency_runs": 5, "warmup_runs": 1}


def _ours(svc: harness.Service, model_id: str, dataset_id: str, eval_id: str) -> dict[str, Any]:
    with svc.client() as c:
        job = harness.create_job(
            c,
            {
                "model_id": model_id,
                "calibration_dataset_id": dataset_id,
                "evaluation_dataset_id": eval_id,
                "recipe": RECIPE,
                "evaluation": EVALUATION,
            },
        )
        t = time.perf_counter()
        with harness.Sampler(svc.memory_probe, interval=0.05) as sampler:
            job = harness.wait_job(c, job["id"], timeout=1800, interval=0.25)
        wall = time.perf_counter() - t
    if job["status"] != "succeeded":
        raise RuntimeError(harness.job_error(job))
    result = job["result"]
    reported = int(result.get("peak_memory_bytes") or 0)
    return {
        "peak_bytes": max(reported, int(sampler.peak.get("job", 0))),
        "reported_peak_bytes": reported,
        "sampled_job_peak_bytes": int(sampler.peak.get("job", 0)),
        "sampled_worker_tree_peak_bytes": int(sampler.peak.get("worker_tree", 0)),
        "samples_taken": sampler.samples,
        "job_wall_s": round(wall, 2),
        "calibration_s": result["timings_s"].get("calibrating"),
        "calibration_samples": (result.get("quantization") or {}).get("calibration_samples"),
    }


def _baseline(model: Any, data: Any, workdir: Any, cap_bytes: int) -> dict[str, Any]:
    """Run plain quantize_static in its own process, sampling its RSS; kill it above `cap_bytes`."""
    argv = [sys.executable, "-m", "bench.ort_baseline", str(model), str(data), str(workdir)]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    capped = False
    try:
        with harness.Sampler(lambda: {"rss": float(harness.rss(ps))}, interval=0.05) as sampler:
            while proc.poll() is None:
                if sampler.peak.get("rss", 0) > cap_bytes:
                    capped = True
                    proc.kill()
                    break
                time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t
    if capped:
        return {
            "capped": True,
            "peak_bytes": None,
            "sampled_peak_bytes": int(sampler.peak["rss"]),
            "wall_s": wall,
        }
    if proc.returncode != 0:
        raise RuntimeError(f"ort_baseline exited with {proc.returncode}: {stderr[-1500:]}")
    import json

    body = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    peak = max(int(body["peak_rss_bytes"]), int(sampler.peak.get("rss", 0)))
    return {
        "capped": False,
        "peak_bytes": peak,
        "reported_peak_bytes": int(body["peak_rss_bytes"]),
        "sampled_peak_bytes": int(sampler.peak.get("rss", 0)),
        "wall_s": round(wall, 2),
        "quantize_s": round(body["quantize_s"], 2),
    }


def run(ctx: Context) -> dict[str, Measurement]:
    errors: list[str] = []
    size = 64 if ctx.quick else 224
    counts = (8, 16, 32) if ctx.quick else (32, 128, 512)
    work = ctx.dir("calibration_memory")
    model = conv_model(work / "conv.onnx", image_size=size)
    eval_data = calibration_npz(work / "eval8.npz", 8, image_size=size, seed=99)
    available = psutil.virtual_memory().available
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    details: dict[str, Any] = {
        "image_size": size,
        "model_bytes": model.stat().st_size,
        "counts": list(counts),
        "available_bytes_at_start": available,
        "ours": {},
        "ort": {},
    }
    with harness.service(work / "service") as svc:
        with svc.client() as c:
            model_id = harness.upload_model(c, model)["id"]
            eval_id = harness.upload_dataset(c, eval_data)["id"]
        for n in counts:
            data = calibration_npz(work / f"calib{n}.npz", n, image_size=size)
            try:
                with svc.client() as c:
                    dataset_id = harness.upload_dataset(c, data)["id"]
                r = _ours(svc, model_id, dataset_id, eval_id)
                details["ours"][str(n)] = r
                ours[str(n)] = mb(r["peak_bytes"])
                ctx.log(
                    f"  ours, {n} samples: {ours[str(n)]} MB (worker tree "
                    f"{mb(r['sampled_worker_tree_peak_bytes'])} MB, job {r['job_wall_s']} s)"
                )
            except Exception as exc:
                ours[str(n)] = None
                errors.append(f"calibration_peak_mb[{n}]: {exc}")
                ctx.log(f"  ours, {n} samples: FAILED {exc}")
            finally:
                data.unlink(missing_ok=True)
    # The baseline after the service is stopped, so that the two never compete for memory.
    measured: list[tuple[int, int]] = []
    for n in counts:
        cap = int(psutil.virtual_memory().available * CAP_SHARE)
        predicted = _predict(measured, n)
        if predicted is not None and predicted > cap:
            theirs[str(n)] = None
            details["ort"][str(n)] = {
                "skipped": True,
                "predicted_bytes": predicted,
                "cap_bytes": cap,
                "reason": f"predicted {mb(predicted)} MB > cap {mb(cap)} MB ({CAP_SHARE:.0%} of the memory available)",
            }
            ctx.log(f"  ORT, {n} samples: skipped (predicted {mb(predicted)} MB > cap {mb(cap)} MB)")
            continue
        data = calibration_npz(work / f"calib{n}.npz", n, image_size=size)
        try:
            r = _baseline(model, data, work / f"ort{n}", cap)
            details["ort"][str(n)] = {**r, "cap_bytes": cap}
            if r["capped"]:
                theirs[str(n)] = None
                ctx.log(f"  ORT, {n} samples: stopped above the cap of {mb(cap)} MB")
            else:
                theirs[str(n)] = mb(r["peak_bytes"])
                measured.append((n, r["peak_bytes"]))
                ctx.log(f"  ORT, {n} samples: {theirs[str(n)]} MB ({r['wall_s']} s)")
        except Exception as exc:
            theirs[str(n)] = None
            errors.append(f"ort_calibration_peak_mb[{n}]: {exc}")
        finally:
            data.unlink(missing_ok=True)
    values = [v for v in ours.values() if v is not None]
    flat = max(values) / min(values) if len(values) == len(counts) and min(values) > 0 else None
    details["flatness"] = round(flat, 3) if flat else None
    skipped = [
        f"{n}: not run, predicted {mb(d['predicted_bytes']):,.0f} MB > {CAP_SHARE:.0%} of the free memory"
        for n, d in details["ort"].items()
        if d.get("skipped")
    ]
    figure = Measurement(
        what=(
            f"Peak RSS of the job, {' / '.join(map(str, counts))} calibration samples "
            f"(static Percentile per-channel, {model.stat().st_size / MB:.0f} MB conv model)"
        ),
        unit="MB",
        value=ours,
        baseline=Baseline(what="`quantize_static`", value=theirs, note="; ".join(skipped)),
        target=f"≤ {TARGET_MB} MB and flat (largest / smallest ≤ {FLAT_TARGET})",
        met=None if flat is None else bool(max(values) <= TARGET_MB and flat <= FLAT_TARGET),
        errors=errors,
        details=details,
    )
    return {"calibration_peak_mb": figure}


def _predict(measured: list[tuple[int, int]], n: int) -> int | None:
    """Peak RSS predicted at `n` samples: linear through the last two points, or proportional to one."""
    if not measured:
        return None
    if len(measured) == 1:
        n0, p0 = measured[0]
        return int(p0 * n / n0)
    (n0, p0), (n1, p1) = measured[-2], measured[-1]
    slope = max(0.0, (p1 - p0) / (n1 - n0))
    return int(p1 + slope * (n - n1))
