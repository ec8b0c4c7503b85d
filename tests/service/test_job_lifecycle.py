"""Ending a job's life: DELETE /v1/jobs/{id}, the retention sweep, and GET /v1/usage."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import case, update

from service import retention
from service.database import transaction, utcnow
from service.jobs import state
from service.quotas import FILE_OVERHEAD_BYTES
from service.settings import Settings
from service.tables import Dataset, Job, OnnxModel
from tests.service.helpers import assert_error, conv_model_and_data, store_artifact
from tests.worker.test_reaper import purge_queue
from worker.reaper import Reaper

RESULT = {"original": {"size_bytes": 100}, "quantized": {"size_bytes": 30}, "comparison": {"size_ratio": 0.3}}


def finished_job(client: TestClient, tmp_path: Path, *, artifact: bytes = b"x" * 1000) -> dict[str, Any]:
    """A job that ran and succeeded, with one stored artifact, as a worker would leave it."""
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]}).json()
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        attempt = state.claim(session, job["id"], 60)
        assert attempt == 1
    path = store_artifact(client, job["id"], artifact, tmp_path)
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        assert state.succeed(session, job["id"], attempt, RESULT)
    return {"job": job, "model": model, "dataset": dataset, "path": path}


def test_delete_removes_an_ended_job_and_its_files(client: TestClient, tmp_path: Path) -> None:
    done = finished_job(client, tmp_path)
    job_id = done["job"]["id"]
    assert done["path"].exists()
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 204, response.text
    assert not done["path"].exists() and not done["path"].parent.parent.exists()
    assert_error(client.get(f"/v1/jobs/{job_id}"), 404, "not_found")
    assert_error(client.get(f"/v1/jobs/{job_id}/artifacts/quantized.onnx"), 404, "not_found")
    assert_error(client.delete(f"/v1/jobs/{job_id}"), 404, "not_found")
    assert client.get("/v1/jobs").json()["items"] == []
    # The model and dataset it used are untouched.
    assert client.get(f"/v1/models/{done['model']['id']}").status_code == 200


def test_delete_of_a_queued_or_running_job_is_a_conflict(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]}).json()
    error = assert_error(client.delete(f"/v1/jobs/{job['id']}"), 409, "conflict")
    assert "cancel" in error["message"] and error["detail"]["status"] == "queued"
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        assert state.claim(session, job["id"], 60) == 1
    assert assert_error(client.delete(f"/v1/jobs/{job['id']}"), 409, "conflict")["detail"]["status"] == "running"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    client.post(f"/v1/jobs/{job['id']}/cancel")
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        assert state.fail(session, job["id"], 1, state.CANCELLED_ERROR, status="cancelled")
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204


def test_usage_counts_what_the_tenant_stores_and_runs(client: TestClient, tmp_path: Path) -> None:
    empty = client.get("/v1/usage")
    assert empty.status_code == 200, empty.text
    assert empty.json()["storage"]["total_bytes"] == 0 and empty.json()["jobs"]["queued"] == 0
    done = finished_job(client, tmp_path, artifact=b"y" * 1234)
    queued = client.post(
        "/v1/jobs", json={"model_id": done["model"]["id"], "calibration_dataset_id": done["dataset"]["id"]}
    ).json()
    usage = client.get("/v1/usage").json()
    settings = client.app.state.settings  # type: ignore[attr-defined]
    storage = usage["storage"]
    assert storage["models_bytes"] == done["model"]["size_bytes"]
    assert storage["datasets_bytes"] == done["dataset"]["size_bytes"]
    assert storage["artifacts_bytes"] == 1234
    assert storage["total_bytes"] == storage["models_bytes"] + storage["datasets_bytes"] + 1234
    # What the quota counts: each of the three files (model, dataset, artifact) costs its size plus the overhead.
    assert storage["files"] == 3 and storage["quota_used_bytes"] == storage["total_bytes"] + 3 * FILE_OVERHEAD_BYTES
    assert storage["quota_bytes"] == settings.quota_storage_bytes
    assert usage["jobs"] == {
        "queued": 1,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 0,
        "active_quota": settings.quota_active_jobs,
    }
    assert usage["models"] == 1 and usage["datasets"] == 1 and usage["tenant"] == "default"
    client.post(f"/v1/jobs/{queued['id']}/cancel")
    client.delete(f"/v1/jobs/{done['job']['id']}")
    after = client.get("/v1/usage").json()
    assert after["storage"]["artifacts_bytes"] == 0
    assert after["jobs"]["succeeded"] == 0 and after["jobs"]["cancelled"] == 1


def _age_everything(client: TestClient, days: int) -> None:
    long_ago = utcnow() - timedelta(days=days)
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        ended_long_ago = case((Job.finished_at.is_(None), None), else_=long_ago)
        session.execute(update(Job).values(created_at=long_ago, finished_at=ended_long_ago))
        session.execute(update(OnnxModel).values(created_at=long_ago))
        session.execute(update(Dataset).values(created_at=long_ago))


def test_retention_removes_what_is_old_and_spares_what_a_job_needs(client: TestClient, tmp_path: Path) -> None:
    app_state = client.app.state  # type: ignore[attr-defined]
    old = finished_job(client, tmp_path / "old")
    busy_model, busy_data = conv_model_and_data(client, tmp_path / "busy")
    busy = client.post("/v1/jobs", json={"model_id": busy_model["id"], "calibration_dataset_id": busy_data["id"]})
    assert busy.status_code == 202
    _age_everything(client, days=40)
    recent = conv_model_and_data(client, tmp_path / "recent")[0]
    assert retention.sweep(app_state.session_factory, app_state.storage, 365) == retention.Removed(0, 0, 0)
    removed = retention.sweep(app_state.session_factory, app_state.storage, 30)
    assert removed == retention.Removed(jobs=1, models=1, datasets=1)
    assert_error(client.get(f"/v1/jobs/{old['job']['id']}"), 404, "not_found")
    assert not old["path"].exists()
    assert_error(client.get(f"/v1/models/{old['model']['id']}"), 404, "not_found")
    assert_error(client.get(f"/v1/datasets/{old['dataset']['id']}"), 404, "not_found")
    storage_dir = app_state.settings.resolved_storage_dir
    assert not (storage_dir / "models" / old["model"]["id"]).exists()
    # The queued job and what it uses stay, however old; so does anything recent.
    assert client.get(f"/v1/jobs/{busy.json()['id']}").status_code == 200
    assert client.get(f"/v1/models/{busy_model['id']}").status_code == 200
    assert client.get(f"/v1/datasets/{busy_data['id']}").status_code == 200
    assert client.get(f"/v1/models/{recent['id']}").status_code == 200


def _until(what: str, done: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_workers_sweep_runs_retention_only_when_qaas_retention_days_is_set(
    client: TestClient, tmp_path: Path
) -> None:
    """The worker's periodic sweep (worker.reaper.Reaper, as worker.tasks starts it) is what applies
    QAAS_RETENTION_DAYS; unset, the default, it removes nothing however old."""
    app_state = client.app.state  # type: ignore[attr-defined]
    assert Settings.model_fields["retention_days"].default is None
    old = finished_job(client, tmp_path / "old")
    waiting = client.post("/v1/jobs", json={"model_id": old["model"]["id"], "recipe": {"mode": "dynamic"}}).json()
    _age_everything(client, days=40)
    sent: list[str] = []

    def sweeping(settings: Settings) -> Reaper:
        reaper = Reaper(app_state.session_factory, sent.append, settings, app_state.storage)
        reaper.start()
        return reaper

    # Off: two full sweeps (each re-sends the queued job, whose message the broker lost, when asked to) and
    # everything old is still there.
    purge_queue(app_state.settings)
    reaper = sweeping(app_state.settings.model_copy(update={"sweep_interval_s": 0.1}))
    try:
        for sweeps in (1, 2):
            reaper.resend_all_soon()
            _until(f"sweep {sweeps}", lambda n=sweeps: sent.count(waiting["id"]) >= n)  # type: ignore[misc]
    finally:
        reaper.stop()
        reaper.thread.join(timeout=10)
    assert client.get(f"/v1/jobs/{old['job']['id']}").status_code == 200
    assert client.get(f"/v1/models/{old['model']['id']}").status_code == 200
    assert client.get(f"/v1/datasets/{old['dataset']['id']}").status_code == 200

    # On: the sweep removes the ended job with its files and the old dataset, and keeps the model the
    # queued job uses.
    reaper = sweeping(app_state.settings.model_copy(update={"sweep_interval_s": 0.1, "retention_days": 30}))
    try:
        _until("the retention sweep", lambda: client.get(f"/v1/jobs/{old['job']['id']}").status_code == 404)
        _until("the dataset to go", lambda: client.get(f"/v1/datasets/{old['dataset']['id']}").status_code == 404)
    finally:
        reaper.stop()
        reaper.thread.join(timeout=10)
    assert not old["path"].exists()
    assert client.get(f"/v1/models/{old['model']['id']}").status_code == 200
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"


def test_a_stored_result_of_another_shape_is_served_as_stored_not_a_500(client: TestClient, tmp_path: Path) -> None:
    """A result written by an older (or newer) worker that this version's typed JobResult refuses:
    every read of the job still answers, with the result as it was stored."""
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]}).json()
    odd = {"original": {"size": "100 bytes"}, "quantized": 30, "comparison": None, "verdict": "shipped"}
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        attempt = state.claim(session, job["id"], 60)
        assert attempt is not None and state.succeed(session, job["id"], attempt, odd)
    got = client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200, got.text
    assert got.json()["status"] == "succeeded" and got.json()["result"] == odd
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200 and listed.json()["items"][0]["result"] == odd
    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.json() == odd
    page = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200 and "as stored" in page.text


def test_a_result_stored_by_the_previous_version_is_served_with_the_verdicts_its_engine_made(
    client: TestClient, tmp_path: Path
) -> None:
    """Results stored before the verdicts were recorded (thresholds in `evaluation.fidelity_thresholds`, the
    budget verdict under `quantization.compare`) are served in this version's shape, by the one reader of
    stored results: each output judged by the thresholds its engine recorded, the budget verdict moved to
    `comparison.fidelity`; the API never validates it again on a read, and the page lays it out."""
    from tests.service.test_report_html import _result

    old = _result()
    old["quantization"] = {
        "mode": "compare",
        "compare": {
            "within_budget": False,
            "fidelity": {
                "metric": "cosine",
                "fidelity": 0.91,
                "within_budget": False,
                "accuracy_tolerance": 0.01,
                "samples": 500,
            },
        },
    }
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]}).json()
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        attempt = state.claim(session, job["id"], 60)
        assert attempt is not None and state.succeed(session, job["id"], attempt, old)
    served = client.get(f"/v1/jobs/{job['id']}").json()["result"]
    logits, aux = served["comparison"]["outputs"]
    assert (logits["faithful"], aux["faithful"]) == (True, False)  # aux: cosine 0.91, SQNR 9.5 dB
    assert logits["metric"] == "cosine" and logits["min"] == 0.99 and logits["budgeted"]
    assert served["comparison"]["fidelity"]["within_budget"] is False
    assert served["comparison"]["accuracy"]["within_tolerance"] is True  # 0.78 points within 1
    assert client.get(f"/v1/jobs/{job['id']}/report").json() == served
    page = client.get(f"/v1/jobs/{job['id']}/report.html").text
    assert "Outside the fidelity budget.</strong>" in page and page.count("outside budget</strong>") == 1
