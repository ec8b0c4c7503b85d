"""Starts QaaS the way `make run` does (`python -m service.run`: migrate, then the API and one worker)
on a free loopback port with a temporary QAAS_DATA_DIR, finds its processes, talks to it over HTTP,
and always stops every process it started (in `finally`, also on Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR = [sys.executable, "-m", "service.run"]
TERMINAL = ("succeeded", "failed", "cancelled")
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update(overrides)
    return env


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _is_module(proc: psutil.Process, module: str) -> bool:
    cmd = _cmdline(proc)
    return any(cmd[i] == "-m" and cmd[i + 1] == module for i in range(len(cmd) - 1))


def rss(proc: psutil.Process | None) -> int:
    if proc is None:
        return 0
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def tree(proc: psutil.Process | None) -> list[psutil.Process]:
    """`proc` and its descendants (whatever still exists)."""
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


class Sampler:
    """Calls `probe()` every `interval` s in a thread and keeps the maximum of each key it returns."""

    def __init__(self, probe: Callable[[], dict[str, float]], interval: float = 0.05) -> None:
        self.probe = probe
        self.interval = interval
        self.peak: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for key, value in self.probe().items():
            self.peak[key] = max(self.peak.get(key, 0.0), value)
        self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


class Service:
    """One embedded-default QaaS (SQLite, filesystem broker) under `root`, started by `service.run`."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.data_dir = root / "var"
        self.log_path = root / "service.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env(QAAS_DATA_DIR=str(self.data_dir), QAAS_HOST="127.0.0.1", QAAS_PORT=str(self.port), **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.supervisor: psutil.Process | None = None
        self._seen: dict[int, psutil.Process] = {}  # every descendant ever seen, stopped at the end

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C on the benchmark reaches only the benchmark, whose `finally` stops us.
            self.proc = subprocess.Popen(
                SUPERVISOR,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.supervisor = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self._remember()
            if self.proc.poll() is not None:
                raise RuntimeError(f"service.run exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.base_url}/readyz", timeout=5)
                if r.status_code == 200 and self.api_process() and self.worker_process():
                    self._remember()
                    return
                last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise RuntimeError(f"QaaS not ready after {timeout} s: {last}\n{self.log_tail()}")

    def _remember(self) -> None:
        for p in tree(self.supervisor)[1:]:
            self._seen.setdefault(p.pid, p)

    def stop(self) -> None:
        """SIGTERM to the supervisor (it stops the API and the worker, as on Ctrl-C), then make sure
        that every process seen under it (job processes run in their own sessions) is gone."""
        if self.proc is None:
            return
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = [p for p in self._seen.values() if p.is_running()]
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self.proc = None

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- processes ---------------------------------------------------------------------------------

    def _child(self, module: str) -> psutil.Process | None:
        for p in tree(self.supervisor)[1:]:
            if _is_module(p, module):
                return p
        return None

    def api_process(self) -> psutil.Process | None:
        return self._child("service.api")

    def worker_process(self) -> psutil.Process | None:
        """The Celery worker's main process (its pool child and job processes are below it)."""
        return self._child("worker")

    def job_processes(self) -> list[psutil.Process]:
        """Running `python -m worker.job_process` processes (the jobs' heavy work) and their children."""
        found = []
        for p in tree(self.worker_process())[1:]:
            if _is_module(p, "worker.job_process"):
                found += tree(p)
        return found

    def memory_probe(self) -> dict[str, float]:
        """RSS in bytes: the job process subtree, the whole worker tree, and the API."""
        self._remember()
        return {
            "job": float(sum(rss(p) for p in self.job_processes())),
            "worker_tree": float(sum(rss(p) for p in tree(self.worker_process()))),
            "api": float(rss(self.api_process())),
        }

    # -- HTTP --------------------------------------------------------------------------------------

    def client(self, timeout: float = 600.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)


def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:1000]}")
    body: dict[str, Any] = response.json()
    return body


def upload_model(client: httpx.Client, path: Path, external: list[Path] | None = None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        files: list[tuple[str, tuple[str, Any, str]]] = [
            ("file", (path.name, stack.enter_context(path.open("rb")), "application/octet-stream"))
        ]
        for ext in external or []:
            files.append(("external_data", (ext.name, stack.enter_context(ext.open("rb")), "application/octet-stream")))
        return _check(client.post("/v1/models", files=files), f"upload of {path.name}")


def upload_dataset(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return _check(
            client.post("/v1/datasets", files={"file": (path.name, f, "application/octet-stream")}),
            f"upload of {path.name}",
        )


def create_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    return _check(client.post("/v1/jobs", json=body), "job creation")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 900.0, interval: float = 0.1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _check(client.get(f"/v1/jobs/{job_id}"), "job poll")
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}/{job['stage']} after {timeout} s")
        time.sleep(interval)


def download_artifacts(client: httpx.Client, job_id: str, dest: Path) -> int:
    """Download every artifact of the job into `dest`; returns the bytes received."""
    dest.mkdir(parents=True, exist_ok=True)
    listing = client.get(f"/v1/jobs/{job_id}/artifacts")
    if listing.status_code >= 400:
        raise RuntimeError(f"artifact list: HTTP {listing.status_code}: {listing.text[:500]}")
    items = listing.json()
    items = items["items"] if isinstance(items, dict) else items
    total = 0
    for item in items:
        with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{item['name']}") as r:
            if r.status_code >= 400:
                raise RuntimeError(f"download of {item['name']}: HTTP {r.status_code}")
            with (dest / item["name"]).open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    total += len(chunk)
    return total


def job_error(job: dict[str, Any]) -> str:
    err = job.get("error") or {}
    return f"job {job.get('id')} {job.get('status')}: {err.get('code')}: {err.get('message')}"


@contextlib.contextmanager
def service(root: Path, **env: str) -> Iterator[Service]:
    svc = Service(root, **env)
    with svc:
        yield svc


@contextlib.contextmanager
def s3_service(root: Path, **env: str) -> Iterator[tuple[Service, S3Server]]:
    """QaaS as `make run` starts it (one API, one worker), with its storage in a fresh bucket of moto's S3
    server (started here, on loopback, and stopped at the end)."""
    server = S3Server(root / "s3", free_port())
    server.start()
    try:
        with service(root / "service", **server.env(server.new_bucket()), **env) as svc:
            yield svc, server
    finally:
        server.stop()
