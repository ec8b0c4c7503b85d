from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import service.datasets.service as datasets_service
from service.app import create_app
from service.settings import Settings
from service.storage.s3 import S3Storage
from tests.e2e.faults import TcpProxy
from tests.security.test_zip_directory import hand_made_zip
from tests.service.helpers import assert_error, files_under, leftovers, npz_bytes, upload_dataset


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


# -- the bytes go straight into storage and are inspected there ------------------------------------


def image_zip(n: int = 3) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            image = io.BytesIO()
            Image.new("RGB", (16, 12), (40 * i, 0, 0)).save(image, "PNG")
            zf.writestr(f"class{i % 2}/img{i}.png", image.getvalue())
    return buf.getvalue()


PREPROCESS = '{"input": "x", "size": [8, 8], "layout": "NCHW", "color": "RGB"}'


@pytest.mark.parametrize("kind", ["npz", "npy", "images"])
def test_a_dataset_goes_straight_into_storage_and_is_inspected_where_it_lies(
    on_storage: TestClient, private_tmp: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    rng = np.random.default_rng(0)
    samples = rng.random((1000, 3, 32, 32), dtype=np.float32)  # 12 MB: three S3 parts
    if kind == "npz":
        content = npz_bytes(x=samples, __labels__=np.arange(1000, dtype=np.int64))
    elif kind == "npy":
        buf = io.BytesIO()
        np.save(buf, samples)
        content = buf.getvalue()
    else:
        content = image_zip()
    settings = on_storage.app.state.settings  # type: ignore[attr-defined]
    staging = settings.resolved_data_dir / "staging"
    seen: dict[str, Any] = {}
    real = datasets_service.inspect_dataset

    def inspect(dataset: Any, preprocess: Any, limits: Any) -> Any:
        # The peak: every byte received and stored, none inspected yet.
        seen["staged"] = files_under(staging)
        seen["tmp"] = files_under(private_tmp)
        seen["local copies"] = [  # any file holding as many bytes on disk as the upload (the database aside)
            p
            for p in files_under(settings.resolved_data_dir)
            if p.stat().st_blocks * 512 >= len(content) and not p.name.startswith("qaas.db")
        ]
        info = real(dataset, preprocess, limits)
        seen["fetched"] = getattr(dataset, "fetched_bytes", None)
        return info

    monkeypatch.setattr(datasets_service, "inspect_dataset", inspect)
    data = {"preprocess": PREPROCESS} if kind == "images" else {}
    answer = on_storage.post("/v1/datasets", files={"file": (f"d.{kind}", content)}, data=data)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["format"] == kind and body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["num_samples"] == (3 if kind == "images" else 1000)
    assert seen["staged"] == [] and seen["tmp"] == [] and files_under(private_tmp) == []
    storage = on_storage.app.state.storage  # type: ignore[attr-defined]
    key = f"datasets/{body['id']}/data"
    assert storage.keys("datasets/") == [key]
    assert hashlib.sha256(b"".join(storage.iter_bytes(key))).hexdigest() == body["sha256"]
    if isinstance(storage, S3Storage):
        assert seen["local copies"] == []  # the bytes are in the bucket only
        if kind != "images":  # headers, read in place: a sliver of the object
            assert seen["fetched"] < len(content) // 20, seen["fetched"]
    else:
        assert [p.relative_to(storage.root).as_posix() for p in seen["local copies"]] == [key]
    assert on_storage.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert leftovers(on_storage, "datasets/") == []


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("garbage", (422, "invalid_dataset")),
        ("bad npz", (422, "invalid_dataset")),
        ("too many zip entries", (413, "payload_too_large")),
        ("images without preprocess", (422, "invalid_dataset")),
        ("bad preprocess", (422, "invalid_dataset")),
    ],
)
def test_a_refused_dataset_leaves_nothing_in_storage(
    on_storage: TestClient, tmp_path: Path, name: str, refusal: tuple[int, str]
) -> None:
    big = npz_bytes(x=np.zeros((1000, 3, 32, 32), np.float32))  # 12 MB: a multipart upload on S3
    content, data = {
        "garbage": (b"\0" * (12 << 20), {}),
        "bad npz": (big[:-200] + b"\0" * 200, {}),  # its directory gone
        "too many zip entries": (hand_made_zip(tmp_path / "many.zip", 100_001, zip64=True).read_bytes(), {}),
        "images without preprocess": (image_zip(), {}),
        "bad preprocess": (image_zip(), {"preprocess": '{"input": "x", "size": [0, 0]}'}),
    }[name]
    answer = on_storage.post("/v1/datasets", files={"file": ("d.zip", content)}, data=data)
    assert_error(answer, *refusal)
    assert leftovers(on_storage, "datasets/") == []
    assert on_storage.get("/v1/datasets").json()["items"] == []


def test_a_dataset_upload_cut_short_leaves_nothing_in_storage(on_storage: TestClient) -> None:
    head = b"--b\r\nContent-Disposition: form-data; name=file; filename=d.npz\r\n\r\n"
    cut = on_storage.post(
        "/v1/datasets",
        content=head + b"\0" * (12 << 20),  # two S3 parts sent, then the body ends
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error(cut, 422, "invalid_request")
    assert leftovers(on_storage, "datasets/") == []


def test_object_storage_failing_while_a_dataset_is_inspected_answers_503_not_a_verdict_on_the_file(
    s3_env: dict[str, str], sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store goes away between the upload and the inspection's ranged reads: a storage outage
    (503, retry), not a broken archive (422, which would tell the user to fix a good file)."""
    moto = s3_env["QAAS_S3_ENDPOINT_URL"].rsplit(":", 1)
    proxy = TcpProxy((moto[0].removeprefix("http://"), int(moto[1])))
    proxy.start()
    settings = sqlite_settings.model_copy(
        update={"storage_url": s3_env["QAAS_STORAGE_URL"], "s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    )
    real = datasets_service.inspect_dataset

    def cut_first(dataset: Any, preprocess: Any, limits: Any) -> Any:
        proxy.cut()
        return real(dataset, preprocess, limits)

    monkeypatch.setattr(datasets_service, "inspect_dataset", cut_first)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            answer = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=np.zeros((4, 3), np.float32)))})
            assert_error(answer, 503, "unavailable")
            proxy.restore()
            assert client.get("/v1/datasets").json()["items"] == []
    finally:
        proxy.close()
