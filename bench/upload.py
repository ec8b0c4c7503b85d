"""upload_mb_s / upload_api_rss_growth_mb: a model of about 1 GB whose weights are one external data file,
uploaded as multipart (`file` = the .onnx, `external_data` = the .bin) with httpx streaming both from
disk, beside `cp` of the same bytes into the same data folder as the ceiling. The API process's RSS is
sampled in a thread (before, peak during, after).

How fast a single `cp` of 1 GB runs depends on how much the kernel still has to write back from
before. So cp and the upload are interleaved ROUNDS times, each after a `sync`, and the figure is the
ratio of the medians (every round is in the details). curl uploads the same files in each round too
(detail `curl_mb_s`): a lighter client than httpx on the same cores, beside it. And each round times
the floor under any Python server (detail `raw_python_mb_s`): the same bytes sent over loopback with
`sendfile` to a bare socket loop in this process that only receives, writes, hashes (sha256 on a
thread) and fsyncs, as the API must; no HTTP, no multipart, no database.

upload_direct_s3_mb_s: QaaS on S3 storage (moto's server on loopback): the same kind of model (1 GB,
`BENCH_DIRECT_UPLOAD_MB` to change it) uploaded by the Python client, which sends the external data
straight to the store (`POST /v1/uploads`, presigned parts, then the model completed through the API:
the graph checked, the parts joined), beside boto3's own multipart upload (`upload_file`, parts of the
same size) of the same files to the same store. Rounds alternate which goes first; the CPU seconds of
the client's process, the API and the store are in the details."""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import queue
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from boto3.s3.transfer import TransferConfig

from bench import harness
from bench.common import MB, Context, mb
from bench.models import external_data_model
from bench.results import Baseline, Measurement
from qaas_client import Client
from service.settings import Settings
from service.storage.s3 import parse_url
from tests.s3 import S3Server

TARGET_GROWTH_MB = 100
TARGET_CP_RATIO = 0.35
SIZE_BYTES = 1 << 30
ROUNDS = 3
TARGET_BOTO3_RATIO = 0.8
DIRECT_SIZE_ENV = "BENCH_DIRECT_UPLOAD_MB"
PART_BYTES = Settings.model_fields["direct_upload_part_bytes"].default


def _settled() -> None:
    """Start each timed copy with nothing left for the kernel to write back."""
    subprocess.run(["sync"], check=True)
    time.sleep(0.5)


def _cp(files: list[Path], dest: Path) -> dict[str, float]:
    """Time `cp` of the files into `dest` (and, apart, an fsync of the copies, since the API fsyncs)."""
    _settled()
    dest.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    cp_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["sync", *[str(dest / f.name) for f in files]], check=True)
    sync_s = time.perf_counter() - t
    shutil.rmtree(dest)
    return {"cp_s": cp_s, "sync_s": sync_s}


def _upload_httpx(svc: harness.Service, onnx_path: Path, bin_path: Path) -> float:
    """Seconds to upload the model with httpx (streamed from disk: never read into memory here)."""
    _settled()
    t = time.perf_counter()
    with svc.client(timeout=1800) as c, onnx_path.open("rb") as fm, bin_path.open("rb") as fb:
        response = c.post(
            "/v1/models",
            files=[
                ("file", (onnx_path.name, fm, "application/octet-stream")),
                ("external_data", (bin_path.name, fb, "application/octet-stream")),
            ],
        )
    seconds = time.perf_counter() - t
    if response.status_code != 201:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:500]}")
    _delete(svc, response.json()["id"])
    return seconds


def _upload_curl(svc: harness.Service, onnx_path: Path, bin_path: Path) -> float:
    """Seconds to upload the same model with curl, as the README does."""
    _settled()
    t = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sS", "-F", f"file=@{onnx_path}", "-F", f"external_data=@{bin_path}", f"{svc.base_url}/v1/models"],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - t
    _delete(svc, json.loads(done.stdout)["id"])
    return seconds


