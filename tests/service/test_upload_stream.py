"""Uploads are parsed in one pass (service/upload_stream.py), never spooled by Starlette: the model
into staging, external data straight into storage (a .zip of it read there, its files streamed out)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.formparsers import MultiPartParser

import service.models.service as models_service
from service.inspection.model import ModelInfo, ModelLimits
from service.storage.s3 import S3Storage
from tests.onnx_models import matmul_mlp
from tests.s3 import S3Server
from tests.security import hostile as h
from tests.service.helpers import assert_error, files_under, leftovers
from tests.worker.engine.pitfall_models import external_data_mlp


def test_uploads_never_go_through_starlettes_spooling_parser(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def spooled(self: MultiPartParser) -> None:
        raise AssertionError("the upload was spooled by Starlette")

    monkeypatch.setattr(MultiPartParser, "parse", spooled)
    model = matmul_mlp(tmp_path / "m.onnx", features=256, hidden=1024)  # ~1 MB: crosses a parse batch
    data = model.read_bytes()
    answer = client.post("/v1/models", files={"file": ("m.onnx", data)}, data={"name": "streamed"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["sha256"] == hashlib.sha256(data).hexdigest() and answer.json()["name"] == "streamed"
    assert client.get(f"/v1/models/{answer.json()['id']}/file").content == data
    staging = Path(client.app.state.settings.resolved_data_dir) / "staging"  # type: ignore[attr-defined]
    assert not any(staging.iterdir())


def test_bodies_that_are_not_a_usable_form_answer_422(client: TestClient) -> None:
    error = assert_error(client.post("/v1/models", json={"file": "x"}), 422, "invalid_request")
    assert "file" in error["message"]
    missing = client.post("/v1/datasets", files={"other": ("d.npz", b"123")})
    assert "file" in assert_error(missing, 422, "invalid_request")["message"]
    long_name = client.post("/v1/datasets", files={"file": ("d.npz", b"123")}, data={"name": "n" * 256})
    assert "name" in assert_error(long_name, 422, "invalid_request")["message"]
    cut = client.post(
        "/v1/models",
        content=b"--b\r\nContent-Disposition: form-data; name=file; filename=m.onnx\r\n\r\nabc",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert "malformed" in assert_error(cut, 422, "invalid_request")["message"]


def test_external_data_goes_straight_to_the_object_store(
    s3_client: TestClient, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = external_data_mlp(tmp_path / "w.onnx", features=512, hidden=3072)  # 12.6 MB of weights
    data = (tmp_path / "w.onnx.data").read_bytes()
    seen: dict[str, int] = {}
    real = models_service.inspect_model

    def inspect(path: Path, limits: ModelLimits) -> ModelInfo:
        stat = (path.parent / "w.onnx.data").stat()
        seen.update(size=stat.st_size, on_disk=stat.st_blocks * 512)
        return real(path, limits)

    monkeypatch.setattr(models_service, "inspect_model", inspect)
    answer = s3_client.post(
        "/v1/models", files=[("file", ("w.onnx", model.read_bytes())), ("external_data", ("w.onnx.data", data))]
    )
    assert answer.status_code == 201, answer.text
    # The API checked the weights by their size, without holding their bytes on its disk.
    assert seen["size"] == len(data) and seen["on_disk"] < len(data) // 100
    stored = answer.json()
    bucket = s3_env["QAAS_STORAGE_URL"].split("/")[2]
    keys = s3_server.object_keys(bucket)
    assert f"qaas/models/{stored['id']}/w.onnx.data" in keys
    assert not [k for k in keys if k.startswith("qaas/uploads/")] and s3_server.unfinished_uploads(bucket) == []
    storage = s3_client.app.state.storage  # type: ignore[attr-defined]
    body = b"".join(storage.iter_bytes(f"models/{stored['id']}/w.onnx.data"))
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_request_cut_inside_external_data_aborts_its_multipart_upload(
    s3_client: TestClient, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    model = matmul_mlp(tmp_path / "m.onnx").read_bytes()
    head = (
        b"--b\r\nContent-Disposition: form-data; name=file; filename=m.onnx\r\n\r\n" + model + b"\r\n"
        b"--b\r\nContent-Disposition: form-data; name=external_data; filename=w.bin\r\n\r\n"
    )
    cut = s3_client.post(
        "/v1/models",
        content=head + b"\0" * (12 << 20),  # two parts sent, then the body ends
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error(cut, 422, "invalid_request")
    bucket = s3_env["QAAS_STORAGE_URL"].split("/")[2]
    assert s3_server.unfinished_uploads(bucket) == [] and s3_server.object_keys(bucket) == []


def test_external_data_sent_straight_to_storage_is_kept_only_for_a_model_that_reads_it(
    s3_client: TestClient, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    model = external_data_mlp(tmp_path / "w.onnx").read_bytes()
    data = (tmp_path / "w.onnx.data").read_bytes()
    bucket = s3_env["QAAS_STORAGE_URL"].split("/")[2]
    refused = s3_client.post(
        "/v1/models", files=[("file", ("w.onnx", b"not onnx")), ("external_data", ("w.onnx.data", data))]
    )
    assert_error(refused, 422, "invalid_model")
    assert s3_server.object_keys(bucket) == []
    extra = s3_client.post(
        "/v1/models",
        files=[
            ("file", ("w.onnx", model)),
            ("external_data", ("w.onnx.data", data)),
            ("external_data", ("unused.bin", b"\1" * 1000)),
        ],
    )
    assert extra.status_code == 201, extra.text
    assert [e["name"] for e in extra.json()["external_data"]] == ["w.onnx.data"]
    model_id = extra.json()["id"]
    assert s3_server.object_keys(bucket) == [
        f"qaas/models/{model_id}/model.onnx",
        f"qaas/models/{model_id}/w.onnx.data",
    ]


def test_zipped_external_data_is_read_where_it_is_stored_and_its_files_streamed_into_storage(
    on_storage: TestClient, private_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = external_data_mlp(tmp_path / "w.onnx", features=512, hidden=3072)  # 12.6 MB of weights
    data = (tmp_path / "w.onnx.data").read_bytes()
    archive = h.members_zip({"weights/w.onnx.data": data, "README.txt": b"unused"}, zipfile.ZIP_DEFLATED)
    settings = on_storage.app.state.settings  # type: ignore[attr-defined]
    seen: dict[str, Any] = {}
    real = models_service.inspect_model

    def inspect(path: Path, limits: ModelLimits) -> ModelInfo:
        # The peak: the archive stored, its files taken out of it into storage.
        weights = (path.parent / "w.onnx.data").stat()
        seen.update(size=weights.st_size, on_disk=weights.st_blocks * 512, tmp=files_under(private_tmp))
        seen["local copies"] = [
            p
            for p in files_under(settings.resolved_data_dir)
            if p.stat().st_blocks * 512 >= len(archive) // 2 and not p.name.startswith("qaas.db")
        ]
        return real(path, limits)

    monkeypatch.setattr(models_service, "inspect_model", inspect)
    answer = on_storage.post(
        "/v1/models", files=[("file", ("w.onnx", model.read_bytes())), ("external_data", ("w.zip", archive))]
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    # The model's checks saw the file's size, without its bytes on the API's disk.
    assert seen["size"] == len(data) and seen["on_disk"] < len(data) // 100 and seen["tmp"] == []
    storage = on_storage.app.state.storage  # type: ignore[attr-defined]
    if isinstance(storage, S3Storage):
        assert seen["local copies"] == []
    else:  # on the local folder, the stored copy and nothing else
        assert [p.relative_to(storage.root).as_posix() for p in seen["local copies"]] == [
            f"models/{body['id']}/w.onnx.data"
        ]
    assert body["external_data"] == [
        {"name": "w.onnx.data", "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ]
    assert sorted(leftovers(on_storage, "models/", "uploads/")) == [
        f"models/{body['id']}/model.onnx",
        f"models/{body['id']}/w.onnx.data",  # README.txt, which the model does not read, is gone
    ]
    stored = b"".join(storage.iter_bytes(f"models/{body['id']}/w.onnx.data"))
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("too many files", (413, "payload_too_large")),
        ("a zip bomb", (413, "payload_too_large")),
        ("a file also sent plain", (422, "invalid_model")),
        ("not the file the model reads", (422, "external_data_escape")),
        ("not a zip", (422, "invalid_model")),
    ],
)
def test_refused_zipped_external_data_leaves_nothing_in_storage(
    on_storage: TestClient, name: str, refusal: tuple[int, str]
) -> None:
    weights = h.weights()
    files = [("file", ("m.onnx", h.external_data_model("w.bin")))]
    if name == "too many files":
        files.append(("external_data", ("w.zip", h.members_zip({f"f{i}.bin": b"" for i in range(1001)}))))
    elif name == "a zip bomb":
        files.append(("external_data", ("w.zip", h.members_zip({"w.bin": b"\0" * (64 << 20)}, zipfile.ZIP_DEFLATED))))
    elif name == "a file also sent plain":
        files += [
            ("external_data", ("w.bin", weights)),
            ("external_data", ("w.zip", h.members_zip({"w.bin": weights}))),
        ]
    elif name == "not the file the model reads":
        files.append(("external_data", ("w.zip", h.members_zip({"other.bin": weights}))))
    else:
        files.append(("external_data", ("w.zip", b"PK\x03\x04 but no zip" * 1000)))
    assert_error(on_storage.post("/v1/models", files=files), *refusal)
    assert leftovers(on_storage, "models/", "uploads/") == []
    assert on_storage.get("/v1/models").json()["items"] == []
