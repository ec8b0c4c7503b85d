from __future__ import annotations

from fastapi.testclient import TestClient

from tests.service.helpers import assert_error


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert {name: c["ok"] for name, c in ready.json()["checks"].items()} == {
        "database": True,
        "broker": True,
        "storage": True,
    }


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'qaas_jobs{status="queued"} 0' in text
    assert "qaas_http_requests_total{" in text
    assert "qaas_database_up 1" in text


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/v1/models"), 405, "method_not_allowed")


def test_malformed_json_is_a_validation_error(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_every_operation_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"
    create = spec["paths"]["/v1/jobs"]["post"]
    assert "Idempotency-Key" in str(create["parameters"]) or "idempotency-key" in str(create["parameters"])
    assert "examples" in str(spec["components"]["schemas"]["JobCreate"])
    assert client.get("/docs").status_code == 200
