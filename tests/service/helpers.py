"""Helpers for API tests: build upload payloads from tiny in-code models and arrays, and rows to point at."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service.database import transaction, utcnow
from service.storage import Storage
from service.storage.s3 import S3Storage
from service.tables import Artifact, OnnxModel
from tests.onnx_models import conv_classifier, matmul_mlp


def model_row(prefix: str = "models/x", external: Sequence[str] = (), deleted: bool = False) -> OnnxModel:
    """A model's row whose files live under `prefix` (`model.onnx` and the `external` data files)."""
    return OnnxModel(
        name="m",
        storage_prefix=prefix,
        file_name="model.onnx",
        sha256="0" * 64,
        size_bytes=1,
        ir_version=8,
        opset=13,
        producer="t",
        inputs=[],
        outputs=[],
        op_counts={},
        external_data=[{"name": name, "size_bytes": 1, "sha256": "0" * 64} for name in external],
        deleted_at=utcnow() if deleted else None,
    )


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload_model(client: TestClient, path: Path, name: str | None = None) -> dict[str, Any]:
    data = {"name": name} if name else {}
    response = client.post("/v1/models", files={"file": (path.name, path.read_bytes())}, data=data)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def upload_dataset(client: TestClient, content: bytes, filename: str = "calib.npz") -> dict[str, Any]:
    response = client.post("/v1/datasets", files={"file": (filename, content)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def store_artifact(
    client: TestClient,
    job_id: str,
    content: bytes,
    tmp_path: Path,
    *,
    name: str = "quantized.onnx",
    media_type: str = "application/octet-stream",
) -> Path:
    """Store `content` as the job's (attempt 1) artifact `name` with its row, as a worker would; the
    stored file's path when the storage is the local folder."""
    storage: Storage = client.app.state.storage  # type: ignore[attr-defined]
    src = tmp_path / f"{job_id}-{name}"
    src.write_bytes(content)
    stored = storage.put_file(f"jobs/{job_id}/1/{name}", src)
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        session.add(
            Artifact(
                job_id=job_id,
                name=name,
                storage_key=stored.key,
                size_bytes=stored.size_bytes,
                sha256=stored.sha256,
                media_type=media_type,
            )
        )
    return client.app.state.settings.resolved_storage_dir / stored.key  # type: ignore[attr-defined,no-any-return]


def conv_model_and_data(client: TestClient, tmp_path: Path, n: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    model = upload_model(client, conv_classifier(tmp_path / "conv.onnx"))
    samples = np.random.default_rng(0).random((n, 1, 3, 8, 8), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % 4
    dataset = upload_dataset(client, npz_bytes(input=samples, __labels__=labels))
    return model, dataset


def mlp_model(client: TestClient, tmp_path: Path) -> dict[str, Any]:
    return upload_model(client, matmul_mlp(tmp_path / "mlp.onnx"))


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"].strip(), body
    assert isinstance(body["error"]["detail"], dict)
    error: dict[str, Any] = body["error"]
    return error


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def leftovers(client: TestClient, *prefixes: str) -> list[str]:
    """Every stored object under the prefixes, and every unfinished S3 upload or local temporary file."""
    storage = client.app.state.storage  # type: ignore[attr-defined]
    found = [key for prefix in prefixes for key in storage.keys(prefix)]
    if isinstance(storage, S3Storage):
        found += [
            f"unfinished:{u['Key']}"
            for u in storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
        ]
    else:
        found += [f"tmp:{p.name}" for p in files_under(storage.tmp)]
    return found
