"""Inodes count: a model upload stores only the external-data files the model references, at most
1,000 files per upload, and each stored file is charged a per-file overhead against the quota."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.service import MAX_FILES_PER_UPLOAD
from service.quotas import FILE_OVERHEAD_BYTES
from service.settings import Settings
from service.storage import LocalStorage, ObjectWriter
from tests.security import hostile as h
from tests.service.helpers import assert_error, npz_bytes

MODEL = h.external_data_model("w.bin")
WEIGHTS = h.weights()


def weights_zip(extra_files: int) -> bytes:
    """The model's weights plus `extra_files` empty files it never reads."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.bin", WEIGHTS)
        for i in range(extra_files):
            zf.writestr(f"empty{i}.bin", b"")
    return buf.getvalue()


def stored_files(settings: Settings) -> list[str]:
    root = settings.resolved_storage_dir / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_zip_of_thousands_of_empty_files_is_refused(client: TestClient, app_settings: Settings) -> None:
    archive = weights_zip(5000)
    assert len(archive) < 1 << 20  # a few hundred KB that used to become 5,001 stored files
    response = client.post("/v1/models", files=[("file", ("m.onnx", MODEL)), ("external_data", ("w.zip", archive))])
    error = assert_error(response, 413, "payload_too_large")
    assert "1000" in error["message"]
    assert stored_files(app_settings) == []


def test_only_the_referenced_external_data_is_stored(client: TestClient, app_settings: Settings) -> None:
    response = client.post(
        "/v1/models",
        files=[
            ("file", ("m.onnx", MODEL)),
            ("external_data", ("w.zip", weights_zip(20))),
            ("external_data", ("notes.txt", b"never read by the model")),
        ],
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert [e["name"] for e in body["external_data"]] == ["w.bin"]
    assert body["size_bytes"] == len(MODEL) + len(WEIGHTS)
    assert stored_files(app_settings) == [f"{body['id']}/model.onnx", f"{body['id']}/w.bin"]


@pytest.mark.parametrize(("room", "status"), [(2 * FILE_OVERHEAD_BYTES - 1, 413), (2 * FILE_OVERHEAD_BYTES, 201)])
def test_each_stored_file_is_charged_a_per_file_overhead(sqlite_settings: Settings, room: int, status: int) -> None:
    size = len(MODEL) + len(WEIGHTS)
    settings = sqlite_settings.model_copy(update={"quota_storage_bytes": size + room})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/models", files=[("file", ("m.onnx", MODEL)), ("external_data", ("w.bin", WEIGHTS))])
    assert response.status_code == status, response.text
    if status == 413:
        error = assert_error(response, 413, "quota_exceeded")
        assert error["detail"]["incoming_bytes"] == size + 2 * FILE_OVERHEAD_BYTES
        assert stored_files(settings) == []


def test_file_count_cap_holds_across_several_parts(client: TestClient, app_settings: Settings, tmp_path: Path) -> None:
    """999 files in a zip plus the model is the cap: one more plain part is refused."""
    response = client.post(
        "/v1/models",
        files=[
            ("file", ("m.onnx", MODEL)),
            ("external_data", ("w.zip", weights_zip(998))),
            ("external_data", ("one-too-many.bin", b"x")),
        ],
    )
    assert_error(response, 413, "payload_too_large")
    assert stored_files(app_settings) == []


def test_file_parts_over_the_cap_are_refused_before_they_are_stored(
    client: TestClient, app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """External data goes into storage while the body is read: the cap must hold there, not only once
    the whole form is in (1,500 one-byte parts used to be 1,500 stored files until the answer)."""
    opened: list[str] = []
    real = LocalStorage.writer

    def counted(self: LocalStorage, key: str) -> ObjectWriter:
        opened.append(key)
        return real(self, key)

    monkeypatch.setattr(LocalStorage, "writer", counted)
    parts = [("file", ("m.onnx", MODEL))] + [("external_data", (f"e{i}.bin", b"x")) for i in range(1500)]
    error = assert_error(client.post("/v1/models", files=parts), 413, "payload_too_large")
    assert str(MAX_FILES_PER_UPLOAD) in error["message"]
    assert len(opened) < MAX_FILES_PER_UPLOAD
    assert stored_files(app_settings) == []


def test_a_dataset_form_of_thousands_of_file_parts_is_refused(client: TestClient) -> None:
    """The parts a dataset upload ignores are still written to the API's disk while the body is read."""
    parts = [("file", ("d.npz", npz_bytes(x=np.zeros((2, 3), np.float32))))]
    parts += [("junk", (f"j{i}.bin", b"x")) for i in range(MAX_FILES_PER_UPLOAD + 1)]
    assert_error(client.post("/v1/datasets", files=parts), 413, "payload_too_large")


def test_the_text_fields_of_a_form_are_capped_in_all(client: TestClient) -> None:
    """Each text field is held in memory (at most 64 KiB each): many distinct ones must not add up to
    the body's whole size."""
    fields = {f"field{i}": "x" * (64 << 10) for i in range(20)}  # 1.25 MiB of text
    response = client.post(
        "/v1/datasets", files={"file": ("d.npz", npz_bytes(x=np.zeros((2, 3), np.float32)))}, data=fields
    )
    error = assert_error(response, 413, "payload_too_large")
    assert "text fields" in error["message"]
