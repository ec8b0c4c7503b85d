"""Uploads are parsed in one pass into staging (service/upload_stream.py), never spooled by Starlette."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.formparsers import MultiPartParser

from tests.onnx_models import matmul_mlp
from tests.service.helpers import assert_error


def test_uploads_never_go_through_starlettes_spooling_parser(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def spooled(self: MultiPartParser) -> None:
        raise AssertionError("the upload was spooled by Starlette")

    monkeypatch.setattr(MultiPartParser, "parse", spooled)
    model = matmul_mlp(tmp_path / "m.onnx", features=256, hidden=1024)  # ~1 MB: crosses a parse batch
    data = model.read_bytes()
    answer = client.post("/v1/models", files={"file": ("m.onnx", data)}, data={"name": "streamed"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["sha256"] == hashlib.sha256(data).hexdigest() and answer.json()["name"] == "streamed"
    assert client.get(f"/v1/models/{answer.json()['id']}/file").content == data
    staging = Path(client.app.state.settings.resolved_data_dir) / "staging"  # type: ignore[attr-defined]
    assert not any(staging.iterdir())


def test_bodies_that_are_not_a_usable_form_answer_422(client: TestClient) -> None:
    error = assert_error(client.post("/v1/models", json={"file": "x"}), 422, "invalid_request")
    assert "file" in error["message"]
    missing = client.post("/v1/datasets", files={"other": ("d.npz", b"123")})
    assert "file" in assert_error(missing, 422, "invalid_request")["message"]
    long_name = client.post("/v1/datasets", files={"file": ("d.npz", b"123")}, data={"name": "n" * 256})
    assert "name" in assert_error(long_name, 422, "invalid_request")["message"]
    cut = client.post(
        "/v1/models",
        content=b"--b\r\nContent-Disposition: form-data; name=file; filename=m.onnx\r\n\r\nabc",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert "malformed" in assert_error(cut, 422, "invalid_request")["message"]
