from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from fastapi.testclient import TestClient

from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, conv_model_and_data, upload_model


def test_upload_describes_the_model(client: TestClient, tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "resnet-ish.onnx", opset=13)
    body = upload_model(client, path)
    assert body["name"] == "resnet-ish"
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["size_bytes"] == path.stat().st_size
    assert body["opset"] == 13 and body["ir_version"] == 8
    assert body["producer"].startswith("qaas-tests")
    assert body["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    assert body["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}]
    assert body["op_counts"] == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert body["quantization"] is None
    assert client.get(f"/v1/models/{body['id']}").json() == body


def test_download_returns_the_uploaded_bytes(client: TestClient, tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "m.onnx")
    body = upload_model(client, path)
    response = client.get(f"/v1/models/{body['id']}/file")
    assert response.status_code == 200
    assert response.content == path.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(response.content))


def test_list_pages_newest_first(client: TestClient, tmp_path: Path) -> None:
    ids = [upload_model(client, conv_classifier(tmp_path / f"m{i}.onnx", seed=i))["id"] for i in range(3)]
    first = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in first["items"]] == ids[::-1][:2]
    assert first["next_cursor"]
    second = client.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [m["id"] for m in second["items"]] == [ids[0]]
    assert second["next_cursor"] is None
    assert_error(client.get("/v1/models", params={"cursor": "garbage!"}), 400, "invalid_request")
    assert_error(client.get("/v1/models", params={"limit": 501}), 422, "invalid_request")


def test_garbage_upload_is_refused_with_a_reason(client: TestClient) -> None:
    error = assert_error(client.post("/v1/models", files={"file": ("x.onnx", b"not a model")}), 422, "invalid_model")
    assert "onnx" in error["message"].lower()
    assert client.get("/v1/models").json()["items"] == []


def test_missing_file_field_is_a_validation_error(client: TestClient) -> None:
    error = assert_error(client.post("/v1/models", data={"name": "x"}), 422, "invalid_request")
    assert error["detail"]["errors"][0]["field"] == "file"


def test_delete_removes_the_model_and_its_file(client: TestClient, tmp_path: Path) -> None:
    body = upload_model(client, conv_classifier(tmp_path / "m.onnx"))
    assert client.delete(f"/v1/models/{body['id']}").status_code == 204
    assert_error(client.get(f"/v1/models/{body['id']}"), 404, "not_found")
    assert_error(client.get(f"/v1/models/{body['id']}/file"), 404, "not_found")
    assert_error(client.delete(f"/v1/models/{body['id']}"), 404, "not_found")
    storage_dir = client.app.state.settings.resolved_storage_dir  # type: ignore[attr-defined]
    assert not (storage_dir / "models" / body["id"]).exists()


def test_delete_is_refused_while_a_job_is_queued(client: TestClient, tmp_path: Path) -> None:
    model, dataset = conv_model_and_data(client, tmp_path)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]})
    assert job.status_code == 202, job.text
    error = assert_error(client.delete(f"/v1/models/{model['id']}"), 409, "conflict")
    assert error["detail"]["job_id"] == job.json()["id"]
    assert_error(client.delete(f"/v1/datasets/{dataset['id']}"), 409, "conflict")
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    # The finished job keeps its history.
    assert client.get(f"/v1/jobs/{job.json()['id']}").json()["model_id"] == model["id"]


def test_unknown_model_is_not_found(client: TestClient) -> None:
    error = assert_error(client.get("/v1/models/nope"), 404, "not_found")
    assert "nope" in error["message"]


def test_external_data_is_stored_beside_the_model_with_its_hash(client: TestClient, tmp_path: Path) -> None:
    import io
    import zipfile

    from tests.worker.engine.pitfall_models import external_data_mlp

    path = external_data_mlp(tmp_path / "big.onnx")
    weights = tmp_path / "big.onnx.data"
    expected = {
        "name": weights.name,
        "size_bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(weights, weights.name)
    storage_dir = client.app.state.settings.resolved_storage_dir  # type: ignore[attr-defined]
    for extra in [(weights.name, weights.read_bytes()), ("weights.zip", archive.getvalue())]:
        response = client.post("/v1/models", files=[("file", (path.name, path.read_bytes())), ("external_data", extra)])
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["external_data"] == [expected]
        assert body["size_bytes"] == path.stat().st_size + expected["size_bytes"]
        stored = storage_dir / "models" / body["id"] / weights.name
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == expected["sha256"]
    missing = client.post("/v1/models", files={"file": (path.name, path.read_bytes())})
    assert missing.status_code == 422 and missing.json()["error"]["code"] in ("external_data_escape", "invalid_model")


def test_a_text_part_in_external_data_is_no_file(client: TestClient, tmp_path: Path) -> None:
    """What Swagger UI sends for the external-data field left empty: the word `string`, as text."""
    path = conv_classifier(tmp_path / "m.onnx")
    response = client.post(
        "/v1/models",
        files=[("file", ("m.onnx", path.read_bytes())), ("external_data", (None, "string"))],
        data={"name": ""},
    )
    assert response.status_code == 201, response.text
    assert response.json()["external_data"] == [] and response.json()["name"] == "m"
