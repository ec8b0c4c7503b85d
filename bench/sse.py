"""sse_job_poll_rps / sse_job_poll_p50_ms: what 200 open job event streams (`GET /v1/jobs/{id}/events`)
cost the API's busiest read. `GET /v1/jobs/{id}` is loaded by 64 closed-loop clients (bench.api_load's
load generator) twice while a job runs: without streams (the baseline), then with 200 streams open on
that running job, each receiving its progress events. Slowdown = requests per second without streams /
with them (target <= 1.2: at most 20%).

The streams are held by a separate process (`python -m bench.sse URL PATH N SECONDS`), one raw asyncio
connection each, counting the events and heartbeats they receive."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bench import harness
from bench.api_load import _measure
from bench.common import ROOT, Context
from bench.models import calibration_npz, conv_model
from bench.results import Baseline, Measurement

STREAMS = 200
CLIENTS = 64
SECONDS = 15.0
TARGET = 1.2


async def _stream(host: str, port: int, path: str, stop: asyncio.Event, stats: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats["errors"] += 1
        return
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            stats["errors"] += 1
            return
        stats["open"] += 1
        while not stop.is_set():
            reading = asyncio.ensure_future(reader.readline())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not reading.done():
                reading.cancel()
                break
            line = reading.result()
            if not line:
                stats["ended"] += 1
                break
            text = line.decode(errors="replace")
            if "event: " in text:
                stats["events"] += 1
            elif text.startswith(":"):
                stats["heartbeats"] += 1
    except (OSError, asyncio.IncompleteReadError):
        stats["errors"] += 1
    finally:
        writer.close()


async def _hold(url: str, path: str, streams: int, seconds: float) -> dict[str, int]:
    """Open the streams, say so, and read them until stdin closes (or `seconds` pass)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stats = {"open": 0, "events": 0, "heartbeats": 0, "ended": 0, "errors": 0}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_stream(host, port, path, stop, stats)) for _ in range(streams)]
    deadline = time.perf_counter() + seconds
    while stats["open"] + stats["errors"] < streams and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": stats["open"]}), flush=True)  # the parent starts its load now
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), timeout=max(1.0, deadline - time.perf_counter()))
    stop.set()
    await asyncio.gather(*tasks)
    return stats


def measure(ctx: Context) -> dict[str, Any]:
    """Both loads, the streams' own counts and the job's stage meanwhile."""
    seconds = 5.0 if ctx.quick else SECONDS
    streams = 50 if ctx.quick else STREAMS
    work = ctx.dir("sse")
    # A job long enough to run through both measurements: many latency runs of a small conv model.
    env = {"QAAS_MAX_LATENCY_RUNS": "1000000", "QAAS_EVALUATION_MAX_SECONDS": "3600"}
    with harness.service(work / "service", **env) as svc:
        with svc.client() as c:
            model_id = harness.upload_model(c, conv_model(work / "conv.onnx", image_size=64))["id"]
            data_id = harness.upload_dataset(c, calibration_npz(work / "calib.npz", 4, image_size=64))["id"]
            body = {
                "model_id": model_id,
                "calibration_dataset_id": data_id,
                "recipe": {"mode": "static"},
                "evaluation": {"latency_runs": 100_000, "warmup_runs": 1},
            }
            job_id = harness.create_job(c, body)["id"]
            deadline = time.monotonic() + 120
            while c.get(f"/v1/jobs/{job_id}").json()["stage"] != "evaluating" and time.monotonic() < deadline:
                time.sleep(0.2)
        path = f"/v1/jobs/{job_id}"
        without = _measure(svc, path, CLIENTS, seconds)
        ctx.log(f"  GET /v1/jobs/{{id}} without streams: {without['rps']} req/s, p50 {without['p50_ms']} ms")
        holder = subprocess.Popen(
            [sys.executable, "-m", "bench.sse", svc.base_url, f"{path}/events", str(streams), str(seconds + 60)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            ready = json.loads(holder.stdout.readline())["ready"]
            with_streams = _measure(svc, path, CLIENTS, seconds)
            open_during = _open_streams(svc)
        finally:
            out, _ = holder.communicate(timeout=60)  # closing its stdin ends the streams
        ctx.log(f"  with {ready} streams: {with_streams['rps']} req/s, p50 {with_streams['p50_ms']} ms")
        with svc.client() as c:
            job = c.get(path).json()
            c.post(f"{path}/cancel")
    held = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {
        "streams_requested": streams,
        "streams_open": ready,
        "streams_seen_by_api": open_during,
        "stream_stats": held,
        "clients": CLIENTS,
        "seconds": seconds,
        "job_stage_during": job["stage"],
        "without_streams": without,
        "with_streams": with_streams,
    }


def _open_streams(svc: harness.Service) -> int | None:
    """Open streams as the API's own /metrics counts them (embedded default: no token needed)."""
    with svc.client() as c:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith("qaas_event_streams "):
                return int(float(line.split()[1]))
    return None


def run(ctx: Context) -> dict[str, Measurement]:
    details = measure(ctx)
    errors = []
    if details["streams_open"] < details["streams_requested"]:
        errors.append(f"only {details['streams_open']} of {details['streams_requested']} streams opened")
    if details["job_stage_during"] != "evaluating":
        errors.append(f"the job was {details['job_stage_during']}, not evaluating, by the end of the load")
    without, with_streams = details["without_streams"], details["with_streams"]
    slowdown = without["rps"] / with_streams["rps"] if with_streams["rps"] else None
    what = f"`GET /v1/jobs/{{id}}`, {CLIENTS} clients, with {details['streams_open']} event streams open on the job"
    return {
        "sse_job_poll_rps": Measurement(
            what=what,
            unit="req/s",
            value=with_streams["rps"],
            baseline=Baseline(what="no streams open", value=without["rps"]),
            ratio=None if slowdown is None else round(1 / slowdown, 3),
            target=f"slowdown <= {TARGET} (ratio >= {1 / TARGET:.2f})",
            met=None if slowdown is None else slowdown <= TARGET,
            errors=errors,
            details=details,
        ),
        "sse_job_poll_p50_ms": Measurement(
            what=f"{what}: p50 latency",
            unit="ms",
            value=with_streams["p50_ms"],
            baseline=Baseline(what="no streams open", value=without["p50_ms"]),
            ratio=round(with_streams["p50_ms"] / without["p50_ms"], 3) if without["p50_ms"] else None,
            errors=errors,
        ),
    }


def main(argv: list[str]) -> int:
    url, path, streams, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    print(json.dumps(asyncio.run(_hold(url, path, streams, seconds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
