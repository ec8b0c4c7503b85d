"""Issue #23's low hardening items: docs pages that cannot be framed, node names stored clipped,
quota checks atomic per tenant, and uploads orphaned by a dying API swept."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.recipe import MAX_NAME_CHARS
from service.app import create_app
from service.database import transaction
from service.errors import RateLimited
from service.jobs import service as job_service
from service.jobs.schemas import JobCreate
from service.settings import Settings
from service.tables import DEFAULT_TENANT, Job, OnnxModel
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, upload_model

# -- the docs pages cannot be framed ---------------------------------------------------------------


def test_docs_pages_refuse_to_be_framed_and_still_load_their_assets(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["x-frame-options"] == "DENY", page
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy, (page, policy)
        assert "script-src 'self'" in policy  # the offline Swagger UI / ReDoc bundles still run
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
        assert urls, page
        for url in urls:
            assert client.get(url).status_code == 200, url


# -- node names are stored clipped -----------------------------------------------------------------


def test_a_node_name_of_100k_characters_is_stored_clipped(client: TestClient, tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "conv.onnx")
    model = onnx.load(str(path))
    long_name = "n" * 100_000
    model.graph.node[0].name = long_name
    onnx.save(model, str(path))

    uploaded = upload_model(client, path)
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        row = session.get(OnnxModel, uploaded["id"])
        assert row is not None and row.node_names is not None
        stored = list(row.node_names)
    assert stored[0] == long_name[:MAX_NAME_CHARS]
    assert max(len(name) for name in stored) == MAX_NAME_CHARS

    recipe = {"mode": "dynamic"}
    too_long = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": [long_name]}}
    )
    assert too_long.status_code == 422, too_long.text
    unknown = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": ["nope"]}}
    )
    assert_error(unknown, 422, "invalid_recipe")
    known = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": [stored[1]]}}
    )
    assert known.status_code == 202, known.text


# -- a quota check and its insert are one step per tenant -------------------------------------------


def test_two_concurrent_jobs_with_room_for_one_create_exactly_one(
    db_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the tenant's advisory lock; SQLite: BEGIN IMMEDIATE before the check."""
    settings = db_settings.model_copy(update={"quota_active_jobs": 1})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        model = upload_model(api, conv_classifier(tmp_path / "conv.onnx"))
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        storage = api.app.state.storage  # type: ignore[attr-defined]
        # Each request waits, after its check, for the other to have checked too (up to a second): without
        # the tenant's lock both checks see no active job; with it the second check waits for the first commit.
        both_checked = threading.Barrier(2)
        original = job_service.check_active_jobs

        def check_then_wait(session: Session, settings: Settings, tenant: str) -> None:
            original(session, settings, tenant)
            with contextlib.suppress(threading.BrokenBarrierError):
                both_checked.wait(timeout=1)

        monkeypatch.setattr(job_service, "check_active_jobs", check_then_wait)
        body = JobCreate.model_validate({"model_id": model["id"], "recipe": {"mode": "dynamic"}})

        def create() -> str:
            try:
                with transaction(factory) as session:
                    job_service.create_job(session, storage, settings, DEFAULT_TENANT, body, None)
            except RateLimited:
                return "refused"
            return "created"

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(lambda _: create(), range(2)))
        assert outcomes == ["created", "refused"]
        with transaction(factory) as session:
            assert session.scalar(select(func.count()).select_from(Job)) == 1


# -- what a dying API left in staging is swept at the next start ------------------------------------


def test_the_api_start_removes_stale_staging_and_keeps_fresh(sqlite_settings: Settings) -> None:
    staging = sqlite_settings.resolved_data_dir / "staging"
    stale, fresh = staging / "stale", staging / "fresh"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"staged")
    loose = staging / "loose.onnx"
    loose.write_bytes(b"staged")
    two_hours_ago = time.time() - 7200
    for path in (stale / "model.onnx", stale, loose):
        os.utime(path, (two_hours_ago, two_hours_ago))
    with TestClient(create_app(sqlite_settings)):
        pass
    assert sorted(p.name for p in staging.iterdir()) == ["fresh"]
    assert (fresh / "model.onnx").read_bytes() == b"staged"
