"""Upload size limits at the edge: an over-limit body is refused with 413 before (or while) it is
read, nothing is left on disk, and the API's memory stays flat whatever the upload size."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security import hostile as h
from tests.security.conftest import Hostile, assert_contained, assert_serving, normal_job, start
from tests.service.helpers import assert_error

pytestmark = pytest.mark.e2e

MAX_MODEL_BYTES = 8 << 20
MAX_DATASET_BYTES = 256 << 20
BOUNDARY = "qaas-security-boundary"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    yield from start(
        tmp_path_factory,
        "upload-limits",
        QAAS_MAX_MODEL_BYTES=str(MAX_MODEL_BYTES),
        QAAS_MAX_DATASET_BYTES=str(MAX_DATASET_BYTES),
    )


def raw_request(service: Hostile, head: str, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """Send only a request head (no body) and read the answer: proves the body was never awaited."""
    port = int(service.dep.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    return int(status_line.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def multipart_stream(total: int, sent: list[int], file_name: str = "model.onnx") -> Iterator[bytes]:
    """A multipart body with one file part of `total` bytes, produced lazily; `sent` counts bytes."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sent.append(len(head))
    yield head
    chunk = bytes(1 << 20)
    left = total
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        sent[0] += len(piece)
        left -= len(piece)
        yield piece
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(("path", "limit"), [("/v1/models", MAX_MODEL_BYTES), ("/v1/datasets", MAX_DATASET_BYTES)])
def test_declared_length_over_the_limit_is_refused_before_the_body(service: Hostile, path: str, limit: int) -> None:
    before = service.tree()
    started = time.monotonic()
    status, body = raw_request(
        service,
        (
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {10 << 30}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
        ),
    )
    assert time.monotonic() - started < 3
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert f"limit of {limit} bytes" in body["error"]["message"]
    assert body["error"]["detail"] == {"limit_bytes": limit, "content_length": 10 << 30}
    assert_contained(service, before)
    assert_serving(service)


def test_oversized_upload_gets_413_not_a_broken_connection(service: Hostile, tmp_path: Path) -> None:
    before = service.tree()
    big = tmp_path / "big.onnx"
    with big.open("wb") as f:
        f.truncate(MAX_MODEL_BYTES * 4)
    with service.client() as http, big.open("rb") as f:
        response = http.post("/v1/models", files={"file": ("big.onnx", f)})
    error = assert_error(response, 413, "payload_too_large")
    assert "QAAS_MAX_MODEL_BYTES" in error["message"]
    assert_contained(service, before)
    assert_serving(service)


def test_chunked_upload_is_cut_at_the_limit(service: Hostile) -> None:
    """No Content-Length: the bytes are counted as they arrive and the request ends at the limit."""
    before = service.tree()
    sent: list[int] = []
    with service.client() as http:
        response = http.post(
            "/v1/models",
            content=multipart_stream(1 << 30, sent),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    error = assert_error(response, 413, "payload_too_large")
    assert error["detail"] == {"limit_bytes": MAX_MODEL_BYTES}
    assert sent[0] < 128 << 20, f"the client could push {sent[0]} bytes before the server stopped it"
    assert_contained(service, before)
    assert_serving(service)


def test_file_over_its_limit_within_the_framing_allowance(service: Hostile) -> None:
    before = service.tree()
    with service.client() as http:
        response = http.post("/v1/models", files={"file": ("m.onnx", bytes(MAX_MODEL_BYTES + 1))})
    error = assert_error(response, 413, "payload_too_large")
    assert "model file" in error["message"]
    assert_contained(service, before)


def test_json_body_over_the_limit(service: Hostile) -> None:
    with service.client() as http:
        response = http.post(
            "/v1/jobs",
            content=b'{"model_id": "' + b"x" * (17 << 20) + b'"}',
            headers={"Content-Type": "application/json"},
        )
    assert_error(response, 413, "payload_too_large")
    assert_serving(service)


def test_api_memory_stays_flat_for_a_large_upload(service: Hostile, tmp_path: Path) -> None:
    """200 MiB through the API: it is spooled and staged to disk in chunks, never held in memory."""
    before = service.tree()
    size = 200 << 20
    path = tmp_path / "calib.npy"
    header = h.npy_header((size // 4,))
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + size)  # sparse: zeros without writing them
    api = service.api_process()
    baseline = api.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with service.client() as http, path.open("rb") as upload:
            response = http.post("/v1/datasets", files={"file": ("calib.npy", upload)})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == path.stat().st_size
    growth = peak - baseline
    assert growth < 48 << 20, f"the API grew by {growth >> 20} MiB for a {size >> 20} MiB upload"
    with service.client() as http:
        assert http.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204
    assert_contained(service, before)


def test_a_normal_job_still_completes(service: Hostile, tmp_path: Path) -> None:
    normal_job(service, tmp_path)
    assert_serving(service)
