"""Downloads of models and artifacts: Range, ETag/If-None-Match, and presigned redirects, on the local
folder and on a real S3 server (moto)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.onnx_models import matmul_mlp
from tests.service.helpers import assert_error, store_artifact, upload_model
from tests.service.test_tenants import _as, _key


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, sqlite_settings: Settings) -> Settings:
    if request.param == "s3":
        env = request.getfixturevalue("s3_env")
        return sqlite_settings.model_copy(
            update={"storage_url": env["QAAS_STORAGE_URL"], "s3_endpoint_url": env["QAAS_S3_ENDPOINT_URL"]}
        )
    return sqlite_settings


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_model_download_serves_ranges_and_not_modified(api: TestClient, tmp_path: Path) -> None:
    path = matmul_mlp(tmp_path / "m.onnx", features=64, hidden=128)
    data = path.read_bytes()
    model = upload_model(api, path)
    url = f"/v1/models/{model['id']}/file"

    whole = api.get(url)
    assert whole.status_code == 200 and whole.content == data
    etag = whole.headers["etag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"' and whole.headers["accept-ranges"] == "bytes"

    assert api.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert api.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    part = api.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = api.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = api.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert rest.content == data[-5:]
    # A resumed download whose file changed meanwhile (If-Range no longer matches) gets it whole.
    assert api.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'}).content == data

    outside = api.get(url, headers={"Range": f"bytes={len(data)}-"})
    error = assert_error(outside, 416, "range_not_satisfiable")
    assert error["detail"]["size_bytes"] == len(data)
    assert outside.headers["content-range"] == f"bytes */{len(data)}"


def _artifact(api: TestClient, key: str, tmp_path: Path) -> tuple[str, bytes]:
    """A job of the key's tenant with one stored artifact."""
    model = api.post(
        "/v1/models", headers=_as(key), files={"file": ("m.onnx", matmul_mlp(tmp_path / "m.onnx").read_bytes())}
    )
    job = api.post("/v1/jobs", headers=_as(key), json={"model_id": model.json()["id"], "recipe": {"mode": "dynamic"}})
    assert job.status_code == 202, job.text
    content = b"quantized bytes " * 1000
    store_artifact(api, job.json()["id"], content, tmp_path)
    return job.json()["id"], content


def test_presigned_artifact_downloads_redirect_after_the_tenant_check(
    s3_env: dict[str, str], sqlite_settings: Settings, tmp_path: Path
) -> None:
    settings = sqlite_settings.model_copy(
        update={
            "auth": "on",
            "storage_url": s3_env["QAAS_STORAGE_URL"],
            "s3_endpoint_url": s3_env["QAAS_S3_ENDPOINT_URL"],
            "s3_presigned_downloads": True,
            "s3_presign_expires_s": 60,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        alice, bob = _key(factory, "alice"), _key(factory, "bob")
        job_id, content = _artifact(api, alice, tmp_path)
        url = f"/v1/jobs/{job_id}/artifacts/quantized.onnx"

        assert_error(api.get(url, headers=_as(bob), follow_redirects=False), 404, "not_found")
        answer = api.get(url, headers=_as(alice), follow_redirects=False)
        assert answer.status_code == 307, answer.text
        location = answer.headers["location"]
        assert location.startswith(s3_env["QAAS_S3_ENDPOINT_URL"]) and "X-Amz-Expires=60" in location
    fetched = httpx.get(location)  # straight from the object store, without the API key
    assert fetched.status_code == 200 and fetched.content == content
    assert 'filename="quantized.onnx"' in fetched.headers["content-disposition"]


def test_artifacts_stream_from_the_api_without_presigning(api: TestClient, tmp_path: Path) -> None:
    factory = api.app.state.session_factory  # type: ignore[attr-defined]
    job_id, content = _artifact(api, _key(factory, "default"), tmp_path)
    answer = api.get(f"/v1/jobs/{job_id}/artifacts/quantized.onnx", follow_redirects=False)
    assert answer.status_code == 200 and answer.content == content
    part = api.get(f"/v1/jobs/{job_id}/artifacts/quantized.onnx", headers={"Range": "bytes=16-31"})
    assert part.status_code == 206 and part.content == content[16:32]
