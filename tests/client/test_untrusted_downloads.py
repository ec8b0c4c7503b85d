"""Downloads from a service the client does not trust: artifact names are plain file names inside the
chosen folder, the API key goes to the service's origin only (a presigned redirect to the object store
is followed without it), and a key about to travel in clear over the network is warned about."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from qaas_client import Client, QaasError
from qaas_client import http as qaas_http
from qaas_client.cli import cli
from qaas_client.errors import InsecureTransportWarning, UnsafeResponseError
from service.app import create_app
from service.auth import create_key
from service.database import transaction
from service.settings import Settings
from tests.client.conftest import AppTransport, scripted
from tests.client.hostile import Hostile
from tests.onnx_models import matmul_mlp
from tests.service.helpers import store_artifact

KEY = "qaas_12345678_secret"
MODEL = b"quantized model bytes"
DATA = b"weights " * 64


def qaas(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def keyed(answer: Callable[[httpx.Request], httpx.Response]) -> Client:
    """A client with a key, over https (no warning), whose requests `answer` answers."""
    return Client("https://qaas.test", KEY, transport=httpx.MockTransport(answer))


def every_file(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Artifact names


def listing(bad: str) -> dict[str, bytes]:
    """What a hostile service lists: the model, and an external data file under a name of its choosing."""
    return {"quantized.onnx": MODEL, bad: DATA}


@pytest.mark.parametrize(
    "bad",
    ["{outside}/x", "../x", "../../x", "sub/x", "..\\x", "..", ".", "", "x\0y", "C:x"],
    ids=["absolute", "parent", "grandparent", "subfolder", "backslash", "dotdot", "dot", "empty", "nul", "drive"],
)
def test_an_artifact_name_that_is_not_a_plain_file_name_is_refused_and_nothing_is_written(
    tmp_path: Path, bad: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "home" / "u" / "models"
    folder.mkdir(parents=True)
    bad = bad.format(outside=outside)
    files = listing(bad)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "status": "succeeded", "stage": "done", "progress": 1.0})
        if request.url.path == "/v1/jobs/j1/artifacts":
            return httpx.Response(
                200,
                json=[
                    {
                        "name": name,
                        "size_bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "media_type": "application/octet-stream",
                        "url": f"/v1/jobs/j1/artifacts/{name}",
                    }
                    for name, data in files.items()
                ],
            )
        return httpx.Response(200, content=MODEL if request.url.path.endswith("/quantized.onnx") else DATA)

    with scripted(answer) as client, pytest.raises(UnsafeResponseError) as refused:
        client.get_job("j1").download(folder)
    assert refused.value.code == "unsafe_artifact_name"
    assert repr(bad) in refused.value.message, refused.value.message
    # Refused before anything was fetched: not even the model, and nothing anywhere else.
    assert every_file(tmp_path) == ["home", "home/u", "home/u/models", "outside"]


def test_qaas_jobs_download_refuses_an_absolute_or_parent_name_and_says_which(tmp_path: Path, hostile: Hostile) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    target = tmp_path / "bashrc"  # stands for /home/u/.bashrc: absolute, outside the folder
    for bad in (str(target), "../x"):
        hostile.job("j1")
        hostile.artifacts("j1", listing(bad), urls={bad: "/v1/jobs/j1/artifacts/data"})
        hostile.file("/v1/jobs/j1/artifacts/quantized.onnx", MODEL)
        hostile.file("/v1/jobs/j1/artifacts/data", DATA)  # served, for a client that would write it
        code, _, stderr = qaas("--url", hostile.url, "--api-key", KEY, "jobs", "download", "j1", "-o", str(folder))
        assert code == 1 and repr(bad) in stderr and "not a plain file name" in stderr, stderr
        assert every_file(tmp_path) == ["folder"]  # nothing in the folder, nothing beside it


def test_a_symbolic_link_planted_in_the_folder_is_not_written_through(tmp_path: Path, hostile: Hostile) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "quantized.onnx.data").symlink_to(victim)
    hostile.job("j1")
    hostile.artifacts("j1", {"quantized.onnx": MODEL, "quantized.onnx.data": DATA})
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx", MODEL)
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx.data", DATA)
    with Client(hostile.url, KEY) as client, pytest.raises(UnsafeResponseError) as refused:
        client.get_job("j1").download(folder)
    assert "symbolic link" in refused.value.message and "quantized.onnx.data" in refused.value.message
    assert victim.read_text() == "keep me"
    assert (folder / "quantized.onnx.data").is_symlink() and sorted(p.name for p in folder.iterdir()) == [
        "quantized.onnx.data"
    ]


def test_plain_names_with_odd_characters_are_fetched_url_quoted(tmp_path: Path, hostile: Hostile) -> None:
    name = "weights #1?.data"
    hostile.job("j1")
    hostile.artifacts("j1", {"quantized.onnx": MODEL, name: DATA})
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx", MODEL)
    hostile.file("/v1/jobs/j1/artifacts/weights%20%231%3F.data", DATA)
    with Client(hostile.url, KEY) as client:
        client.get_job("j1").download(tmp_path)
    assert (tmp_path / name).read_bytes() == DATA


# Where the API key goes


def test_an_artifact_url_on_another_host_never_receives_the_key(
    tmp_path: Path, hostile: Hostile, store: Hostile
) -> None:
    """The listing's `url` points at another origin: the client fetches the artifact from the service
    (by job id and name), and the other host receives nothing at all."""
    hostile.job("j1")
    hostile.artifacts(
        "j1",
        {"quantized.onnx": MODEL, "quantized.onnx.data": DATA},
        urls={"quantized.onnx": f"{store.url}/steal", "quantized.onnx.data": f"{store.url}/steal-too"},
    )
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx", MODEL)
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx.data", DATA)
    store.file("/steal", MODEL)
    store.file("/steal-too", DATA)
    with Client(hostile.url, KEY) as client:
        saved = client.get_job("j1").download(tmp_path)
    assert saved.read_bytes() == MODEL and (tmp_path / "quantized.onnx.data").read_bytes() == DATA
    assert store.seen == []
    assert hostile.asked("/v1/jobs/j1/artifacts/quantized.onnx")[0].headers["authorization"] == f"Bearer {KEY}"


def test_no_request_carrying_the_key_leaves_the_services_origin() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    with keyed(answer) as client:
        for elsewhere in ("https://evil.test/v1/jobs", "http://qaas.test/v1/jobs", "https://qaas.test:8443/v1/jobs"):
            with pytest.raises(UnsafeResponseError) as refused:
                client.http.send("GET", elsewhere)
            assert refused.value.code == "foreign_url"
        client.http.send("GET", "https://qaas.test:443/v1/jobs")  # the service itself, spelled in full
    assert [str(r.url) for r in sent] == ["https://qaas.test/v1/jobs"]


def test_a_presigned_redirect_to_the_store_is_followed_without_the_key(
    tmp_path: Path, hostile: Hostile, store: Hostile
) -> None:
    """QAAS_S3_PRESIGNED_DOWNLOADS=1: the service answers 307 to a presigned URL of the object store."""
    hostile.job("j1")
    hostile.artifacts("j1", {"quantized.onnx": MODEL, "quantized.onnx.data": DATA})
    for name, content in (("quantized.onnx", MODEL), ("quantized.onnx.data", DATA)):
        hostile.redirect(f"/v1/jobs/j1/artifacts/{name}", f"{store.url}/bucket/{name}?X-Amz-Signature=s1g")
        store.file(f"/bucket/{name}", content)

    with Client(hostile.url, KEY) as client:
        saved = client.get_job("j1").download(f"{tmp_path}/py/")
    assert saved.read_bytes() == MODEL and (tmp_path / "py" / "quantized.onnx.data").read_bytes() == DATA

    code, stdout, stderr = qaas("--url", hostile.url, "--api-key", KEY, "jobs", "download", "j1", "-o", str(tmp_path))
    assert code == 0, stderr
    assert (tmp_path / "quantized.onnx").read_bytes() == MODEL and "Saved" in stdout

    assert len(store.seen) == 4 and all("authorization" not in seen.headers for seen in store.seen), store.seen
    assert all(seen.path.endswith("?X-Amz-Signature=s1g") for seen in store.seen)
    assert all(seen.headers["authorization"] == f"Bearer {KEY}" for seen in hostile.seen)


class ServiceThenNetwork(httpx.BaseTransport):
    """The in-process app for the service's host; the real network (the S3 server) for any other."""

    def __init__(self, app: TestClient) -> None:
        self.app = AppTransport(app)
        self.network = httpx.HTTPTransport()
        self.elsewhere: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "qaas.test":
            return self.app.handle_request(request)
        self.elsewhere.append(request)
        return self.network.handle_request(request)

    def close(self) -> None:
        self.network.close()


