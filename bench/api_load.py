"""api_job_poll_rps / api_job_poll_p99_ms: 64 concurrent clients polling `GET /v1/jobs/{id}` for 20 s
against the API as `make run` starts it, beside the same load on `GET /healthz` of the same app in the
same run, the ceiling.

Each client is one keep-alive HTTP/1.1 connection sending its next request as soon as the previous
answer is read (closed loop). The load generator is a minimal asyncio client run in its own process
(`python -m bench.api_load URL PATH CLIENTS SECONDS`): httpx's own per-request cost would make the
client, not the API, the bottleneck on a 2-core machine."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bench import harness
from bench.common import Context, mb, run_json
from bench.models import tiny_model, tiny_npz
from bench.results import Baseline, Measurement

CLIENTS = 64
SECONDS = 20.0
# Issue #21: polling a succeeded job serves its stored result as stored (no validation per request) and
# must run at no less than half the rate of /healthz on the same app.
TARGET_RATIO = 0.5


async def _client(host: str, port: int, path: str, stop_at: float, lat: list[float], stats: dict[str, Any]) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            stats["ok" if status == 200 else "bad"] += 1
            stats[f"status_{status}"] = stats.get(f"status_{status}", 0) + 1
            stats["bytes"] += length or 0
    except (OSError, asyncio.IncompleteReadError) as exc:
        stats["errors"] += 1
        stats.setdefault("error", f"{type(exc).__name__}: {exc}"[:200])
    finally:
        writer.close()


async def _load(url: str, path: str, clients: int, seconds: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lat: list[float] = []
    stats: dict[str, Any] = {"ok": 0, "bad": 0, "errors": 0, "bytes": 0}
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, port, path, start + seconds, lat, stats) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lat.sort()

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None

    return {
        "path": path,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "rps": round(stats["ok"] / elapsed, 1),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        "non_200": stats["bad"],
        "connection_errors": stats["errors"],
        "body_bytes_mean": round(stats["bytes"] / max(1, len(lat))),
        "client_cpu_cores": round((usage.ru_utime + usage.ru_stime) / elapsed, 2),
        "statuses": {k[7:]: v for k, v in stats.items() if k.startswith("status_")},
        **({"error": stats["error"]} if "error" in stats else {}),
    }


def _measure(svc: harness.Service, path: str, clients: int, seconds: float) -> dict[str, Any]:
    api = svc.api_process()
    assert api is not None
    before = harness.rss(api)
    cpu0 = sum(api.cpu_times()[:2])
    with harness.Sampler(lambda: {"api_rss": float(harness.rss(api))}, interval=0.5) as s:
        result, _ = run_json(
            ["-m", "bench.api_load", svc.base_url, path, str(clients), str(seconds)], timeout=seconds + 120
        )
    result["api_cpu_cores"] = round((sum(api.cpu_times()[:2]) - cpu0) / result["seconds"], 2)
    result["api_rss_before_mb"] = mb(before)
    result["api_rss_peak_mb"] = mb(s.peak.get("api_rss"))
    result["api_rss_after_mb"] = mb(harness.rss(api))
    return result


def run(ctx: Context) -> dict[str, Measurement]:
    errors: list[str] = []
    seconds = 5.0 if ctx.quick else SECONDS
    work = ctx.dir("api_load")
    with harness.service(work / "service") as svc:
        with svc.client() as c:
            model_id = harness.upload_model(c, tiny_model(work / "tiny.onnx"))["id"]
            dataset_id = harness.upload_dataset(c, tiny_npz(work / "tiny.npz"))["id"]
            job = harness.create_job(
                c,
                {
                    "model_id": model_id,
                    "calibration_dataset_id": dataset_id,
                    "recipe": {"mode": "static", "calibration_method": "minmax"},
                },
            )
            job = harness.wait_job(c, job["id"])
        if job["status"] != "succeeded":
            errors.append(f"the polled job did not succeed ({harness.job_error(job)}); polled anyway")
        polled = f"/v1/jobs/{job['id']}"
        jobs = _measure(svc, polled, CLIENTS, seconds)
        ctx.log(f"  GET /v1/jobs/{{id}}: {jobs['rps']} req/s, p99 {jobs['p99_ms']} ms")
        hello = _measure(svc, "/healthz", CLIENTS, seconds)
        ctx.log(f"  GET /healthz: {hello['rps']} req/s, p99 {hello['p99_ms']} ms")
    for name, r in (("GET /v1/jobs/{id}", jobs), ("GET /healthz", hello)):
        if r["non_200"] or r["connection_errors"]:
            errors.append(
                f"{name}: {r['non_200']} of {r['requests']} answers were not 200 "
                f"(statuses {r['statuses']}), {r['connection_errors']} connection errors "
                f"{r.get('error', '')}".strip()
            )
    ratio = round(jobs["rps"] / hello["rps"], 3) if jobs["rps"] and hello["rps"] else None
    details = {"clients": CLIENTS, "seconds": seconds, "job_status": job["status"], "jobs": jobs, "healthz": hello}
    what = f"`GET /v1/jobs/{{id}}`, {CLIENTS} concurrent clients, {seconds:.0f} s"
    return {
        "api_job_poll_rps": Measurement(
            what=what,
            unit="req/s",
            value=jobs["rps"],
            baseline=Baseline(what="`GET /healthz`", value=hello["rps"]),
            ratio=ratio,
            target=f"ratio >= {TARGET_RATIO}",
            met=None if ratio is None else ratio >= TARGET_RATIO,
            errors=errors,
            details=details,
        ),
        "api_job_poll_p99_ms": Measurement(
            what=f"{what}: p99 latency",
            unit="ms",
            value=jobs["p99_ms"],
            baseline=Baseline(what="`GET /healthz`", value=hello["p99_ms"]),
            errors=errors,
        ),
    }


def main(argv: list[str]) -> int:
    url, path, clients, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    print(json.dumps(asyncio.run(_load(url, path, clients, seconds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
