from __future__ import annotations

import hashlib
import io

import numpy as np
from fastapi.testclient import TestClient

from tests.service.helpers import assert_error, npz_bytes, upload_dataset


def test_npz_upload_describes_the_arrays(client: TestClient) -> None:
    content = npz_bytes(input=np.zeros((6, 1, 3, 8, 8), np.float32), __labels__=np.arange(6, dtype=np.int64))
    body = upload_dataset(client, content, "calib.npz")
    assert body["format"] == "npz"
    assert body["name"] == "calib"
    assert body["num_samples"] == 6
    assert body["has_labels"] is True
    assert body["tensors"]["input"] == {"dtype": "float32", "shape": [6, 1, 3, 8, 8]}
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["size_bytes"] == len(content)
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [body["id"]]


def test_npy_upload(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 16), np.float32))
    body = upload_dataset(client, buf.getvalue(), "x.npy")
    assert body["format"] == "npy"
    assert body["num_samples"] == 4
    assert body["has_labels"] is False


def test_pickled_arrays_are_refused(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    response = client.post("/v1/datasets", files={"file": ("evil.npy", buf.getvalue())})
    assert_error(response, 422, "invalid_dataset")
    assert client.get("/v1/datasets").json()["items"] == []


def test_garbage_is_refused_with_a_reason(client: TestClient) -> None:
    error = assert_error(client.post("/v1/datasets", files={"file": ("x.npz", b"hello")}), 422, "invalid_dataset")
    assert error["message"].endswith(".")


def test_delete(client: TestClient) -> None:
    body = upload_dataset(client, npz_bytes(x=np.zeros((2, 3), np.float32)))
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert_error(client.get(f"/v1/datasets/{body['id']}"), 404, "not_found")
