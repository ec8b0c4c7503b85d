"""Saving the quantized model: its external data lands beside it, and every byte is checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from qaas_client import QaasError
from tests.client.conftest import scripted

FILES = {"quantized.onnx": b"model bytes", "quantized.onnx.data": b"weights " * 100, "report.json": b"{}"}


def service(corrupt: str | None = None) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "status": "succeeded", "stage": "done", "progress": 1.0})
        if path == "/v1/jobs/j1/artifacts":
            return httpx.Response(
                200,
                json=[
                    {
                        "name": name,
                        "size_bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "media_type": "application/json" if name.endswith(".json") else "application/octet-stream",
                        "url": f"/v1/jobs/j1/artifacts/{name}",
                    }
                    for name, data in FILES.items()
                ],
            )
        name = path.rsplit("/", 1)[-1]
        return httpx.Response(200, content=FILES[name][:-1] if name == corrupt else FILES[name])

    return answer  # type: ignore[return-value]


def test_into_a_folder_the_model_keeps_its_name_and_its_data_file_comes_along(tmp_path: Path) -> None:
    with scripted(service()) as client:
        saved = client.get_job("j1").download(tmp_path)
    assert saved == tmp_path / "quantized.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.onnx", "quantized.onnx.data"]
    assert saved.read_bytes() == FILES["quantized.onnx"]
    assert (tmp_path / "quantized.onnx.data").read_bytes() == FILES["quantized.onnx.data"]


def test_to_a_file_name_the_data_file_keeps_the_name_the_model_refers_to(tmp_path: Path) -> None:
    with scripted(service()) as client:
        saved = client.get_job("j1").download(tmp_path / "out" / "resnet_int8.onnx")
    assert saved.read_bytes() == FILES["quantized.onnx"]
    assert sorted(p.name for p in saved.parent.iterdir()) == ["quantized.onnx.data", "resnet_int8.onnx"]


def test_a_corrupted_download_is_refused_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with scripted(service(corrupt="quantized.onnx")) as client, pytest.raises(QaasError) as bad:
        client.get_job("j1").download(tmp_path)
    assert bad.value.code == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == []
