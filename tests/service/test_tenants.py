"""Tenants and API keys: nobody sees anybody else's models, datasets, jobs or artifacts."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.auth import create_key
from service.database import transaction, utcnow
from service.quotas import FILE_OVERHEAD_BYTES
from service.settings import Settings
from service.tables import Upload, new_id
from service.throttle import RateLimiter
from tests.conftest import clean_qaas_env
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, npz_bytes, store_artifact


def _key(factory: sessionmaker[Session], tenant: str) -> str:
    with transaction(factory) as session:
        return create_key(session, tenant).key


@pytest.fixture
def api(auth_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(auth_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def keys(api: TestClient) -> dict[str, str]:
    factory = api.app.state.session_factory  # type: ignore[attr-defined]
    return {"alice": _key(factory, "alice"), "bob": _key(factory, "bob")}


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _alice_world(api: TestClient, key: str, tmp_path: Path) -> dict[str, str]:
    """A model, a dataset, a job and an artifact belonging to alice."""
    model = api.post(
        "/v1/models",
        headers=_as(key),
        files={"file": ("m.onnx", conv_classifier(tmp_path / "m.onnx").read_bytes())},
    )
    assert model.status_code == 201, model.text
    data = np.random.default_rng(0).random((4, 1, 3, 8, 8), dtype=np.float32)
    dataset = api.post("/v1/datasets", headers=_as(key), files={"file": ("d.npz", npz_bytes(input=data))})
    assert dataset.status_code == 201, dataset.text
    job = api.post(
        "/v1/jobs",
        headers=_as(key),
        json={"model_id": model.json()["id"], "calibration_dataset_id": dataset.json()["id"]},
    )
    assert job.status_code == 202, job.text
    store_artifact(api, job.json()["id"], b"{}", tmp_path, name="report.json", media_type="application/json")
    # An upload to the object store (this service keeps its files itself, so the row is made here).
    with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
        model_id = new_id()
        weights = {"name": "w.bin", "size_bytes": 1, "sha256": None, "key": f"models/{model_id}/w.bin"}
        upload = Upload(
            tenant="alice",
            model_id=model_id,
            files=[{**weights, "upload_id": "u", "part_bytes": 5 << 20}],
            size_bytes=1,
            expires_at=utcnow() + timedelta(hours=1),
        )
        session.add(upload)
        session.flush()
        upload_id = upload.id
    return {"model": model.json()["id"], "dataset": dataset.json()["id"], "job": job.json()["id"], "upload": upload_id}


def test_endpoints_need_a_valid_key(api: TestClient, keys: dict[str, str], auth_settings: Settings) -> None:
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert api.get(path).status_code == 200, path
    missing = api.get("/v1/models")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(api.get("/v1/models", headers=_as("qaas_deadbeef_" + "x" * 43)), 401, "unauthorized")
    assert_error(api.get("/v1/models", headers=_as(keys["alice"][:-1] + "?")), 401, "unauthorized")
    assert_error(api.get("/v1/models", headers={"Authorization": f"Basic {keys['alice']}"}), 401, "unauthorized")
    assert_error(api.get("/metrics"), 401, "unauthorized")
    assert api.get("/v1/models", headers=_as(keys["alice"])).status_code == 200
    assert_error(api.get("/metrics", headers=_as(keys["alice"])), 403, "forbidden")  # needs the operator token
    schemes = api.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())  # Swagger's Authorize button


def _same_as_missing(response: Any, missing: Any, own_id: str) -> None:
    assert response.status_code == missing.status_code == 404
    assert response.json() == {
        **missing.json(),
        "error": {
            **missing.json()["error"],
            "message": missing.json()["error"]["message"].replace("00000000-0000-0000-0000-000000000000", own_id),
            "detail": {
                k: (own_id if v == "00000000-0000-0000-0000-000000000000" else v)
                for k, v in missing.json()["error"]["detail"].items()
            },
        },
    }


def test_another_tenants_resources_do_not_exist(api: TestClient, keys: dict[str, str], tmp_path: Path) -> None:
    ids = _alice_world(api, keys["alice"], tmp_path)
    bob = _as(keys["bob"])
    nobody = "00000000-0000-0000-0000-000000000000"
    checks = [
        ("GET", "/v1/models/{}", "model"),
        ("GET", "/v1/models/{}/file", "model"),
        ("DELETE", "/v1/models/{}", "model"),
        ("GET", "/v1/datasets/{}", "dataset"),
        ("DELETE", "/v1/datasets/{}", "dataset"),
        ("GET", "/v1/jobs/{}", "job"),
        ("POST", "/v1/jobs/{}/cancel", "job"),
        ("DELETE", "/v1/jobs/{}", "job"),
        ("GET", "/v1/jobs/{}/events", "job"),
        ("GET", "/v1/jobs/{}/report", "job"),
        ("GET", "/v1/jobs/{}/report.html", "job"),
        ("GET", "/v1/jobs/{}/artifacts", "job"),
        ("GET", "/v1/jobs/{}/artifacts/report.json", "job"),
        ("GET", "/v1/uploads/{}", "upload"),
        ("DELETE", "/v1/uploads/{}", "upload"),
    ]
    covered = set()
    for method, template, kind in checks:
        covered.add((method, template.replace("{}", "{id}")))
        theirs = api.request(method, template.format(ids[kind]), headers=bob)
        missing = api.request(method, template.format(nobody), headers=bob)
        _same_as_missing(theirs, missing, ids[kind])
    # Every contract route with an id is in the list above.
    routes = {
        (
            method.upper(),
            re.sub(r"\{[a-z_]+\}", "{id}", path).replace("{id}/artifacts/{id}", "{id}/artifacts/report.json"),
        )
        for path, operations in api.get("/openapi.json").json()["paths"].items()
        if "{" in path
        for method in operations
    }
    assert len(routes) >= len(checks)
    assert routes <= covered, routes - covered
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert api.get(path, headers=bob).json()["items"] == []
        assert len(api.get(path, headers=_as(keys["alice"])).json()["items"]) == 1
    usage = api.get("/v1/usage", headers=bob).json()
    assert (usage["tenant"], usage["models"], usage["storage"]["total_bytes"]) == ("bob", 0, 0)
    assert api.get("/v1/usage", headers=_as(keys["alice"])).json()["jobs"]["queued"] == 1
    # A job cannot reference another tenant's model or dataset.
    assert_error(
        api.post("/v1/jobs", headers=bob, json={"model_id": ids["model"], "recipe": {"mode": "dynamic"}}),
        404,
        "not_found",
    )
    own = api.post("/v1/models", headers=bob, files={"file": ("m.onnx", (tmp_path / "m.onnx").read_bytes())}).json()
    assert_error(
        api.post("/v1/jobs", headers=bob, json={"model_id": own["id"], "calibration_dataset_id": ids["dataset"]}),
        404,
        "not_found",
    )
    # Alice still has everything.
    assert api.get(f"/v1/jobs/{ids['job']}", headers=_as(keys["alice"])).json()["status"] == "queued"
    assert api.get(f"/v1/jobs/{ids['job']}/artifacts/report.json", headers=_as(keys["alice"])).content == b"{}"


def test_idempotency_keys_are_per_tenant(api: TestClient, keys: dict[str, str], tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "m.onnx")
    jobs = []
    for who in ("alice", "bob"):
        model = api.post("/v1/models", headers=_as(keys[who]), files={"file": ("m.onnx", path.read_bytes())}).json()
        response = api.post(
            "/v1/jobs",
            headers={**_as(keys[who]), "Idempotency-Key": "same"},
            json={"model_id": model["id"], "recipe": {"mode": "dynamic"}},
        )
        assert response.status_code == 202, response.text
        jobs.append(response.json()["id"])
    assert jobs[0] != jobs[1]


def test_revoked_key_is_refused(api: TestClient, keys: dict[str, str]) -> None:
    from service.auth import revoke_key

    with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
        revoke_key(session, keys["alice"][:13])
    assert_error(api.get("/v1/models", headers=_as(keys["alice"])), 401, "unauthorized")
    assert api.get("/v1/models", headers=_as(keys["bob"])).status_code == 200


def test_active_job_quota(auth_settings: Settings, tmp_path: Path) -> None:
    settings = auth_settings.model_copy(update={"quota_active_jobs": 2})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        alice, bob = _key(factory, "alice"), _key(factory, "bob")
        path = conv_classifier(tmp_path / "m.onnx")
        model = api.post("/v1/models", headers=_as(alice), files={"file": ("m.onnx", path.read_bytes())}).json()
        body = {"model_id": model["id"], "recipe": {"mode": "dynamic"}}
        first = api.post("/v1/jobs", headers=_as(alice), json=body).json()
        assert api.post("/v1/jobs", headers=_as(alice), json=body).status_code == 202
        over = api.post("/v1/jobs", headers=_as(alice), json=body)
        assert_error(over, 429, "rate_limited")
        assert int(over.headers["retry-after"]) > 0
        # Other tenants are not affected; a finished job frees a slot.
        other = api.post("/v1/models", headers=_as(bob), files={"file": ("m.onnx", path.read_bytes())}).json()
        assert api.post("/v1/jobs", headers=_as(bob), json={**body, "model_id": other["id"]}).status_code == 202
        api.post(f"/v1/jobs/{first['id']}/cancel", headers=_as(alice))
        assert api.post("/v1/jobs", headers=_as(alice), json=body).status_code == 202


def test_storage_quota(auth_settings: Settings, tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "m.onnx")
    size = path.stat().st_size + FILE_OVERHEAD_BYTES  # one file
    settings = auth_settings.model_copy(update={"quota_storage_bytes": size * 2 + 10})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        alice = _key(api.app.state.session_factory, "alice")  # type: ignore[attr-defined]
        for _ in range(2):
            assert (
                api.post("/v1/models", headers=_as(alice), files={"file": ("m.onnx", path.read_bytes())}).status_code
                == 201
            )
        error = assert_error(
            api.post("/v1/models", headers=_as(alice), files={"file": ("m.onnx", path.read_bytes())}),
            413,
            "quota_exceeded",
        )
        assert "quota" in error["message"]
        assert len(api.get("/v1/models", headers=_as(alice)).json()["items"]) == 2
        storage_dir = settings.resolved_storage_dir / "models"
        assert len(list(storage_dir.iterdir())) == 2  # nothing of the refused upload was kept


def test_rate_limit_per_key(auth_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings = auth_settings.model_copy(update={"rate_limit_per_minute": 5})
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        alice, bob = _key(factory, "alice"), _key(factory, "bob")
        for _ in range(5):
            assert api.get("/v1/models", headers=_as(alice)).status_code == 200
        limited = api.get("/v1/models", headers=_as(alice))
        assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert api.get("/v1/models", headers=_as(bob)).status_code == 200
    assert alice not in caplog.text and bob not in caplog.text  # a key is never logged


def test_requests_without_a_valid_key_are_limited_per_address_before_the_database(auth_settings: Settings) -> None:
    settings = auth_settings.model_copy(update={"auth_failures_per_minute": 3})
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        alice = _key(factory, "alice")
        made_up = "qaas_0badc0de_" + "x" * 43  # well formed: it costs a database lookup
        lookups: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "api_keys" in statement:
                lookups.append(statement)

        event.listen(api.app.state.engine, "before_cursor_execute", count)  # type: ignore[attr-defined]
        try:
            assert api.get("/v1/models", headers=_as(alice)).status_code == 200  # successes do not count
            for headers in (_as(made_up), {}, _as(made_up)):  # unknown, none, unknown: three failures
                assert_error(api.get("/v1/models", headers=headers), 401, "unauthorized")
            looked_up = len(lookups)
            refused = api.get("/v1/models", headers=_as(made_up))
            error = assert_error(refused, 429, "rate_limited")
            assert "without a valid API key" in error["message"] and int(refused.headers["retry-after"]) >= 1
            assert error["detail"]["scope"] == "address"
            assert len(lookups) == looked_up, lookups[looked_up:]
            # From that address a key found valid before is still served (tests/service/test_auth.py).
            assert api.get("/v1/models", headers=_as(alice)).status_code == 200
            looked_up = len(lookups)
            assert_error(api.get("/v1/models", headers=_as(made_up)), 429, "rate_limited")
            assert len(lookups) == looked_up, lookups[looked_up:]
            # Another address is not held back by this one (no lifespan: the app is already running).
            other = TestClient(app, raise_server_exceptions=False, client=("10.0.0.9", 40000))
            assert other.get("/v1/models", headers=_as(alice)).status_code == 200
            assert_error(other.get("/v1/models", headers=_as(made_up)), 401, "unauthorized")
        finally:
            event.remove(api.app.state.engine, "before_cursor_execute", count)  # type: ignore[attr-defined]


def test_a_rate_limiter_keyed_by_address_stays_small() -> None:
    limiter = RateLimiter(60, max_buckets=100)
    for i in range(1000):
        limiter.acquire(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter.buckets) <= 101
    assert limiter.wait("10.0.3.231") == 0.0  # the newest are kept (each has 59 of 60 tokens left)
    assert limiter.buckets["10.0.3.231"][0] == pytest.approx(59, abs=0.1)


def test_key_life_cycle_through_the_admin_command(auth_settings: Settings) -> None:
    env = clean_qaas_env(
        QAAS_DATA_DIR=str(auth_settings.resolved_data_dir),
        QAAS_DATABASE_URL=auth_settings.resolved_database_url,
    )

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.admin", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    created = admin("create-key", "--tenant", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"qaas_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", key)
    prefix = key[:13]
    listed = admin("list-keys").stdout
    assert prefix in listed and "acme" in listed and key not in listed
    with TestClient(create_app(auth_settings), raise_server_exceptions=False) as api:
        assert api.get("/v1/models", headers=_as(key)).status_code == 200
        revoked = admin("revoke-key", prefix)
        assert revoked.returncode == 0 and prefix in revoked.stdout
        assert_error(api.get("/v1/models", headers=_as(key)), 401, "unauthorized")
    assert admin("revoke-key", "qaas_00000000").returncode == 1
    [row] = admin("list-keys", "--tenant", "acme").stdout.splitlines()[1:]
    assert row.startswith(prefix) and not row.endswith("\t-")  # shows when it was revoked
    assert admin("list-keys", "--tenant", "nobody").stdout.splitlines()[1:] == []


def test_compare_cannot_use_another_tenants_model_as_reference(
    api: TestClient, keys: dict[str, str], tmp_path: Path
) -> None:
    alice = _alice_world(api, keys["alice"], tmp_path)
    bob_model = api.post(
        "/v1/models",
        headers=_as(keys["bob"]),
        files={"file": ("m.onnx", conv_classifier(tmp_path / "b.onnx").read_bytes())},
    ).json()
    recipe = {"mode": "compare", "reference_model_id": alice["model"]}
    response = api.post("/v1/jobs", headers=_as(keys["bob"]), json={"model_id": bob_model["id"], "recipe": recipe})
    error = assert_error(response, 422, "invalid_recipe")
    assert "names no model of yours" in error["message"]
