"""The client and `qaas models upload` send external data straight to the object store when the service
offers it (S3 storage, here moto's server), and through the service otherwise: a service on local storage,
or a store this machine cannot reach."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from qaas_client import Client
from qaas_client.cli import cli
from service.app import create_app
from service.settings import Settings
from service.tables import Upload
from tests.client.conftest import AppTransport
from tests.conftest import free_port
from tests.s3 import S3Server
from tests.security.hostile import external_data_model
from tests.service.conftest import serve

ELEMENTS = 1 << 15
WEIGHTS = bytes(range(256)) * (ELEMENTS * 4 // 256)  # 128 KiB
DIGEST = hashlib.sha256(WEIGHTS).hexdigest()


class Recording(AppTransport):
    """The app's transport, noting each request's method, path and body size (what went through the API);
    `rewrite` may change an answer's JSON on its way back."""

    def __init__(self, app: TestClient) -> None:
        super().__init__(app)
        self.sent: list[tuple[str, str, int]] = []
        self.rewrite = lambda request, body: body

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path, len(request.read())))
        response = super().handle_request(request)
        if response.headers.get("content-type") == "application/json":
            body = self.rewrite(request, response.json())
            return httpx.Response(response.status_code, json=body, request=request)
        return response


@pytest.fixture
def model_files(tmp_path: Path) -> tuple[Path, Path]:
    model, weights = tmp_path / "m.onnx", tmp_path / "weights.bin"
    model.write_bytes(external_data_model("weights.bin", length=None, elements=ELEMENTS))
    weights.write_bytes(WEIGHTS)
    return model, weights


@pytest.fixture
def s3_settings(sqlite_settings: Settings, s3_env: dict[str, str]) -> Settings:
    return sqlite_settings.model_copy(
        update={"storage_url": s3_env["QAAS_STORAGE_URL"], "s3_endpoint_url": s3_env["QAAS_S3_ENDPOINT_URL"]}
    )


@pytest.fixture
def s3_app(s3_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings), raise_server_exceptions=False) as app:
        yield app


def _unfinished(app: TestClient, s3_server: S3Server) -> list[str]:
    return s3_server.unfinished_uploads(app.app.state.storage.bucket)  # type: ignore[attr-defined]


def test_the_client_sends_external_data_to_the_store_when_the_service_offers_it(
    s3_app: TestClient, s3_server: S3Server, model_files: tuple[Path, Path]
) -> None:
    api = Recording(s3_app)
    with Client("http://testserver", transport=api) as client:
        model = client.upload_model(model_files[0], external_data=[model_files[1]], name="big")
    assert model.name == "big" and model.raw["external_data"] == [
        {"name": "weights.bin", "size_bytes": len(WEIGHTS), "sha256": DIGEST}
    ]
    assert [(method, path) for method, path, _ in api.sent] == [("POST", "/v1/uploads"), ("POST", "/v1/models")]
    assert sum(size for _, _, size in api.sent) < len(WEIGHTS)  # the weights never went through the API
    storage = s3_app.app.state.storage  # type: ignore[attr-defined]
    assert b"".join(storage.iter_bytes(f"models/{model.id}/weights.bin")) == WEIGHTS
    assert _unfinished(s3_app, s3_server) == []


def test_the_client_falls_back_to_the_api_when_the_service_keeps_its_files_itself(
    app: TestClient, model_files: tuple[Path, Path]
) -> None:
    api = Recording(app)
    with Client("http://testserver", transport=api) as client:
        first = client.upload_model(model_files[0], external_data=[model_files[1]])
        second = client.upload_model(model_files[0], external_data=[model_files[1]])
    assert (
        first.raw["external_data"]
        == second.raw["external_data"]
        == [{"name": "weights.bin", "size_bytes": len(WEIGHTS), "sha256": DIGEST}]
    )
    # Asked once (409 direct_uploads_unavailable), then remembered.
    assert [(method, path) for method, path, _ in api.sent] == [
        ("POST", "/v1/uploads"),
        ("POST", "/v1/models"),
        ("POST", "/v1/models"),
    ]


def test_the_client_falls_back_to_the_api_when_the_store_cannot_be_reached(
    s3_app: TestClient, s3_server: S3Server, model_files: tuple[Path, Path]
) -> None:
    """The store's URLs name a host only the service can reach (compose's `minio:9000`, seen from a laptop)."""
    api = Recording(s3_app)
    dead = f"http://127.0.0.1:{free_port()}"

    def elsewhere(request: httpx.Request, body: dict[str, object]) -> dict[str, object]:
        if request.method == "POST" and request.url.path == "/v1/uploads":
            text = json.dumps(body).replace(s3_server.url, dead)
            return dict(json.loads(text))
        return body

    api.rewrite = elsewhere
    with Client("http://testserver", transport=api) as client:
        model = client.upload_model(model_files[0], external_data=[model_files[1]])
    assert model.raw["external_data"][0]["sha256"] == DIGEST
    started, abandoned, through_api = api.sent
    assert started[:2] == ("POST", "/v1/uploads") and abandoned[0] == "DELETE"
    assert abandoned[1].startswith("/v1/uploads/") and through_api[:2] == ("POST", "/v1/models")
    assert through_api[2] > len(WEIGHTS)  # the weights went through the API
    assert _unfinished(s3_app, s3_server) == []  # the abandoned upload was aborted at once


def test_qaas_models_upload_sends_external_data_to_the_store(
    s3_settings: Settings, s3_server: S3Server, model_files: tuple[Path, Path]
) -> None:
    for live in serve(s3_settings):
        args = ["--url", live.url, "models", "upload", str(model_files[0]), "--external-data", str(model_files[1])]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        model_id = result.stdout.strip()
        with live.state.session_factory() as session:
            upload = session.scalars(select(Upload)).one()
        assert (upload.status, upload.model_id) == ("completed", model_id)
        with httpx.Client(base_url=live.url) as http:
            assert http.get(f"/v1/models/{model_id}").json()["external_data"][0]["sha256"] == DIGEST
