from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.database import transaction
from service.jobs import state
from service.queue import QUEUE, RUN_JOB_TASK
from service.settings import Settings
from service.tables import Job
from tests.service.helpers import assert_error, conv_model_and_data, mlp_model, npz_bytes, upload_dataset


def _job(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/jobs", json=body)


def test_static_job_is_queued_with_defaults(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    response = _job(client, model_id=model["id"], calibration_dataset_id=dataset["id"], recipe={"mode": "static"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["stage"] == "queued" and job["progress"] == 0
    assert job["attempts"] == 0 and job["result"] is None and job["error"] is None
    assert job["evaluation_dataset_id"] == dataset["id"]  # defaults to the calibration data
    assert job["recipe"]["format"] == "qdq" and job["recipe"]["weight_type"] == "int8"
    assert job["recipe"]["calibration_method"] == "minmax"
    assert job["evaluation"]["latency_runs"] == 50
    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    listed = client.get("/v1/jobs", params={"status": "queued", "model_id": model["id"]}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"status": "failed"}).json()["items"] == []


def _queued_messages(settings: Settings) -> list[str]:
    if settings.is_embedded:
        return [path.read_text() for path in (settings.broker_dir / "queue").iterdir()]
    client = redis.Redis.from_url(settings.resolved_broker_url)
    try:
        return [m.decode() for m in client.lrange(f"{settings.broker_key_prefix}{QUEUE}", 0, -1)]
    finally:
        client.close()


def test_the_job_message_reaches_the_broker(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's architecture: the queue message carries the job id only, and is sent after the
    commit (a worker that takes it at once finds the job)."""
    app_state = client.app.state  # type: ignore[attr-defined]
    settings = app_state.settings
    model, dataset = conv_model_and_data(client, tmp_path)
    committed: list[bool] = []
    send = app_state.queue.enqueue

    def enqueue(job_id: str, countdown: float = 0.0, queue: str | None = None) -> None:
        with app_state.session_factory() as other:  # another connection sees only what was committed
            committed.append(other.get(Job, job_id) is not None)
        send(job_id, countdown, queue)

    monkeypatch.setattr(app_state.queue, "enqueue", enqueue)
    job = _job(client, model_id=model["id"], calibration_dataset_id=dataset["id"]).json()
    assert committed == [True]
    messages = _queued_messages(settings)
    assert len(messages) == 1
    body = json.loads(messages[0])
    args, kwargs, _ = json.loads(base64.b64decode(body["body"]))
    assert (body["headers"]["task"], args, kwargs) == (RUN_JOB_TASK, [job["id"]], {})


def test_static_without_calibration_data_is_refused(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)
    error = assert_error(_job(client, model_id=model["id"], recipe={"mode": "static"}), 422, "invalid_recipe")
    assert "calibration" in error["message"]


def test_recipes_onnx_runtime_cannot_honour_are_refused(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    base = {"model_id": model["id"], "calibration_dataset_id": dataset["id"]}
    cases = [
        ({"format": "qoperator", "activation_type": "uint16"}, "qdq"),
        ({"mode": "dynamic", "weight_type": "int16"}, "int8"),
        ({"mode": "static", "weight_type": "int4"}, "weight_only"),
        ({"mode": "weight_only"}, "MatMul"),
        ({"nodes_to_exclude": ["conv", "no_such_node"]}, "no_such_node"),
        ({"op_types_to_quantize": ["LSTM"]}, "nothing would be quantized"),
        ({"calibration_method": "kl"}, "calibration_method"),
        ({"typo_field": True}, "typo_field"),
    ]
    for recipe, words in cases:
        error = assert_error(_job(client, **base, recipe=recipe), 422, "invalid_recipe")
        assert words in error["message"], (recipe, error)
    assert client.get("/v1/jobs").json()["items"] == []


def test_dataset_that_cannot_feed_the_model_is_refused(client: TestClient, tmp_path: Path) -> None:
    model, _ = conv_model_and_data(client, tmp_path)
    wrong = upload_dataset(client, npz_bytes(input=np.zeros((4, 1, 3, 5, 5), np.float32)))
    error = assert_error(
        _job(client, model_id=model["id"], calibration_dataset_id=wrong["id"]), 422, "dataset_model_mismatch"
    )
    assert "input" in error["message"]
    missing = upload_dataset(client, npz_bytes(other=np.zeros((4, 3), np.float32)))
    assert_error(
        _job(client, model_id=model["id"], calibration_dataset_id=missing["id"]),
        422,
        "dataset_model_mismatch",
    )


def test_unknown_ids_are_not_found(client: TestClient, tmp_path: Path) -> None:
    assert_error(_job(client, model_id="missing", recipe={"mode": "dynamic"}), 404, "not_found")
    model = mlp_model(client, tmp_path)
    assert_error(_job(client, model_id=model["id"], calibration_dataset_id="missing"), 404, "not_found")
    assert_error(client.get("/v1/jobs/missing"), 404, "not_found")
    assert_error(client.get("/v1/jobs/missing/artifacts"), 404, "not_found")


def test_idempotency_key_returns_the_same_job(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)
    body = {"model_id": model["id"], "recipe": {"mode": "dynamic"}}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/v1/jobs", json={**body, "recipe": {"mode": "fp16"}}, headers={"Idempotency-Key": "abc"})
    assert_error(other, 409, "conflict")
    third = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "def"})
    assert third.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs").json()["items"]) == 2


def test_cancel_a_queued_job(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)
    job = _job(client, model_id=model["id"], recipe={"mode": "dynamic"}).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict")


def test_report_waits_for_success(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)
    job = _job(client, model_id=model["id"], recipe={"mode": "dynamic"}).json()
    error = assert_error(client.get(f"/v1/jobs/{job['id']}/report"), 409, "conflict")
    assert "queued" in error["message"]
    page = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert job["id"] in page.text
    assert client.get(f"/v1/jobs/{job['id']}/artifacts").json() == []
    assert_error(client.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx"), 404, "not_found")


def test_report_html_of_a_result_from_an_older_version_is_not_a_500(client: TestClient, tmp_path: Path) -> None:
    """A stored result that no longer validates as JobResult is shown as stored, not refused."""
    model = mlp_model(client, tmp_path)
    job = _job(client, model_id=model["id"], recipe={"mode": "dynamic"}).json()
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        attempt = state.claim(session, job["id"], 60)
        assert attempt is not None and state.succeed(session, job["id"], attempt, {"original": {"size": 123456}})
    page = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert page.status_code == 200, page.text
    assert "The result, as stored" in page.text and "&quot;size&quot;: 123456" in page.text
    assert job["id"] in page.text and "dynamic" in page.text


def test_auto_and_compare_fields_are_validated_at_submission(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    base = {"model_id": model["id"], "calibration_dataset_id": dataset["id"]}
    cases = [
        ({"mode": "compare"}, "reference_model_id"),
        ({"mode": "static", "reference_model_id": model["id"]}, "only used by mode compare"),
        ({"mode": "auto", "fidelity": {"metric": "cosine", "min": 20}}, "between -1 and 1"),
        ({"mode": "auto", "fidelity": {"metric": "psnr"}}, "metric"),
        ({"mode": "dynamic", "sixteen_bit_tensors": ["conv_out"]}, "sixteen_bit_tensors"),
        ({"mode": "dynamic", "bias_correction": True}, "bias_correction"),
        ({"mode": "fp16", "calibration_per_tensor": True}, "calibration_per_tensor"),
        ({"mode": "auto", "max_search_seconds": 0}, "max_search_seconds"),
        ({"mode": "auto", "objective": "speed"}, "objective"),
    ]
    for recipe, words in cases:
        error = assert_error(_job(client, **base, recipe=recipe), 422, "invalid_recipe")
        assert words in error["message"], (recipe, error)
    recipe = {"mode": "auto", "objective": "size", "fidelity": {"outputs": ["logits"], "metric": "sqnr", "min": 25}}
    job = _job(client, **base, recipe=recipe).json()
    assert job["recipe"]["fidelity"] == {
        "outputs": ["logits"],
        "metric": "sqnr",
        "min": 25.0,
        "kind": "auto",  # CONTRACT v3: inferred from the graph and the data
        "detection": None,
        "per_output": None,
    }
    assert job["recipe"]["max_search_seconds"] == 900 and job["progress_note"] is None


def test_compare_needs_a_reference_with_the_same_inputs_and_outputs(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    other = mlp_model(client, tmp_path)
    base = {"model_id": model["id"], "calibration_dataset_id": dataset["id"]}
    for reference_id, said in (
        ("no-such-model", "names no model of yours"),
        (model["id"], "the model itself"),
        (other["id"], "cannot be compared"),
    ):
        refused = _job(client, **base, recipe={"mode": "compare", "reference_model_id": reference_id})
        error = assert_error(refused, 422, "invalid_recipe")
        assert said in error["message"] and error["detail"]["field"] == "recipe.reference_model_id", error
    reference, _ = conv_model_and_data(client, tmp_path)
    job = _job(client, **base, recipe={"mode": "compare", "reference_model_id": reference["id"]})
    assert job.status_code == 202 and job.json()["recipe"]["reference_model_id"] == reference["id"]
    # The queued job still needs its reference: deleting it now would fail the job later.
    error = assert_error(client.delete(f"/v1/models/{reference['id']}"), 409, "conflict")
    assert error["detail"]["job_id"] == job.json()["id"] and "reference" in error["message"]
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/models/{reference['id']}").status_code == 204


def test_results_of_earlier_auto_searches_still_read() -> None:
    from service.jobs.schemas import JobResult

    metrics = {"size_bytes": 10, "latency_ms": None}
    old = {
        "chosen": "dynamic int8",
        "recipe": {"mode": "dynamic"},
        "candidates": [{"name": "dynamic int8", "ok": True}],
    }
    result = JobResult.model_validate(
        {"original": metrics, "quantized": metrics, "comparison": {"size_ratio": 1.0}, "quantization": {"auto": old}}
    )
    assert result.quantization is not None and result.quantization.auto is not None
    assert result.quantization.auto.verdict is None and result.quantization.auto.candidates[0].name == "dynamic int8"
