"""Two API processes (`python -m service.api`, as compose runs them) sharing PostgreSQL and Redis, as
replicas behind a load balancer: a key's request rate, an address's requests without a valid key and a
key's uploads and event streams are counted once for both, so that two replicas do not double any quota;
and a replica that dies gives its slots back within QAAS_SLOT_LEASE_S."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import update

from service.auth import create_key
from service.database import make_engine, make_session_factory, transaction
from service.run import API
from service.settings import Settings
from service.tables import Job
from tests.conftest import clean_qaas_env, free_port, redis_prefix
from tests.service.helpers import assert_error
from tests.service.test_job_state import _job

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]
RATE = 20  # requests per key per minute: one token back every 3 s, so none comes back during a step
FAILURES = 4  # requests without a valid key per address per minute
LEASE_S = 3.0


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]

    def client(self, key: str | None = None, address: str = "127.0.0.1") -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.HTTPTransport(local_address=address)  # the client's address, as the server sees it
        return httpx.Client(base_url=self.url, headers=headers, timeout=20, transport=transport)


@dataclass
class Deployment:
    settings: Settings
    redis_url: str
    prefix: str
    replicas: list[Replica]

    def wait_for_slot(self, name: str, key: str, timeout: float = 20) -> None:
        """Until some replica holds one of the key's `name` slots (what the two replicas share, in Redis)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while not client.zcard(f"{self.prefix}qaas:limits:{name}:{key[: len('qaas_') + 8]}"):
                assert time.monotonic() < deadline, f"no replica took the key's {name} slot"
                time.sleep(0.05)
        finally:
            client.close()

    def key(self, tenant: str) -> str:
        factory = make_session_factory(make_engine(self.settings))
        try:
            with transaction(factory) as session:
                return create_key(session, tenant).key
        finally:
            factory.kw["bind"].dispose()

    def queued_job(self, tenant: str) -> str:
        """A job of the tenant's; no worker runs, so it stays queued and its event streams stay open."""
        factory = make_session_factory(make_engine(self.settings))
        try:
            job_id = _job(factory)
            with transaction(factory) as session:
                session.execute(update(Job).where(Job.id == job_id).values(tenant=tenant))
            return job_id
        finally:
            factory.kw["bind"].dispose()


@pytest.fixture
def two_apis(postgres_settings: Settings, redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    shared = {
        "QAAS_DATABASE_URL": postgres_settings.resolved_database_url,
        "QAAS_BROKER_URL": redis_url,
        "QAAS_BROKER_KEY_PREFIX": prefix,
        "QAAS_AUTH": "on",
        "QAAS_HOST": "127.0.0.1",
        "QAAS_RATE_LIMIT_PER_MINUTE": str(RATE),
        "QAAS_AUTH_FAILURES_PER_MINUTE": str(FAILURES),
        "QAAS_UPLOADS_IN_FLIGHT_PER_KEY": "1",
        "QAAS_EVENTS_MAX_PER_KEY": "2",
        "QAAS_SLOT_LEASE_S": str(LEASE_S),
        "QAAS_EVENTS_HEARTBEAT_S": "0.5",
        "QAAS_LOG_LEVEL": "warning",
    }
    replicas = []
    for name in ("a", "b"):
        port = free_port()
        env = clean_qaas_env(QAAS_DATA_DIR=str(tmp_path / name), QAAS_PORT=str(port), **shared)
        with (tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(API, env=env, stdout=log, stderr=subprocess.STDOUT)
        replicas.append(Replica(f"http://127.0.0.1:{port}", proc))
    try:
        deadline = time.monotonic() + 60
        for replica, name in zip(replicas, "ab", strict=True):
            while True:
                assert replica.proc.poll() is None, (tmp_path / f"{name}.log").read_text()
                try:
                    if httpx.get(f"{replica.url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
                time.sleep(0.1)
        yield Deployment(postgres_settings, redis_url, prefix, replicas)
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in replicas:
            try:
                replica.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()


def _refused_stream(http: httpx.Client, job_id: str) -> httpx.Response:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 429, "the stream was opened"
        response.read()
    return response


def test_two_api_processes_count_each_limit_once(two_apis: Deployment) -> None:
    a, b = two_apis.replicas
    with ExitStack() as stack:
        # A key's requests per minute: half on each replica are all served, the next one is refused by both.
        alice = two_apis.key("alice")
        on_a, on_b = stack.enter_context(a.client(alice)), stack.enter_context(b.client(alice))
        for _ in range(RATE // 2):
            assert on_a.get("/v1/models").status_code == 200
            assert on_b.get("/v1/models").status_code == 200
        for http in (on_a, on_b):
            error = assert_error(http.get("/v1/models"), 429, "rate_limited")
            assert "limit 20 per minute" in error["message"]

        # Requests without a valid key from one address: counted together, then refused by both.
        made_up = "qaas_0badc0de_" + "x" * 43
        on_a = stack.enter_context(a.client(made_up, address="127.0.0.2"))
        on_b = stack.enter_context(b.client(made_up, address="127.0.0.2"))
        for _ in range(FAILURES // 2):
            assert_error(on_a.get("/v1/models"), 401, "unauthorized")
            assert_error(on_b.get("/v1/models"), 401, "unauthorized")
        for http in (on_a, on_b):
            assert assert_error(http.get("/v1/models"), 429, "rate_limited")["detail"]["scope"] == "address"

        # Uploads in progress per key (1): one held open on A, so B refuses the key's next one.
        carol = two_apis.key("carol")
        release = threading.Event()
        held: list[httpx.Response] = []

        def body() -> Iterator[bytes]:
            yield b"--b\r\n"
            release.wait(30)
            yield b"--b--\r\n"

        def upload() -> None:
            with a.client(carol) as http:
                headers = {"content-type": "multipart/form-data; boundary=b"}
                held.append(http.post("/v1/models", content=body(), headers=headers))

        holder = threading.Thread(target=upload)
        holder.start()
        try:
            two_apis.wait_for_slot("uploads", carol)  # A holds it (B's own attempts would take the slot too)
            with b.client(carol) as on_b:
                refused = on_b.post("/v1/models", files={"file": ("m.onnx", b"x")})
                assert assert_error(refused, 429, "rate_limited")["detail"]["scope"] == "key"
        finally:
            release.set()
            holder.join(30)
        assert held and held[0].status_code != 429

        # Event streams per key (2): one open on each replica, a third refused by both.
        bob = two_apis.key("bob")
        job_id = two_apis.queued_job("bob")
        on_a, on_b = stack.enter_context(a.client(bob)), stack.enter_context(b.client(bob))
        for http in (on_a, on_b):
            opened = stack.enter_context(http.stream("GET", f"/v1/jobs/{job_id}/events"))
            assert opened.status_code == 200
        for http in (on_a, on_b):
            error = assert_error(_refused_stream(http, job_id), 429, "rate_limited")
            assert error["detail"]["scope"] == "key" and "QAAS_EVENTS_MAX_PER_KEY" in error["message"]

        # B dies holding one of them: its slot frees itself once its lease runs out, with nobody to give it back.
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        deadline = time.monotonic() + LEASE_S + 10
        while True:
            with on_a.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if response.status_code == 200:
                    break
                response.read()
            assert time.monotonic() < deadline, "the dead replica's stream slot was never freed"
            time.sleep(0.5)
