"""Uploads straight to the object store (`POST /v1/uploads`), against the real app on a real S3 server
(moto): the parts are PUT to their presigned URLs over HTTP, as a client does, and the model completed
with `POST /v1/models`. It must come out exactly as a model uploaded through the API does."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service import retention
from service.app import create_app
from service.auth import create_key
from service.database import transaction, utcnow
from service.models.service import MAX_FILES_PER_UPLOAD
from service.models.uploads import service as uploads
from service.quotas import FILE_OVERHEAD_BYTES
from service.settings import Settings
from service.storage import Storage
from service.tables import Job, Upload
from tests.s3 import S3Server
from tests.security.hostile import external_data_model
from tests.service.helpers import assert_error, leftovers
from worker.runner import JobRunner

PART = 5 << 20
ELEMENTS = 1 << 14  # float32 weights of 64 KiB: one part
WEIGHTS = bytes(range(256)) * (ELEMENTS * 4 // 256)
GRAPH = external_data_model("weights.bin", length=None, elements=ELEMENTS)
DIGEST = hashlib.sha256(WEIGHTS).hexdigest()
BIG_ELEMENTS = (PART + (1 << 20)) // 4  # two parts, 5 MiB and 1 MiB
BIG = bytes(range(256)) * (BIG_ELEMENTS * 4 // 256)
BIG_GRAPH = external_data_model("weights.bin", length=None, elements=BIG_ELEMENTS)


@pytest.fixture
def s3_settings(sqlite_settings: Settings, s3_env: dict[str, str]) -> Settings:
    return sqlite_settings.model_copy(
        update={
            "auth": "on",
            "storage_url": s3_env["QAAS_STORAGE_URL"],
            "s3_endpoint_url": s3_env["QAAS_S3_ENDPOINT_URL"],
            "s3_part_bytes": PART,
            "direct_upload_part_bytes": PART,
        }
    )


@pytest.fixture
def app(s3_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings), raise_server_exceptions=False) as client:
        with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
            client.headers["Authorization"] = f"Bearer {create_key(session, 'alice').key}"
        yield client


def _start(app: TestClient, *files: dict[str, Any]) -> dict[str, Any]:
    response = app.post(
        "/v1/uploads", json={"files": list(files) or [{"name": "weights.bin", "size_bytes": len(WEIGHTS)}]}
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/uploads/{response.json()['id']}"
    body: dict[str, Any] = response.json()
    return body


def _put(part: dict[str, Any], data: bytes = WEIGHTS, extra: bytes = b"") -> None:
    """What a client does: the part's bytes to its URL, on the object store, without the API key."""
    answer = httpx.put(part["url"], content=data[part["offset"] : part["offset"] + part["size_bytes"]] + extra)
    assert answer.status_code == 200, answer.text


def _complete(app: TestClient, upload_id: str, graph: bytes = GRAPH, **fields: str) -> httpx.Response:
    return app.post("/v1/models", files={"file": ("m.onnx", graph)}, data={"upload_id": upload_id, **fields})


def _unfinished(app: TestClient) -> list[str]:
    return [key for key in leftovers(app) if key.startswith("unfinished:")]


def _facts(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if k not in ("id", "created_at")}


def test_a_model_uploaded_to_the_store_is_the_model_uploaded_through_the_api(app: TestClient) -> None:
    through_api = app.post(
        "/v1/models", files=[("file", ("m.onnx", GRAPH)), ("external_data", ("weights.bin", WEIGHTS))]
    )
    assert through_api.status_code == 201, through_api.text

    upload = _start(app)
    (planned,) = upload["files"]
    assert upload["status"] == "open" and upload["model_id"] is None
    assert [(p["number"], p["size_bytes"], p["offset"]) for p in planned["parts"]] == [(1, len(WEIGHTS), 0)]
    for part in planned["parts"]:
        _put(part)
    model = _complete(app, upload["id"], external_data_sha256=f'{{"weights.bin": "{DIGEST}"}}')
    assert model.status_code == 201, model.text
    assert _facts(model.json()) == _facts(through_api.json())
    assert model.json()["external_data"] == [{"name": "weights.bin", "size_bytes": len(WEIGHTS), "sha256": DIGEST}]

    storage: Storage = app.app.state.storage  # type: ignore[attr-defined]
    assert b"".join(storage.iter_bytes(f"models/{model.json()['id']}/weights.bin")) == WEIGHTS
    assert app.get(f"/v1/models/{model.json()['id']}/file").content == GRAPH
    done = app.get(f"/v1/uploads/{upload['id']}").json()
    assert (done["status"], done["model_id"], done["files"][0]["parts"]) == ("completed", model.json()["id"], [])
    assert_error(_complete(app, upload["id"]), 409, "conflict")
    assert_error(app.delete(f"/v1/uploads/{upload['id']}"), 409, "conflict")  # delete the model instead

    # No sha256 given: the service reads the stored file once and hashes it itself.
    unhashed = _start(app)
    for part in unhashed["files"][0]["parts"]:
        _put(part)
    model = _complete(app, unhashed["id"])
    assert model.status_code == 201, model.text
    assert _facts(model.json()) == _facts(through_api.json())
    assert _unfinished(app) == []


