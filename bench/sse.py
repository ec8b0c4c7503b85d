"""sse_job_poll_rps / sse_job_poll_p50_ms: what 200 open job event streams (`GET /v1/jobs/{id}/events`)
cost the API's busiest read. `GET /v1/jobs/{id}` is loaded by 64 closed-loop clients (bench.api_load's
load generator) while a job runs, in phases without streams (the baseline) and with 200 streams open on
that running job, each receiving its progress events. Slowdown = requests per second without streams /
with them, over all phases of each kind (target <= 1.2: at most 20%).

The phases alternate without, with, with, without, ... (ABBA): this machine's speed drifts by tens of
percent within a minute, which one phase of each would measure instead of the streams. The per-phase
figures are kept in the details. The job evaluates with the default threads (all cores), as a user's would.

The streams are held by a separate process (`python -m bench.sse URL PATH N`), one raw asyncio connection
each, counting the events and heartbeats they receive; it opens them on `open` and closes them on `close`
(lines on its stdin)."""

from __future__ import annotations

import asyncio
import json
import statistics
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
PHASES = 8
SECONDS = 5.0  # per phase
TARGET = 1.2


async def _stream(host: str, port: int, path: str, stats: dict[str, int]) -> None:
    """One stream, read in chunks until the server ends it or the task is cancelled. Chunks, not lines: the
    holder stands for clients on other machines, so its own CPU (which the API's shares here) is kept low."""
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
        carry = b""
        while chunk := await reader.read(65536):
            *lines, carry = (carry + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"event: "):
                    stats["events"] += 1
                elif line.startswith(b":"):
                    stats["heartbeats"] += 1
        stats["ended"] += 1
    except (OSError, asyncio.IncompleteReadError):
        stats["errors"] += 1
    finally:
        writer.close()


async def _hold(url: str, path: str, streams: int) -> None:
    """Open `streams` streams on each `open` line of stdin and close them on `close`, answering each with a
    JSON line (how many opened; then what they received). Ends at the end of stdin."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    stats: dict[str, Any] = {}
    cpu0 = 0.0
    while command := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if command == "open":
            stats = {"open": 0, "events": 0, "heartbeats": 0, "ended": 0, "errors": 0}
            cpu0 = time.process_time()
            tasks = [asyncio.create_task(_stream(host, port, path, stats)) for _ in range(streams)]
            deadline = time.perf_counter() + 30
            while stats["open"] + stats["errors"] < streams and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            print(json.dumps({"ready": stats["open"]}), flush=True)
        elif command == "close":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stats["cpu_s"] = round(time.process_time() - cpu0, 2)
            print(json.dumps(stats), flush=True)


def measure(ctx: Context) -> dict[str, Any]:
    """The phases of both kinds, the streams' own counts and the job's stage meanwhile."""
    phases = 4 if ctx.quick else PHASES
    seconds = 2.0 if ctx.quick else SECONDS
    streams = 50 if ctx.quick else STREAMS
    work = ctx.dir("sse")
    # A job long enough to run through every phase: many latency runs of a small conv model.
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
        holder = subprocess.Popen(
            [sys.executable, "-m", "bench.sse", svc.base_url, f"{path}/events", str(streams)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        commands, answers = holder.stdin, holder.stdout
        assert commands is not None and answers is not None

        def tell(command: str) -> dict[str, Any]:
            commands.write(command + "\n")
            commands.flush()
            answer: dict[str, Any] = json.loads(answers.readline())
            return answer

        runs: list[dict[str, Any]] = []
        try:
            for i in range(phases):
                with_streams = i % 4 in (1, 2)  # without, with, with, without, ...
                opened = tell("open")["ready"] if with_streams else None
                load = _measure(svc, path, CLIENTS, seconds)
                if with_streams:
                    load["streams_open"] = opened
                    load["streams_seen_by_api"] = _open_streams(svc)
                    load["stream_stats"] = tell("close")
                runs.append({"streams": with_streams, **load})
                ctx.log(
                    f"  phase {i + 1}: {'with' if with_streams else 'without'} streams: {load['rps']} req/s,"
                    f" p50 {load['p50_ms']} ms"
                )
        finally:
            holder.communicate(timeout=60)  # closing its stdin ends it
        with svc.client() as c:
            job = c.get(path).json()
            c.post(f"{path}/cancel")
    with_runs = [r for r in runs if r["streams"]]
    return {
        "streams_requested": streams,
        "streams_open": min(r["streams_open"] for r in with_runs),
        "streams_seen_by_api": min(r["streams_seen_by_api"] or 0 for r in with_runs),
        "clients": CLIENTS,
        "phases": len(runs),
        "seconds_per_phase": seconds,
        "job_stage_during": job["stage"],
        "without_streams": _pooled([r for r in runs if not r["streams"]]),
        "with_streams": _pooled(with_runs),
        "runs": runs,
    }


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests per second over all the phases of one kind; the median of their p50s."""
    seconds = sum(r["seconds"] for r in runs)
    return {
        "rps": round(sum(r["requests"] for r in runs) / seconds, 1),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "rps_per_phase": [r["rps"] for r in runs],
        "seconds": round(seconds, 2),
        "errors": sum(r["non_200"] + r["connection_errors"] for r in runs),
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
    if without["errors"] or with_streams["errors"]:
        errors.append(f"{without['errors'] + with_streams['errors']} requests failed or were not 200")
    slowdown = without["rps"] / with_streams["rps"] if with_streams["rps"] else None
    what = f"`GET /v1/jobs/{{id}}`, {CLIENTS} clients, with {details['streams_open']} event streams open on the job"
    return {
        "sse_job_poll_rps": Measurement(
            what=what,
            unit="req/s",
            value=with_streams["rps"],
            baseline=Baseline(what="no streams open, in phases alternating with theirs", value=without["rps"]),
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
    url, path, streams = argv[0], argv[1], int(argv[2])
    asyncio.run(_hold(url, path, streams))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
