"""`POST /v1/jobs` takes the recipe's `fidelity` per output (CONTRACT v3: a `kind` and its parameters, at the
top level or per output), echoes it on the job, and refuses a bad one with 422 `invalid_recipe` naming the
field as the request body does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.output_kind_models import detector_images, row_detector
from tests.service.helpers import assert_error, npz_bytes, upload_dataset, upload_model


@pytest.fixture
def detector_job(client: TestClient, tmp_path: Path) -> dict[str, Any]:
    model = upload_model(client, row_detector(tmp_path / "detector.onnx"))
    dataset = upload_dataset(client, npz_bytes(image=detector_images(4)))
    return {"model_id": model["id"], "calibration_dataset_id": dataset["id"]}


def test_the_fidelity_kind_and_its_parameters_are_accepted_and_echoed(
    client: TestClient, detector_job: dict[str, Any]
) -> None:
    fidelity = {
        "kind": "detection",
        "min": 0.95,
        "detection": {"score_threshold": 0.25, "class_columns": [5, 6], "layout": "rows"},
        "per_output": {"detections": {"metric": "agreement", "min": 0.9}},
    }
    response = client.post("/v1/jobs", json={**detector_job, "recipe": {"mode": "auto", "fidelity": fidelity}})
    assert response.status_code == 202, response.text
    echoed = response.json()["recipe"]["fidelity"]
    assert echoed["kind"] == "detection" and echoed["min"] == 0.95
    assert echoed["detection"] == {
        "score_threshold": 0.25,
        "iou_threshold": 0.5,
        "layout": "rows",
        "box_columns": [0, 1, 2, 3],
        "box_format": "cxcywh",
        "objectness_column": "auto",
        "class_columns": [5, 6],
        "class_id_column": None,
    }
    assert echoed["per_output"] == {
        "detections": {"kind": "auto", "metric": "agreement", "min": 0.9, "detection": None}
    }


REFUSED = [
    ({"kind": "boxes"}, "recipe.fidelity.kind"),
    ({"kind": "detection", "detection": {"score_threshold": 1.5}}, "recipe.fidelity.detection.score_threshold"),
    ({"detection": {"box_columns": [0, 0, 1, 2]}}, "recipe.fidelity.detection.box_columns"),
    ({"detection": {"class_columns": "all"}}, "recipe.fidelity.detection.class_columns"),
    ({"kind": "embedding", "detection": {}}, "recipe.fidelity.detection"),
    ({"metric": "cosine", "min": 20}, "recipe.fidelity.min"),  # it said recipe.fidelity.fidelity.min
    ({"per_output": {"detections": {"kind": "boxes"}}}, "recipe.fidelity.per_output.detections.kind"),
    ({"per_output": {"detections": {"min": 2}}}, "recipe.fidelity.per_output.detections.min"),
    ({"per_output": {"boxes": {"kind": "detection"}}}, "recipe.fidelity.per_output"),  # no such output
]


def test_a_bad_fidelity_field_answers_422_naming_it(client: TestClient, detector_job: dict[str, Any]) -> None:
    for fidelity, field in REFUSED:
        response = client.post("/v1/jobs", json={**detector_job, "recipe": {"mode": "auto", "fidelity": fidelity}})
        error = assert_error(response, 422, "invalid_recipe")
        assert error["detail"]["field"] == field, (fidelity, error)