def test_missing_or_wrong_parts_and_a_refused_graph_leave_the_upload_open_to_try_again(app: TestClient) -> None:
    upload = _start(app, {"name": "weights.bin", "size_bytes": len(BIG)})
    first, second = upload["files"][0]["parts"]
    assert [(p["size_bytes"], p["offset"]) for p in (first, second)] == [(PART, 0), (1 << 20, PART)]
    _put(first, BIG)
    error = assert_error(_complete(app, upload["id"], BIG_GRAPH), 422, "upload_incomplete")
    assert (error["detail"]["missing_parts"], error["detail"]["wrong_parts"]) == ([2], [])
    _put(second, BIG, b"more")  # the store (moto) takes it; the service counts it
    error = assert_error(_complete(app, upload["id"], BIG_GRAPH), 422, "upload_incomplete")
    assert (error["detail"]["missing_parts"], error["detail"]["wrong_parts"]) == ([], [2])
    _put(second, BIG)

    # Every check of the graph holds: one that reads past the end of the file, or a file not uploaded.
    too_long = external_data_model("weights.bin", length=None, elements=BIG_ELEMENTS + 1)
    assert_error(_complete(app, upload["id"], too_long), 422, "external_data_escape")
    elsewhere = external_data_model("other.bin", length=None, elements=BIG_ELEMENTS)
    assert_error(_complete(app, upload["id"], elsewhere), 422, "external_data_escape")
    wrong = {"external_data_sha256": '{"weights.bin": "not hex"}'}
    assert_error(_complete(app, upload["id"], **wrong), 422, "invalid_request")
    unknown = {"external_data_sha256": f'{{"other.bin": "{DIGEST}"}}'}
    assert_error(_complete(app, upload["id"], **unknown), 422, "invalid_model")
    both = app.post(
        "/v1/models",
        files=[("file", ("m.onnx", BIG_GRAPH)), ("external_data", ("weights.bin", WEIGHTS))],
        data={"upload_id": upload["id"]},
    )
    assert_error(both, 422, "invalid_request")
    assert app.get(f"/v1/uploads/{upload['id']}").json()["status"] == "open"

    model = _complete(app, upload["id"], BIG_GRAPH)
    assert model.status_code == 201, model.text
    assert model.json()["external_data"][0]["sha256"] == hashlib.sha256(BIG).hexdigest()
    storage: Storage = app.app.state.storage  # type: ignore[attr-defined]
    assert b"".join(storage.iter_bytes(f"models/{model.json()['id']}/weights.bin")) == BIG


def test_bytes_that_differ_from_the_declared_sha256_fail_the_job_cleanly(
    app: TestClient, s3_settings: Settings
) -> None:
    """The service does not read the bytes back when the client gave their sha256; the worker that first
    downloads them does, and fails the job with `input_corrupt` instead of running it on other bytes."""
    claimed = hashlib.sha256(b"the bytes the client says it sent").hexdigest()
    upload = _start(app, {"name": "weights.bin", "size_bytes": len(WEIGHTS), "sha256": claimed})
    for part in upload["files"][0]["parts"]:
        _put(part)
    model = _complete(app, upload["id"])
    assert model.status_code == 201, model.text
    assert model.json()["external_data"][0]["sha256"] == claimed
    job = app.post("/v1/jobs", json={"model_id": model.json()["id"], "recipe": {"mode": "dynamic"}})
    assert job.status_code == 202, job.text

    state = app.app.state  # type: ignore[attr-defined]
    JobRunner(s3_settings, state.session_factory, state.storage).run(job.json()["id"])
    with state.session_factory() as session:
        row = session.get(Job, job.json()["id"])
        assert row is not None and row.status == "failed", row and row.error
        assert row.error is not None and row.error["code"] == "input_corrupt", row.error
        assert row.error["detail"] == {"file_name": "weights.bin", "sha256_recorded": claimed, "sha256_stored": DIGEST}
    assert not (s3_settings.cache_dir / claimed).exists()  # never cached under the name it does not have


def test_another_tenants_upload_does_not_exist(app: TestClient) -> None:
    upload = _start(app)
    for part in upload["files"][0]["parts"]:
        _put(part)
    with transaction(app.app.state.session_factory) as session:  # type: ignore[attr-defined]
        bob = {"Authorization": f"Bearer {create_key(session, 'bob').key}"}
    assert_error(app.get(f"/v1/uploads/{upload['id']}", headers=bob), 404, "not_found")
    assert_error(app.delete(f"/v1/uploads/{upload['id']}", headers=bob), 404, "not_found")
    taken = app.post("/v1/models", headers=bob, files={"file": ("m.onnx", GRAPH)}, data={"upload_id": upload["id"]})
    assert_error(taken, 404, "not_found")
    assert app.get("/v1/models", headers=bob).json()["items"] == []
    assert _complete(app, upload["id"]).status_code == 201  # still alice's, untouched


