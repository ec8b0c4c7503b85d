"""The client against the real app in this process (through a transport that hands each request to
Starlette's TestClient), or against scripted answers where the service cannot be made to give them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from qaas_client import Client
from service.app import create_app
from service.settings import Settings
from tests.client.hostile import Hostile, running


@pytest.fixture(autouse=True)
def no_saved_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own config folder and none of the caller's QAAS_URL / QAAS_API_KEY."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("QAAS_URL", raising=False)
    monkeypatch.delenv("QAAS_API_KEY", raising=False)
    return tmp_path / "config"


class AppTransport(httpx.BaseTransport):
    """Hands httpx requests to the in-process app (Starlette's TestClient speaks another httpx)."""

    def __init__(self, app: TestClient) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.app.request(  # redirects are the client's to follow, as over a real connection
            request.method,
            str(request.url),
            headers=list(request.headers.multi_items()),
            content=request.read(),
            follow_redirects=False,
        )
        headers = [(k, v) for k, v in answer.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(answer.status_code, headers=headers, content=answer.content, request=request)


@pytest.fixture
def app(sqlite_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def client(app: TestClient) -> Iterator[Client]:
    with Client("http://testserver", transport=AppTransport(app)) as qaas:
        yield qaas


Handler = Callable[[httpx.Request], httpx.Response]


def scripted(handler: Handler, sleeps: list[float] | None = None, **options: Any) -> Client:
    """A client whose requests `handler` answers; its waits are recorded in `sleeps` instead of slept."""
    record = sleeps if sleeps is not None else []
    return Client("http://qaas.test", transport=httpx.MockTransport(handler), sleep=record.append, **options)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    """A service on 127.0.0.1 that answers what the test scripts, and records what it is sent."""
    with running() as server:
        yield server


@pytest.fixture
def store() -> Iterator[Hostile]:
    """Another origin (another port): the object store a download is redirected to, or a thief."""
    with running() as server:
        yield server