def _raw_python(files: list[Path], dest: Path) -> float:
    """Seconds for the floor of a Python upload: `files` sent back to back over loopback with
    `sendfile` (no client CPU to speak of) to a bare socket loop that writes them to one file in
    `dest`, hashes them on a thread (as the API's BesideHash does) and fsyncs."""
    _settled()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "raw.bin"
    digest = hashlib.sha256()
    chunks: queue.Queue[bytes | None] = queue.Queue(8)

    def hash_chunks() -> None:
        while (chunk := chunks.get()) is not None:
            digest.update(chunk)

    def receive(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        hasher = threading.Thread(target=hash_chunks)
        hasher.start()
        with conn, target.open("wb") as out:
            while chunk := conn.recv(1 << 20):
                chunks.put(chunk)
                out.write(chunk)
            chunks.put(None)
            hasher.join()
            out.flush()
            os.fsync(out.fileno())
            conn.sendall(digest.hexdigest().encode())

    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=receive, args=(listener,))
        server.start()
        t = time.perf_counter()
        with socket.create_connection(listener.getsockname()) as conn:
            for f in files:
                with f.open("rb") as source:
                    conn.sendfile(source)
            conn.shutdown(socket.SHUT_WR)
            answer = conn.recv(64)
        seconds = time.perf_counter() - t
        server.join()
    if len(answer) != 64:
        raise RuntimeError("the bare receive loop gave no digest")
    shutil.rmtree(dest)
    return seconds


def _cpu_s(procs: list[psutil.Process | None]) -> list[float]:
    found = []
    for proc in procs:
        times = proc.cpu_times() if proc is not None else None
        found.append(times.user + times.system if times is not None else 0.0)
    return found


def _boto3(server: S3Server, bucket: str, files: list[Path]) -> float:
    """Seconds for boto3's multipart upload of `files` (parts of PART_BYTES, its default 10 threads)."""
    client = server.client()
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)
    keys = [f"bench-boto3/{f.name}" for f in files]
    t = time.perf_counter()
    for f, key in zip(files, keys, strict=True):
        client.upload_file(str(f), bucket, key, Config=config)
    seconds = time.perf_counter() - t
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)
    return seconds


def _client(svc: harness.Service, onnx_path: Path, bin_path: Path) -> float:
    """Seconds for the Python client to upload the model, its external data straight to the store."""
    fell_back = logging.handlers.BufferingHandler(100)
    fell_back.setLevel(logging.WARNING)  # the client says so when it sends the files through the API instead
    logging.getLogger("qaas_client").addHandler(fell_back)
    try:
        with Client(svc.base_url, timeout=1800) as client:
            t = time.perf_counter()
            model = client.upload_model(onnx_path, external_data=[bin_path])
            seconds = time.perf_counter() - t
            client.delete_model(model.id)
    finally:
        logging.getLogger("qaas_client").removeHandler(fell_back)
    if not client.direct_uploads or fell_back.buffer:
        raise RuntimeError(f"the client did not upload straight to the object store: {fell_back.buffer}")
    return seconds


def direct_s3(ctx: Context, work: Path) -> Measurement:
    """upload_direct_s3_mb_s (see the module docstring)."""
    size = int(os.environ.get(DIRECT_SIZE_ENV, 0)) << 20 or ((64 << 20) if ctx.quick else SIZE_BYTES)
    onnx_path, bin_path = external_data_model(work / "direct.onnx", size)
    files = [onnx_path, bin_path]
    total = sum(f.stat().st_size for f in files)
    rounds: list[dict[str, float]] = []
    try:
        with harness.s3_service(work / "direct") as (svc, server):
            bucket, _ = parse_url(svc.env["QAAS_STORAGE_URL"])
            assert server.proc is not None
            procs = [psutil.Process(), svc.api_process(), psutil.Process(server.proc.pid)]
            for i in range(ROUNDS):
                one: dict[str, float] = {}
                ways = [("boto3", lambda: _boto3(server, bucket, files)), ("client", lambda: _client(svc, *files))]
                for name, upload in ways if i % 2 == 0 else ways[::-1]:
                    before = _cpu_s(procs)
                    one[f"{name}_s"] = upload()
                    spent = [after - b for after, b in zip(_cpu_s(procs), before, strict=True)]
                    one.update(
                        {f"{name}_{who}_cpu_s": v for who, v in zip(("local", "api", "store"), spent, strict=True)}
                    )
                rounds.append(one)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    details: dict[str, Any] = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    details.update(
        {
            "bytes": total,
            "part_bytes": PART_BYTES,
            "rounds": [{key: round(value, 3) for key, value in r.items()} for r in rounds],
            "cores": psutil.cpu_count(),
        }
    )
    ours = total / MB / details["client_s"]
    boto3 = total / MB / details["boto3_s"]
    cpu = (
        f"CPU s, client / API / store: {details['client_local_cpu_s']:.1f} / {details['client_api_cpu_s']:.1f} / "
        f"{details['client_store_cpu_s']:.1f}; boto3 / store: {details['boto3_local_cpu_s']:.1f} / "
        f"{details['boto3_store_cpu_s']:.1f}"
    )
    return Measurement(
        what=f"Upload of a {total / MB:,.0f} MB model (external data) by the Python client, straight to S3 "
        f"(moto on loopback), median of {ROUNDS} rounds",
        unit="MB/s",
        value=round(ours, 1),
        baseline=Baseline(
            what=f"boto3 multipart upload of the same files ({PART_BYTES >> 20} MiB parts)",
            value=round(boto3, 1),
            note=cpu,
        ),
        ratio=round(ours / boto3, 3),
        target=f">= {TARGET_BOTO3_RATIO} of boto3",
        met=ours / boto3 >= TARGET_BOTO3_RATIO,
        details=details,
    )