def test_the_file_cap_counts_the_model_and_names_that_cannot_be_kept_are_refused(
    app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = [{"name": f"w{i}.bin", "size_bytes": 1} for i in range(MAX_FILES_PER_UPLOAD)]
    error = assert_error(app.post("/v1/uploads", json={"files": many}), 413, "payload_too_large")
    assert error["detail"]["limit_files"] == MAX_FILES_PER_UPLOAD == 1000
    # The boundary, on a smaller cap (999 multipart uploads take moto 20 s): the model is the last file.
    monkeypatch.setattr(uploads, "MAX_FILES_PER_UPLOAD", 4)
    assert_error(app.post("/v1/uploads", json={"files": many[:4]}), 413, "payload_too_large")
    upload = _start(app, *many[:3])
    assert len(upload["files"]) == 3 and len(_unfinished(app)) == 3
    assert app.delete(f"/v1/uploads/{upload['id']}").status_code == 204
    assert _unfinished(app) == []

    for files in (
        [{"name": "w.zip", "size_bytes": 10}],
        [{"name": "model.onnx", "size_bytes": 10}],
        [{"name": "w.bin", "size_bytes": 1}, {"name": "w.bin", "size_bytes": 2}],
    ):
        assert_error(app.post("/v1/uploads", json={"files": files}), 422, "invalid_model")
    too_big = [{"name": "w.bin", "size_bytes": app.app.state.settings.max_model_bytes + 1}]  # type: ignore[attr-defined]
    assert_error(app.post("/v1/uploads", json={"files": too_big}), 413, "payload_too_large")
    assert _unfinished(app) == []


def test_an_open_upload_counts_against_the_quota_until_it_is_deleted(s3_settings: Settings) -> None:
    declared = len(WEIGHTS)
    settings = s3_settings.model_copy(update={"quota_storage_bytes": declared + FILE_OVERHEAD_BYTES + 1000})
    with TestClient(create_app(settings), raise_server_exceptions=False) as app:
        with transaction(app.app.state.session_factory) as session:  # type: ignore[attr-defined]
            app.headers["Authorization"] = f"Bearer {create_key(session, 'alice').key}"
        twice = {"files": [{"name": "a.bin", "size_bytes": declared}, {"name": "b.bin", "size_bytes": declared}]}
        assert_error(app.post("/v1/uploads", json=twice), 413, "quota_exceeded")
        upload = _start(app)
        assert_error(
            app.post("/v1/uploads", json={"files": [{"name": "c.bin", "size_bytes": 10}]}), 413, "quota_exceeded"
        )
        assert app.delete(f"/v1/uploads/{upload['id']}").status_code == 204
        assert_error(_complete(app, upload["id"]), 404, "not_found")
        assert_error(app.delete(f"/v1/uploads/{upload['id']}"), 404, "not_found")
        _start(app)  # the quota is free again


def test_the_sweep_aborts_uploads_left_open_past_their_expiry(app: TestClient, s3_server: S3Server) -> None:
    abandoned, finished = _start(app), _start(app)
    _put(abandoned["files"][0]["parts"][0])
    for part in finished["files"][0]["parts"]:
        _put(part)
    model = _complete(app, finished["id"]).json()
    assert len(_unfinished(app)) == 1
    state = app.app.state  # type: ignore[attr-defined]
    assert retention.sweep_uploads(state.session_factory, state.storage) == 0  # nothing expired yet

    with transaction(state.session_factory) as session:
        session.execute(update(Upload).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert retention.sweep_uploads(state.session_factory, state.storage) == 2
    assert _unfinished(app) == []
    assert_error(app.get(f"/v1/uploads/{abandoned['id']}"), 404, "not_found")
    assert_error(_complete(app, abandoned["id"]), 404, "not_found")
    assert app.get(f"/v1/models/{model['id']}/file").content == GRAPH  # a completed upload's files are its model's
    assert f"qaas/models/{model['id']}/weights.bin" in s3_server.object_keys(state.storage.bucket)


def test_a_service_on_local_storage_hands_out_no_upload_urls_and_documents_the_endpoint(
    sqlite_settings: Settings,
) -> None:
    with TestClient(create_app(sqlite_settings), raise_server_exceptions=False) as client:
        error = assert_error(
            client.post("/v1/uploads", json={"files": [{"name": "w.bin", "size_bytes": 10}]}),
            409,
            "direct_uploads_unavailable",
        )
        assert "POST /v1/models" in error["message"]
        refused = client.post("/v1/models", files={"file": ("m.onnx", GRAPH)}, data={"upload_id": "nope"})
        assert_error(refused, 409, "direct_uploads_unavailable")
        spec = client.get("/openapi.json").json()
    create = spec["paths"]["/v1/uploads"]["post"]
    assert create["summary"] and create["operationId"] == "create_upload"
    assert {"201", "409", "413", "422"} <= set(create["responses"])
    assert create["requestBody"]["content"]["application/json"]["examples"]
    assert spec["components"]["schemas"]["UploadOut"]["examples"]
    assert {"get_upload", "delete_upload"} <= {
        op["operationId"] for op in spec["paths"]["/v1/uploads/{upload_id}"].values()
    }
    form = spec["components"]["schemas"]["Body_upload_model"]["properties"]
    assert {"upload_id", "external_data_sha256"} <= set(form)
