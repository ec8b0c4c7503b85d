"""Nothing escapes the storage quota: uploads, a job's expected results at creation, and its real
results before they are stored. A quota answers `quota_exceeded`, distinct from one request's
`payload_too_large`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.jobfile import ArtifactItem, ChildOutcome
from core.lifecycle import AttemptStatus
from core.result import Comparison, JobResult, ModelMetrics
from service.app import create_app
from service.database import make_engine, make_session_factory, transaction
from service.jobs import state
from service.quotas import FILE_OVERHEAD_BYTES, job_estimate
from service.settings import Settings
from service.storage import LocalStorage
from service.tables import Artifact, Job
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error
from tests.service.test_job_state import _job
from worker.runner import JobRunner


def app_with_quota(settings: Settings, quota: int) -> TestClient:
    app = create_app(settings.model_copy(update={"quota_storage_bytes": quota}))
    return TestClient(app, raise_server_exceptions=False)


def test_an_upload_over_the_quota_is_quota_exceeded(sqlite_settings: Settings, tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx").read_bytes()
    with app_with_quota(sqlite_settings, len(model)) as api:  # the bytes fit, the file's overhead does not
        error = assert_error(api.post("/v1/models", files={"file": ("m.onnx", model)}), 413, "quota_exceeded")
    assert error["detail"]["quota_bytes"] == len(model)
    assert "quota" in error["message"]


def test_a_job_whose_results_cannot_fit_is_refused_at_creation(sqlite_settings: Settings, tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx").read_bytes()
    stored = len(model) + FILE_OVERHEAD_BYTES
    # Room for the model and one job's expected results, not two.
    with app_with_quota(sqlite_settings, stored + job_estimate(len(model)) + 1000) as api:
        model_id = api.post("/v1/models", files={"file": ("m.onnx", model)}).json()["id"]
        body = {"model_id": model_id, "recipe": {"mode": "dynamic"}}
        assert api.post("/v1/jobs", json=body).status_code == 202  # its estimate is reserved while it is queued
        error = assert_error(api.post("/v1/jobs", json=body), 413, "quota_exceeded")
        assert error["detail"]["incoming_bytes"] == job_estimate(len(model))
        assert len(api.get("/v1/jobs").json()["items"]) == 1


@pytest.fixture
def factory(sqlite_settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_settings)
    yield make_session_factory(engine)
    engine.dispose()


def test_results_over_the_quota_fail_the_job_and_store_nothing(
    sqlite_settings: Settings, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Room was there at creation; by the time the job ends, other uploads took it."""
    job_id = _job(factory)
    with transaction(factory) as session:
        attempt = state.claim(session, job_id, 60)
    assert attempt is not None
    quantized, report = tmp_path / "quantized.onnx", tmp_path / "report.json"
    quantized.write_bytes(bytes(3000))
    report.write_text(json.dumps({"ok": True}))
    outcome = ChildOutcome(
        AttemptStatus.SUCCEEDED,
        result=JobResult(
            original=ModelMetrics(size_bytes=1), quantized=ModelMetrics(size_bytes=1), comparison=Comparison()
        ),
        artifacts=(
            ArtifactItem("quantized.onnx", quantized, "application/octet-stream"),
            ArtifactItem("report.json", report, "application/json"),
        ),
    )
    settings = sqlite_settings.model_copy(update={"quota_storage_bytes": 3 * FILE_OVERHEAD_BYTES})
    storage = LocalStorage(settings.resolved_storage_dir)
    storage.ensure()
    JobRunner(settings, factory, storage)._store_success(job_id, attempt, outcome)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == "failed"
        assert job.error is not None and job.error["code"] == "quota_exceeded", job.error
        assert "not stored" in job.error["message"]
        assert session.scalar(select(func.count()).select_from(Artifact)) == 0
    assert not (storage.root / f"jobs/{job_id}").exists()
