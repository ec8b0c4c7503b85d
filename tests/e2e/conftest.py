"""Real processes on loopback: the migration, uvicorn (`python -m service.api`) and a Celery worker
(`python -m worker`), once on the embedded default and once on PostgreSQL + Redis."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.run import API, MIGRATE, WORKER
from tests.conftest import clean_qaas_env, free_port, fresh_database, redis_prefix
from tests.openapi_check import ResponseChecker
from tests.s3 import S3Server
from tests.sse import Event, EventReader

TERMINAL = ("succeeded", "failed", "cancelled")


clean_env = clean_qaas_env


@dataclass
class Deployment:
    name: str
    base_url: str
    env: dict[str, str]
    data_dir: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    checker: ResponseChecker | None = None

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """Every response it receives is checked against the deployment's own OpenAPI document."""
        if self.checker is None:
            self.checker = ResponseChecker.of(self.base_url)
        return httpx.Client(
            base_url=self.base_url, timeout=60, headers=headers, event_hooks={"response": [self.checker]}
        )

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
        self.procs[name] = proc
        return proc

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=5)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout} s: {last}\n{self.log_tail()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def deploy(
    name: str, root: Path, *, worker: bool = True, workers: dict[str, dict[str, str]] | None = None, **env: str
) -> Iterator[Deployment]:
    """The API and a worker (`worker`), and more workers by name, each with settings of its own on top
    (`workers`), all on one data dir."""
    data_dir = root / "var"
    logs = root / "logs"
    logs.mkdir(parents=True)
    port = free_port()
    dep = Deployment(
        name,
        f"http://127.0.0.1:{port}",
        clean_env(QAAS_DATA_DIR=str(data_dir), QAAS_HOST="127.0.0.1", QAAS_PORT=str(port), **env),
        data_dir,
        logs,
    )
    subprocess.run(MIGRATE, env=dep.env, check=True, capture_output=True)
    dep.start("api", API)
    if worker:
        dep.start("worker", WORKER)
    for worker_name, own in (workers or {}).items():
        dep.start(worker_name, WORKER, {**dep.env, **own})
    try:
        dep.wait_ready()
        yield dep
    finally:
        dep.stop()


def deploy_scaled_out(
    name: str,
    root: Path,
    s3_env: dict[str, str],
    workers: int = 1,
    worker_env: dict[str, str] | None = None,
    **env: str,
) -> Iterator[Deployment]:
    """The API and `workers` worker processes, each with an empty data dir of its own, as if on
    machines of their own: only the database, the broker and the S3 server connect them."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    port = free_port()
    common = {**s3_env, **env}
    api_env = clean_env(QAAS_DATA_DIR=str(root / "api"), QAAS_HOST="127.0.0.1", QAAS_PORT=str(port), **common)
    dep = Deployment(name, f"http://127.0.0.1:{port}", api_env, root / "api", logs)
    subprocess.run(MIGRATE, env=dep.env, check=True, capture_output=True)
    dep.start("api", API)
    for n in range(1, workers + 1):
        own = clean_env(QAAS_DATA_DIR=str(root / f"worker-{n}"), **{**common, **(worker_env or {})})
        dep.start(f"worker-{n}", WORKER, own)
    try:
        dep.wait_ready()
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Event streams poll every 50 ms (default 500): mode auto's search on the tests' tiny models spends a
    # few hundred ms on its first candidate and far less on the others, and a stream shows what a poll sees.
    yield from deploy("embedded", tmp_path_factory.mktemp("embedded"), QAAS_EVENTS_POLL_S="0.05")


@pytest.fixture(scope="session")
def production(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str) -> Iterator[Deployment]:
    yield from deploy(
        "production",
        tmp_path_factory.mktemp("production"),
        QAAS_DATABASE_URL=postgres_url,
        QAAS_BROKER_URL=redis_url,
        QAAS_BROKER_KEY_PREFIX=redis_prefix(),
    )


@pytest.fixture(scope="session")
def on_s3(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str, s3_server: S3Server
) -> Iterator[Deployment]:
    """PostgreSQL + Redis + a real S3 server, with the API and the worker on separate data dirs
    (a database of its own: another deployment's sweep must not take its jobs)."""
    for database_url in fresh_database(postgres_url):
        yield from deploy_scaled_out(
            "s3",
            tmp_path_factory.mktemp("s3"),
            s3_server.env(s3_server.new_bucket()),
            QAAS_DATABASE_URL=database_url,
            QAAS_BROKER_URL=redis_url,
            QAAS_BROKER_KEY_PREFIX=redis_prefix() + "s3:",
        )


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("production", marks=pytest.mark.services),
        pytest.param("on_s3", marks=pytest.mark.services),
    ]
)
def any_storage(request: pytest.FixtureRequest) -> Deployment:
    """The local folder (embedded, production) and S3-compatible object storage."""
    dep: Deployment = request.getfixturevalue(request.param)
    return dep


@pytest.fixture(params=["embedded", pytest.param("production", marks=pytest.mark.services)])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    dep: Deployment = request.getfixturevalue(request.param)
    return dep


def upload(http: httpx.Client, path: str, name: str, content: bytes, **data: str) -> str:
    """POST a file to /v1/models or /v1/datasets; returns the new id."""
    response = http.post(path, files={"file": (name, content)}, data=data)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def wait_for_job(
    client: httpx.Client, job_id: str, timeout: float = 180
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll until the job ends; returns the final job and every distinct state seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        state = {"status": job["status"], "stage": job["stage"], "progress": job["progress"]}
        if not seen or seen[-1] != state:
            seen.append(state)
        if job["status"] in TERMINAL:
            return job, seen
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s; states seen: {seen}")


def follow_job(client: httpx.Client, job_id: str) -> tuple[dict[str, Any], list[Event]]:
    """Follow the job's event stream to its end; returns the final job (the `end` event) and every event."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = EventReader(response).until_end()
    assert events and events[-1].event == "end", [e.event for e in events]
    job: dict[str, Any] = events[-1].data
    return job, events
