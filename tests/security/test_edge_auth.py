"""Nothing unauthenticated costs the API: the key, the rate limit and the cap on uploads in flight are
decided from the request head, before a byte of the body is read. A real uvicorn process on loopback,
spoken to over raw sockets, so a stalled body is really stalled."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Deployment, deploy
from tests.onnx_models import conv_classifier

pytestmark = pytest.mark.e2e

DECLARED = 1 << 30  # a 1 GiB upload is announced...
DECLARED_JSON = 15 << 20  # (or a JSON body just under its 16 MiB cap)...
SENT = 1 << 20  # ...1 MiB of it is sent, then the client stalls
BOUNDARY = "qaas-edge-boundary"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The API alone (no worker is needed to refuse or accept an upload), with auth on."""
    yield from deploy(
        "edge-auth",
        tmp_path_factory.mktemp("edge-auth"),
        worker=False,
        QAAS_AUTH="on",
        QAAS_UPLOADS_IN_FLIGHT_PER_KEY="1",
        QAAS_UPLOADS_IN_FLIGHT="2",
        QAAS_RATE_LIMIT_PER_MINUTE="30",
    )


def create_key(dep: Deployment, tenant: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.admin", "create-key", "--tenant", tenant],
        env=dep.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def connect(dep: Deployment) -> socket.socket:
    port = int(dep.base_url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def head(path: str, length: int, key: str | None = None, content_type: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {length}"]
    lines.append(f"Content-Type: {content_type or f'multipart/form-data; boundary={BOUNDARY}'}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upload_start(file_name: str = "model.onnx") -> bytes:
    """The start of a multipart body: one file part whose bytes follow."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def declared(content_type: str | None) -> int:
    return DECLARED if content_type is None else DECLARED_JSON


def stalled(dep: Deployment, path: str, key: str | None, content_type: str | None = None) -> socket.socket:
    """A connection that announced a large body, sent SENT bytes of it and stalls."""
    sock = connect(dep)
    sock.sendall(head(path, declared(content_type), key, content_type))
    body = upload_start() if content_type is None else b'{"model_id": "'
    # Refused while the first MiB is still on its way: the answer is waiting all the same.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(body + bytes(SENT - len(body)))
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, object]]:
    """The status, headers and JSON body of one answer (the socket's timeout bounds the wait)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed its end: it reads nothing more of the body."""
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def send_until_refused(sock: socket.socket, total: int) -> int:
    """Keep sending the rest of a `total`-byte body; the bytes sent before the connection broke."""
    sent = 0
    try:
        for _ in range(total // SENT):
            sock.sendall(bytes(SENT))
            sent += SENT
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/models", None), ("/v1/datasets", None), ("/v1/jobs", "application/json")],
    ids=["model-upload", "dataset-upload", "json-body"],
)
@pytest.mark.parametrize("key", [None, "qaas_deadbeef_" + "x" * 43], ids=["no-key", "unknown-key"])
def test_unauthenticated_body_gets_401_at_once_and_is_not_read(
    api: Deployment, path: str, content_type: str | None, key: str | None
) -> None:
    with stalled(api, path, key, content_type) as sock:
        status, headers, body = read_answer(sock)  # while the client still owes most of the body
        assert status == 401, body
        assert body["error"]["code"] == "unauthorized"  # type: ignore[index]
        assert headers["www-authenticate"] == "Bearer"
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
        # The rest of the body has nowhere to go: far less than the declared size is ever taken.
        assert send_until_refused(sock, declared(content_type)) < declared(content_type) // 4


def test_rate_limit_answers_before_the_body(api: Deployment) -> None:
    key = create_key(api, "hasty")
    with connect(api) as sock:  # 30 requests per minute: spend them on one keep-alive connection
        for _ in range(30):
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
            assert read_answer(sock)[0] == 200
    with stalled(api, "/v1/models", key) as sock:
        status, headers, body = read_answer(sock)
        assert status == 429, body
        assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
        assert int(headers["retry-after"]) >= 1
        assert closed_by_server(sock)


def complete_upload(dep: Deployment, key: str, content: bytes) -> tuple[int, dict[str, object]]:
    with connect(dep) as sock:
        body = upload_start() + content + f"\r\n--{BOUNDARY}--\r\n".encode()
        sock.sendall(head("/v1/models", len(body), key) + body)
        status, _, answer = read_answer(sock)
    return status, answer


def holding_a_slot(dep: Deployment, key: str) -> socket.socket:
    """A stalled upload by `key` that the server has admitted: from then on a tiny upload by the same
    key is refused (429) instead of answered (422, not a model)."""
    for _ in range(20):
        sock = stalled(dep, "/v1/models", key)
        for _ in range(100):
            if complete_upload(dep, key, b"not a model")[0] == 429:
                return sock
            sock.setblocking(False)
            try:
                refused = sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                refused = False
            finally:
                sock.settimeout(10)
            if refused:  # a probe slipped in first and this one was refused: start over
                break
        sock.close()
    raise AssertionError("the stalled upload was never admitted")


def test_uploads_in_flight_are_capped_per_key_and_per_process(api: Deployment, tmp_path: Path) -> None:
    alice, bob, carol = (create_key(api, tenant) for tenant in ("alice", "bob", "carol"))
    # QAAS_UPLOADS_IN_FLIGHT_PER_KEY=1, QAAS_UPLOADS_IN_FLIGHT=2
    with holding_a_slot(api, alice):
        with stalled(api, "/v1/datasets", alice) as second:
            status, headers, body = read_answer(second)
            assert status == 429, body
            assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
            assert body["error"]["detail"]["scope"] == "key"  # type: ignore[index]
            assert int(headers["retry-after"]) >= 1
            assert closed_by_server(second)
        with holding_a_slot(api, bob), stalled(api, "/v1/models", carol) as third:
            status, _, body = read_answer(third)
            assert status == 429, body
            assert body["error"]["detail"]["scope"] == "process"  # type: ignore[index]
            assert closed_by_server(third)
    # The stalled uploads ended with their connections: their slots are free again.
    model = conv_classifier(tmp_path / "m.onnx").read_bytes()
    for _ in range(100):
        status, body = complete_upload(api, carol, model)
        if status != 429:
            break
        time.sleep(0.2)
    assert status == 201, body
