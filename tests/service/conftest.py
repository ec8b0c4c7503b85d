from __future__ import annotations

import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import redis_prefix


@pytest.fixture
def app_settings(db_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The two deployments the service supports: SQLite with the filesystem broker (embedded), and
    PostgreSQL with Redis as the broker (production), each test on a Redis key prefix of its own."""
    if db_settings.resolved_database_url.startswith("sqlite"):
        return db_settings
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    return db_settings.model_copy(update={"broker_url": redis_url, "broker_key_prefix": prefix})


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    """The real app on a real database and broker (see `app_settings`)."""
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def s3_client(s3_env: dict[str, str], sqlite_settings: Settings) -> Iterator[TestClient]:
    """The real app on a real S3 server (moto; a bucket of the test's own, parts of 5 MB)."""
    settings = sqlite_settings.model_copy(
        update={
            "storage_url": s3_env["QAAS_STORAGE_URL"],
            "s3_endpoint_url": s3_env["QAAS_S3_ENDPOINT_URL"],
            "s3_part_bytes": 5 << 20,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(params=["local", "s3"])
def on_storage(request: pytest.FixtureRequest, sqlite_settings: Settings) -> Iterator[TestClient]:
    """The app on the local folder and on a real S3 server (moto)."""
    if request.param == "s3":
        yield request.getfixturevalue("s3_client")
        return
    with TestClient(create_app(sqlite_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The API process's temporary folder (tempfile's), empty, to see whether anything lands there."""
    folder = tmp_path / "api-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def auth_settings(app_settings: Settings) -> Settings:
    return app_settings.model_copy(update={"auth": "on"})


@dataclass
class LiveServer:
    """The real app served by uvicorn on a loopback port, in a thread of the test process."""

    url: str
    app: FastAPI

    @property
    def state(self) -> Any:
        return self.app.state


def serve(settings: Settings) -> Iterator[LiveServer]:
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live(app_settings: Settings) -> Iterator[LiveServer]:
    """A live server on both deployments (see `app_settings`), with quick polls, progress events and heartbeats."""
    quick = {"events_poll_s": 0.05, "events_progress_s": 0.3, "events_heartbeat_s": 0.3}
    yield from serve(app_settings.model_copy(update=quick))
