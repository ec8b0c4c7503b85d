"""The OpenAPI document tells the truth: operation ids, every error documented in the contract's
shape, a typed job result, examples; and the docs pages need nothing from outside the service."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.openapi_check import ResponseChecker


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def _operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {
        op["operationId"]: (method.upper(), path, op)
        for path, methods in spec["paths"].items()
        for method, op in methods.items()
    }


def test_operation_ids_read_like_functions(spec: dict[str, Any]) -> None:
    ops = _operations(spec)
    assert sum(len(m) for m in spec["paths"].values()) == len(ops)  # unique
    assert ops["create_job"][:2] == ("POST", "/v1/jobs")
    assert ops["get_job"][:2] == ("GET", "/v1/jobs/{job_id}")
    assert ops["delete_job"][:2] == ("DELETE", "/v1/jobs/{job_id}")
    assert ops["job_events"][:2] == ("GET", "/v1/jobs/{job_id}/events")
    assert ops["upload_model"][:2] == ("POST", "/v1/models")
    assert ops["get_usage"][:2] == ("GET", "/v1/usage")
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", op_id) for op_id in ops), sorted(ops)


def test_every_error_is_documented_in_the_error_shape(spec: dict[str, Any]) -> None:
    for op_id, (_, path, op) in _operations(spec).items():
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and not (op_id == "readyz" and status == "503"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (op_id, status)
        if path.startswith("/v1/"):
            assert {"401", "429", "503"} <= set(op["responses"]), (op_id, sorted(op["responses"]))
    ops = _operations(spec)
    assert {"404", "409", "413", "422"} <= set(ops["create_job"][2]["responses"])
    assert {"413", "422"} <= set(ops["upload_model"][2]["responses"])
    assert {"413", "422"} <= set(ops["upload_dataset"][2]["responses"])
    assert "409" in ops["delete_job"][2]["responses"] and "409" in ops["delete_model"][2]["responses"]
    assert {"401", "403"} <= set(ops["metrics"][2]["responses"])
    for op_id in ("list_models", "list_datasets", "list_jobs", "create_job"):  # a bad cursor, an unreadable body
        assert "400" in ops[op_id][2]["responses"], op_id
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # 422 is our shape, not FastAPI's


def test_the_job_result_is_typed(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]

    def props(name: str) -> dict[str, Any]:
        found: dict[str, Any] = schemas[name]["properties"]
        return found

    assert {"original", "quantized", "comparison", "warnings", "machine", "quantization"} <= set(props("JobResult"))
    assert {"cosine", "sqnr_db", "max_abs_error", "mean_abs_error", "top1_agreement"} <= set(props("OutputFidelity"))
    assert {"metric", "original", "quantized", "delta"} <= set(props("AccuracyComparison"))
    assert {"p50", "p90", "p99"} <= set(props("LatencyStats"))
    assert {"cpu_model", "cpu_features", "int8_acceleration", "onnxruntime"} <= set(props("Machine"))
    assert {"verdict", "chosen", "effective_recipe", "candidates", "steps"} <= set(props("AutoSearch"))
    trial = {"name", "stage", "recipe", "p50_ms", "speedup", "size_bytes", "fidelity", "accuracy_drop", "within_budget"}
    assert trial | {"error"} <= set(props("AutoTrial"))
    assert {"progress_note", "candidate"} <= set(props("JobOut")) and {"index", "total", "name"} <= set(
        props("CandidateProgress")
    )
    assert schemas["JobResult"].get("additionalProperties", True) is True  # new engine facts do not break clients


def test_examples_for_the_recipe_and_the_preprocess_spec(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["examples"]
    assert {"static", "auto", "dynamic", "weight_only", "fp16"} <= set(examples)
    assert all("recipe" in e["value"] for e in examples.values())
    assert spec["components"]["schemas"]["Recipe"]["examples"]
    form = spec["components"]["schemas"]["Body_upload_dataset"]["properties"]["preprocess"]
    assert any('"layout": "NCHW"' in example for example in form["examples"])


def test_the_checker_catches_an_undocumented_status_and_a_wrong_body(spec: dict[str, Any]) -> None:
    checker = ResponseChecker(spec)
    request = httpx.Request("GET", "http://test/v1/jobs/abc")
    good = {"error": {"code": "not_found", "message": "No job.", "detail": {}}}
    checker(httpx.Response(404, json=good, request=request))
    with pytest.raises(AssertionError, match="does not match its schema"):
        checker(httpx.Response(404, json={"detail": "Not Found"}, request=request))
    with pytest.raises(AssertionError, match="does not document"):
        checker(httpx.Response(418, json=good, request=request))
    with pytest.raises(AssertionError, match="does not match its schema"):
        checker(httpx.Response(200, json={"id": "abc", "status": "exploded"}, request=request))


def test_a_request_that_cannot_be_read_answers_a_documented_400_that_says_what_to_fix(
    client: TestClient, spec: dict[str, Any]
) -> None:
    checker = ResponseChecker(spec)
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        bad_cursor = client.get(path, params={"cursor": "null"})
        checker(bad_cursor)
        assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["code"] == "invalid_request"
        assert "next_cursor" in bad_cursor.json()["error"]["message"]
    latin1 = '{"model_id": "caf\xe9"}'.encode("latin-1")
    unreadable = client.post("/v1/jobs", content=latin1, headers={"content-type": "application/json"})
    checker(unreadable)
    assert unreadable.status_code == 400, unreadable.text
    assert "not UTF-8" in unreadable.json()["error"]["message"], unreadable.text
    assert checker.checked == 4


def test_docs_pages_load_nothing_from_outside(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
        assert urls, html
        assert all(u.startswith("/") for u in urls), (page, urls)
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200, url
        assert "cdn" not in html.lower()
    assert len(client.get("/static-offline-docs/swagger-ui-bundle.js").content) > 500_000
