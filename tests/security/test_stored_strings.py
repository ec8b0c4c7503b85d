"""No file in storage without its row: every string a client (or a model) puts into a row is checked
or trimmed before anything is stored, and a transaction that rolls back takes the stored files with
it. On PostgreSQL, whose String(255) columns refuse longer text (SQLite would store it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.settings import Settings
from tests.onnx_models import conv_classifier
from tests.security import hostile as h
from tests.service.helpers import assert_error, npz_bytes

LONG = "n" * 3000


@pytest.fixture
def app_settings(postgres_settings: Settings) -> Settings:
    return postgres_settings


def stored(settings: Settings) -> list[Path]:
    root = settings.resolved_storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts)


def assert_nothing_left(settings: Settings) -> None:
    assert stored(settings) == []
    staging = settings.resolved_data_dir / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def model_bytes(tmp_path: Path, producer: str = "qaas-tests") -> bytes:
    model = onnx.load(str(conv_classifier(tmp_path / "m.onnx")))
    model.producer_name = producer
    return bytes(model.SerializeToString())


def data_bytes() -> bytes:
    return npz_bytes(input=np.zeros((2, 1, 3, 8, 8), np.float32))


@pytest.mark.parametrize("where", ["model file name", "model producer", "dataset file name"])
def test_3000_character_names_are_trimmed_not_a_500(
    client: TestClient, app_settings: Settings, tmp_path: Path, where: str
) -> None:
    if where == "model file name":
        response = client.post("/v1/models", files={"file": (f"{LONG}.onnx", model_bytes(tmp_path))})
    elif where == "model producer":
        response = client.post("/v1/models", files={"file": ("m.onnx", model_bytes(tmp_path, producer=LONG))})
    else:
        response = client.post("/v1/datasets", files={"file": (f"{LONG}.npz", data_bytes())})
    assert response.status_code == 201, response.text
    body = response.json()
    field = "producer" if where == "model producer" else "name"
    assert body[field] == LONG[:255]
    assert len(stored(app_settings)) == 1


@pytest.mark.parametrize("where", ["model producer", "model name", "dataset name"])
def test_a_nul_character_is_not_a_500(client: TestClient, app_settings: Settings, tmp_path: Path, where: str) -> None:
    """PostgreSQL text refuses NUL; SQLite stores it. The character is replaced, like undecodable bytes."""
    hostile = "before\x00after"
    if where == "model producer":
        response = client.post("/v1/models", files={"file": ("m.onnx", model_bytes(tmp_path, producer=hostile))})
    elif where == "model name":
        response = client.post("/v1/models", files={"file": ("m.onnx", model_bytes(tmp_path))}, data={"name": hostile})
    else:
        response = client.post("/v1/datasets", files={"file": ("d.npz", data_bytes())}, data={"name": hostile})
    assert response.status_code == 201, response.text
    assert response.json()["producer" if where == "model producer" else "name"] == "before\ufffdafter"
    assert len(stored(app_settings)) == 1


def test_a_3000_character_external_data_name_is_refused_and_nothing_is_stored(
    client: TestClient, app_settings: Settings
) -> None:
    response = client.post(
        "/v1/models",
        files=[("file", ("m.onnx", h.external_data_model("w.bin"))), ("external_data", (LONG, h.weights()))],
    )
    error = assert_error(response, 422, "invalid_model")
    assert "255 bytes" in error["message"]
    assert_nothing_left(app_settings)


@pytest.mark.parametrize("upload", ["model", "dataset"])
def test_stored_files_go_when_the_transaction_rolls_back(
    client: TestClient, app_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upload: str
) -> None:
    """The files are stored, then the commit fails (the database went away): 503, and no orphans."""

    def lost(self: Session) -> Any:
        raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))

    monkeypatch.setattr(Session, "commit", lost)
    if upload == "model":
        response = client.post("/v1/models", files={"file": ("m.onnx", model_bytes(tmp_path))})
    else:
        response = client.post("/v1/datasets", files={"file": ("d.npz", data_bytes())})
    assert_error(response, 503, "unavailable")
    assert_nothing_left(app_settings)