def test_the_real_service_with_presigned_downloads_on_s3(
    s3_env: dict[str, str], sqlite_settings: Settings, tmp_path: Path
) -> None:
    """QAAS_S3_PRESIGNED_DOWNLOADS=1 on a real S3 server (moto): `Job.download()` gets the file from
    the store, where the API key never goes."""
    settings = sqlite_settings.model_copy(
        update={
            "auth": "on",
            "storage_url": s3_env["QAAS_STORAGE_URL"],
            "s3_endpoint_url": s3_env["QAAS_S3_ENDPOINT_URL"],
            "s3_presigned_downloads": True,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as app:
        with transaction(app.app.state.session_factory) as session:  # type: ignore[attr-defined]
            key = create_key(session, "acme").key
        transport = ServiceThenNetwork(app)
        with Client("https://qaas.test", key, transport=transport) as client:
            job = client.create_job(client.upload_model(matmul_mlp(tmp_path / "m.onnx")).id, recipe={"mode": "dynamic"})
            store_artifact(app, job.id, MODEL, tmp_path)
            saved = job.download(tmp_path / "out" / "m_int8.onnx")
    assert saved.read_bytes() == MODEL
    assert [r.url.host for r in transport.elsewhere] == [httpx.URL(s3_env["QAAS_S3_ENDPOINT_URL"]).host]
    assert "authorization" not in transport.elsewhere[0].headers and "X-Amz-Signature" in str(
        transport.elsewhere[0].url
    )


def test_a_redirect_keeps_the_key_on_the_service_and_never_regains_it_once_it_left() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        hops = {
            "/v1/jobs/j1/artifacts/quantized.onnx": "/v1/moved/quantized.onnx",  # same origin
            "/v1/moved/quantized.onnx": "https://store.test/b/q?sig=1",  # another origin
            "/b/q": "https://qaas.test/v1/jobs/j1/report",  # and back to the service
        }
        if request.url.path in hops:
            return httpx.Response(307, headers={"Location": hops[request.url.path]})
        return httpx.Response(200, content=MODEL)

    with keyed(answer) as client, closing(client.http.download("/v1/jobs/j1/artifacts/quantized.onnx")) as got:
        assert got.read() == MODEL
    trail = [(r.url.host, r.url.path, "authorization" in r.headers) for r in sent]
    assert trail == [
        ("qaas.test", "/v1/jobs/j1/artifacts/quantized.onnx", True),
        ("qaas.test", "/v1/moved/quantized.onnx", True),
        ("store.test", "/b/q", False),
        ("qaas.test", "/v1/jobs/j1/report", False),
    ]


def test_the_stores_refusal_is_an_error_that_does_not_print_the_signature(tmp_path: Path) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "store.test":
            return httpx.Response(403, text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message>")
        return httpx.Response(307, headers={"Location": "https://store.test/b/q?X-Amz-Signature=s3cr3t"})

    with keyed(answer) as client, pytest.raises(QaasError) as failed:
        client.http.download("/v1/jobs/j1/artifacts/quantized.onnx")
    message = str(failed.value)
    assert "https://store.test" in message and "403" in message and "expired" in message
    assert "s3cr3t" not in message


# Plain http:// with a key


def test_a_key_sent_over_plain_http_to_another_machine_is_warned_about_once() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    with pytest.warns(InsecureTransportWarning, match="unencrypted") as caught:
        client = Client("http://qaas.example:8000", KEY, transport=httpx.MockTransport(answer))
        with client:
            for _ in range(3):
                list(client.list_jobs())
    assert len(caught) == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in ("https://qaas.example", "http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
            Client(quiet, KEY).close()
        Client("http://qaas.example:8000", "").close()  # no key, nothing to steal


def test_the_cli_says_it_once_on_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hostile: Hostile) -> None:
    monkeypatch.setattr(qaas_http, "is_loopback", lambda host: False)  # as if 127.0.0.1 were another machine
    hostile.job("j1")
    hostile.artifacts("j1", {"quantized.onnx": MODEL})
    hostile.file("/v1/jobs/j1/artifacts/quantized.onnx", MODEL)
    code, _, stderr = qaas("--url", hostile.url, "--api-key", KEY, "jobs", "download", "j1", "-o", str(tmp_path))
    assert code == 0, stderr
    assert stderr.count("qaas: warning:") == 1 and "unencrypted" in stderr, stderr