def _delete(svc: harness.Service, model_id: str) -> None:
    with svc.client() as c:
        c.delete(f"/v1/models/{model_id}").raise_for_status()


def run(ctx: Context) -> dict[str, Measurement]:
    errors: list[str] = []
    size = (64 << 20) if ctx.quick else SIZE_BYTES
    work = ctx.dir("upload")
    disk_free = shutil.disk_usage(work).free
    if disk_free < 5 * size:  # the .bin, the stored copy, the cp copy, and room for what is written back
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
            api = svc.api_process()
            assert api is not None
            time.sleep(1.0)
            before = harness.rss(api)
            me = psutil.Process()
            bench_before = harness.rss(me)
            tmp_before = shutil.disk_usage("/tmp").used

            def probe() -> dict[str, float]:
                return {
                    "api": float(harness.rss(api)),
                    "bench": float(harness.rss(me)),
                    "tmp_used": float(shutil.disk_usage("/tmp").used),
                }

            rounds: list[dict[str, float]] = []
            with harness.Sampler(probe, interval=0.02) as sampler:
                for _ in range(ROUNDS):
                    one = _cp(files, svc.data_dir / "cp-ceiling")  # the file system of the API's storage
                    one["upload_s"] = _upload_httpx(svc, onnx_path, bin_path)
                    one["curl_s"] = _upload_curl(svc, onnx_path, bin_path)
                    one["raw_python_s"] = _raw_python(files, svc.data_dir / "raw-floor")
                    rounds.append(one)
            after = harness.rss(api)
            tmp_usage = shutil.disk_usage("/tmp")
            details.update({key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]})
            details.update(
                {
                    "rounds": [{key: round(value, 3) for key, value in r.items()} for r in rounds],
                    "api_rss_before_mb": mb(before),
                    "api_rss_peak_mb": mb(sampler.peak["api"]),
                    "api_rss_after_mb": mb(after),
                    "rss_samples": sampler.samples,
                    "tmp_free_bytes_after": tmp_usage.free,
                    "tmp_extra_peak_mb": mb(sampler.peak["tmp_used"] - tmp_before),
                    "benchmark_rss_growth_mb": mb(sampler.peak["bench"] - bench_before),
                }
            )
            # A second look a little later: does the API give the memory back?
            time.sleep(2.0)
            details["api_rss_2s_later_mb"] = mb(harness.rss(api))
    except httpx.HTTPError as exc:
        raise RuntimeError(f"upload failed: {exc!r}") from exc
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    upload_mb_s = total / MB / details["upload_s"]
    cp_mb_s = total / MB / details["cp_s"]
    growth = (details["api_rss_peak_mb"] or 0) - (details["api_rss_before_mb"] or 0)
    details["cp_mb_s"] = round(cp_mb_s, 1)
    details["curl_mb_s"] = round(total / MB / details["curl_s"], 1)
    details["cp_sync_mb_s"] = round(total / MB / (details["cp_s"] + details["sync_s"]), 1)
    details["raw_python_mb_s"] = round(total / MB / details["raw_python_s"], 1)
    what = f"Upload of a {total / MB:,.0f} MB model (external data), median of {ROUNDS} rounds"
    return {
        "upload_mb_s": Measurement(
            what=what,
            unit="MB/s",
            value=round(upload_mb_s, 1),
            baseline=Baseline(
                what="`cp`",
                value=round(cp_mb_s, 1),
                # The API fsyncs what it stores; `cp` alone leaves the bytes in the page cache.
                note=f"`cp` + `sync`: {details['cp_sync_mb_s']:,.0f} MB/s (ratio "
                f"{upload_mb_s / details['cp_sync_mb_s']:.2f}); curl: {details['curl_mb_s']:,.0f} MB/s; "
                f"a bare Python socket loop (receive, write, sha256, fsync; no HTTP): "
                f"{details['raw_python_mb_s']:,.0f} MB/s (ratio {details['raw_python_mb_s'] / cp_mb_s:.2f} of `cp`)",
            ),
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
        "upload_direct_s3_mb_s": direct_s3(ctx, work),
    }
