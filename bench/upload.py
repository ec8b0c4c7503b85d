"""upload_mb_s / upload_api_rss_growth_mb: a model of about 1 GB whose weights are one external data file,
uploaded as multipart (`file` = the .onnx, `external_data` = the .bin) with httpx streaming both from
disk, beside `cp` of the same bytes into the same data folder as the ceiling. The API process's RSS is
sampled in a thread (before, peak during, after)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import harness
from bench.common import MB, Context, mb
from bench.models import external_data_model
from bench.results import Baseline, Measurement

TARGET_GROWTH_MB = 100
TARGET_CP_RATIO = 0.35
SIZE_BYTES = 1 << 30


def _cp(files: list[Path], dest: Path) -> dict[str, float]:
    """Time `cp` of the files into `dest` (and, apart, an fsync of the copies, since the API fsyncs)."""
    dest.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    cp_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["sync", *[str(dest / f.name) for f in files]], check=True)
    sync_s = time.perf_counter() - t
    shutil.rmtree(dest)
    return {"cp_s": cp_s, "sync_s": sync_s}


def run(ctx: Context) -> dict[str, Measurement]:
    errors: list[str] = []
    size = (64 << 20) if ctx.quick else SIZE_BYTES
    work = ctx.dir("upload")
    disk_free = shutil.disk_usage(work).free
    if disk_free < 5 * size:  # the .bin, its spooled and staged copies, the stored copy, the cp copy
        size = max(64 << 20, disk_free // 8)
        errors.append(f"upload: only {disk_free >> 20} MB free under {work}; the model was reduced to {size >> 20} MB")
    t = time.perf_counter()
    onnx_path, bin_path = external_data_model(work / "big.onnx", size)
    gen_s = time.perf_counter() - t
    files = [onnx_path, bin_path]
    total = sum(f.stat().st_size for f in files)
    ctx.log(f"  generated {total / MB:.0f} MB in {gen_s:.1f} s")
    details: dict[str, Any] = {"bytes": total, "generate_s": round(gen_s, 2)}
    try:
        with harness.service(work / "service") as svc:
            cp = _cp(files, svc.data_dir / "cp-ceiling")  # same file system as the API's staging and storage
            api = svc.api_process()
            assert api is not None
            time.sleep(1.0)
            before = harness.rss(api)
            me = psutil.Process()
            bench_before = harness.rss(me)
            tmp_before = shutil.disk_usage("/tmp").used
            t = time.perf_counter()

            def probe() -> dict[str, float]:
                return {
                    "api": float(harness.rss(api)),
                    "bench": float(harness.rss(me)),
                    "tmp_used": float(shutil.disk_usage("/tmp").used),
                }

            with (
                harness.Sampler(probe, interval=0.02) as sampler,
                svc.client(timeout=1800) as c,
                onnx_path.open("rb") as fm,
                bin_path.open("rb") as fb,
            ):
                # httpx streams file objects in chunks; the 1 GB is never read into memory here.
                response = c.post(
                    "/v1/models",
                    files=[
                        ("file", (onnx_path.name, fm, "application/octet-stream")),
                        ("external_data", (bin_path.name, fb, "application/octet-stream")),
                    ],
                )
            upload_s = time.perf_counter() - t
            after = harness.rss(api)
            if response.status_code != 201:
                raise RuntimeError(f"upload answered {response.status_code}: {response.text[:500]}")
            model = response.json()
            details.update(cp)
            tmp_usage = shutil.disk_usage("/tmp")
            details.update(
                {
                    "upload_s": round(upload_s, 2),
                    "api_rss_before_mb": mb(before),
                    "api_rss_peak_mb": mb(sampler.peak["api"]),
                    "api_rss_after_mb": mb(after),
                    "rss_samples": sampler.samples,
                    "model_id": model["id"],
                    "stored_size_bytes": model.get("size_bytes"),
                    "tmp_free_bytes_after": tmp_usage.free,
                    "tmp_extra_peak_mb": mb(sampler.peak["tmp_used"] - tmp_before),
                    "benchmark_rss_growth_mb": mb(sampler.peak["bench"] - bench_before),
                }
            )
            # A second look a little later: does the API give the memory back?
            time.sleep(2.0)
            details["api_rss_2s_later_mb"] = mb(harness.rss(api))
            with svc.client() as c:
                c.delete(f"/v1/models/{model['id']}")
    except httpx.HTTPError as exc:
        raise RuntimeError(f"upload failed: {exc!r}") from exc
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    upload_mb_s = total / MB / details["upload_s"]
    cp_mb_s = total / MB / details["cp_s"]
    growth = (details["api_rss_peak_mb"] or 0) - (details["api_rss_before_mb"] or 0)
    details["cp_mb_s"] = round(cp_mb_s, 1)
    details["cp_sync_mb_s"] = round(total / MB / (details["cp_s"] + details["sync_s"]), 1)
    what = f"Upload of a {total / MB:,.0f} MB model (external data)"
    return {
        "upload_mb_s": Measurement(
            what=what,
            unit="MB/s",
            value=round(upload_mb_s, 1),
            baseline=Baseline(what="`cp`", value=round(cp_mb_s, 1)),
            ratio=round(upload_mb_s / cp_mb_s, 3),
            target=f">= {TARGET_CP_RATIO} of `cp`",
            met=upload_mb_s / cp_mb_s >= TARGET_CP_RATIO,
            errors=errors,
            details=details,
        ),
        "upload_api_rss_growth_mb": Measurement(
            what=f"{what}: API RSS growth (peak - before)",
            unit="MB",
            value=round(growth, 1),
            target=f"< {TARGET_GROWTH_MB} MB",
            met=growth < TARGET_GROWTH_MB,
            errors=errors,
        ),
    }
