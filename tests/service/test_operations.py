"""Operations: /metrics (what it counts, and who may read it), request ids, JSON log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from service import logs
from service.app import create_app
from service.auth import create_key
from service.database import transaction
from service.settings import Settings
from service.tables import Job
from tests.service.helpers import assert_error
from tests.service.test_job_lifecycle import finished_job


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_by_route_and_jobs_by_mode_and_status(client: TestClient, tmp_path: Path) -> None:
    done = finished_job(client, tmp_path)
    client.post("/v1/jobs", json={"model_id": done["model"]["id"], "recipe": {"mode": "dynamic"}})
    for _ in range(3):
        client.get(f"/v1/jobs/{done['job']['id']}")
    client.get("/v1/jobs/no-such-job")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    by_route = ("method", "GET"), ("route", "/v1/jobs/{job_id}")
    assert samples[("qaas_http_request_duration_seconds_count", (*by_route, ("status", "200")))] == 3
    assert samples[("qaas_http_request_duration_seconds_count", (*by_route, ("status", "404")))] == 1
    assert samples[("qaas_jobs", (("status", "succeeded"),))] == 1
    assert samples[("qaas_jobs", (("status", "queued"),))] == 1
    assert samples[("qaas_queue_depth", ())] == 1 and samples[("qaas_queue_oldest_seconds", ())] >= 0
    job = (("mode", "static"), ("status", "succeeded"))
    assert samples[("qaas_job_duration_seconds_count", job)] == 1
    assert samples[("qaas_job_duration_seconds_bucket", (("le", "1.0"), *job))] == 1  # it took milliseconds
    assert 0 <= samples[("qaas_job_duration_seconds_sum", job)] < 1
    assert samples[("qaas_database_up", ())] == 1 and samples[("qaas_models", ())] == 1


def test_every_api_replica_reports_the_same_job_figures(
    client: TestClient, app_settings: Settings, tmp_path: Path
) -> None:
    """The README: job figures come from the database, so every API replica reports the same; only
    the request durations are each process's own."""
    done = finished_job(client, tmp_path)
    client.post("/v1/jobs", json={"model_id": done["model"]["id"], "recipe": {"mode": "dynamic"}})

    def from_the_database(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[Any, float]:
        return {
            key: value
            for key, value in samples.items()
            if key[0].startswith(("qaas_jobs", "qaas_job_duration", "qaas_queue_depth", "qaas_models"))
        }

    first = from_the_database(_samples(client.get("/metrics").text))
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as replica:
        second = from_the_database(_samples(replica.get("/metrics").text))
    assert first[("qaas_jobs", (("status", "queued"),))] == 1 and first[("qaas_models", ())] == 1
    assert second == first


def test_metrics_need_the_operator_token_not_a_tenant_key(auth_settings: Settings) -> None:
    settings = auth_settings.model_copy(update={"metrics_token": SecretStr("operator-secret-1234")})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
            key = create_key(session, "alice").key
        assert_error(api.get("/metrics"), 401, "unauthorized")
        assert_error(api.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        refused = assert_error(api.get("/metrics", headers={"Authorization": f"Bearer {key}"}), 403, "forbidden")
        assert "operator token" in refused["message"]
        ok = api.get("/metrics", headers={"Authorization": "Bearer operator-secret-1234"})
        assert ok.status_code == 200 and "qaas_jobs" in ok.text
        # The operator token is not a tenant key.
        assert_error(
            api.get("/v1/models", headers={"Authorization": "Bearer operator-secret-1234"}), 401, "unauthorized"
        )
    with TestClient(create_app(auth_settings), raise_server_exceptions=False) as api:
        with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
            key = create_key(session, "alice").key
        refused = assert_error(api.get("/metrics", headers={"Authorization": f"Bearer {key}"}), 403, "forbidden")
        assert "QAAS_METRICS_TOKEN" in refused["message"]


def test_request_ids_are_echoed_and_passed_on_to_the_job(client: TestClient, tmp_path: Path) -> None:
    given = client.get("/v1/jobs", headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    made = client.get("/v1/jobs").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/v1/jobs").headers["x-request-id"]
    assert client.get("/v1/jobs", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != (
        "bad id\twith spaces"
    )
    assert client.get("/nowhere", headers={"X-Request-ID": "trace-43"}).headers["x-request-id"] == "trace-43"
    done = finished_job(client, tmp_path)
    job = client.post(
        "/v1/jobs",
        json={"model_id": done["model"]["id"], "recipe": {"mode": "dynamic"}},
        headers={"X-Request-ID": "r-7"},
    ).json()
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        row = session.get(Job, job["id"])
        assert row is not None and row.request_id == "r-7"


def test_json_log_lines_carry_the_context(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("info", "json")
        log = logging.getLogger("qaas.test")
        with logs.bound(request_id="req-1", tenant="acme"), logs.bound(job_id="j-1", attempt=2):
            log.info("started %s", "it")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert lines[0]["message"] == "started it" and lines[0]["level"] == "info" and lines[0]["logger"] == "qaas.test"
    assert (lines[0]["request_id"], lines[0]["tenant"], lines[0]["job_id"], lines[0]["attempt"]) == (
        "req-1",
        "acme",
        "j-1",
        2,
    )
    assert "request_id" not in lines[1] and "ValueError: boom" in lines[1]["exception"]
