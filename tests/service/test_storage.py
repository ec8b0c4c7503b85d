"""The Storage interface, the same behaviour on the local folder and on a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.storage import LocalStorage, ObjectMissing, Storage, StorageUnavailable, open_storage
from service.storage.s3 import MAX_WINDOW, MIN_WINDOW, RangedReader, S3Storage
from tests.conftest import free_port
from tests.onnx_models import matmul_mlp
from tests.s3 import CREDENTIALS, S3Server, dead_object_store
from tests.service.helpers import assert_error


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(Settings(data_dir=tmp_path))
    request.getfixturevalue("s3_env")
    s3 = open_storage(Settings(data_dir=tmp_path, s3_part_bytes=5 << 20))
    assert isinstance(s3, S3Storage)
    return s3


def blob(tmp_path: Path, size: int, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return path


@pytest.mark.parametrize("size", [0, 1000, (11 << 20) + 3])  # empty, one PUT, three multipart parts
def test_put_then_read_back_whole_and_in_ranges(storage: Storage, tmp_path: Path, size: int) -> None:
    src = blob(tmp_path, size)
    data = src.read_bytes()
    stored = storage.put_file("models/m1/model.onnx", src, move=True)
    assert not src.exists()
    assert (stored.size_bytes, stored.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert storage.size("models/m1/model.onnx") == size
    assert b"".join(storage.iter_bytes("models/m1/model.onnx", 4096)) == data
    if size:
        assert b"".join(storage.iter_bytes("models/m1/model.onnx", start=size // 2)) == data[size // 2 :]
        assert b"".join(storage.iter_bytes("models/m1/model.onnx", start=1, end=size // 3)) == data[1 : size // 3 + 1]
    with storage.open("models/m1/model.onnx") as f:
        assert f.read() == data
    dest = tmp_path / "copy.bin"
    storage.download("models/m1/model.onnx", dest)
    assert dest.read_bytes() == data


def test_keys_and_deletes_by_prefix(storage: Storage, tmp_path: Path) -> None:
    for key in ("jobs/a/1/q.onnx", "jobs/a/2/q.onnx", "jobs/ab/1/q.onnx", "models/x/model.onnx"):
        storage.put_file(key, blob(tmp_path, 10))
    assert sorted(storage.keys("jobs/a/")) == ["jobs/a/1/q.onnx", "jobs/a/2/q.onnx"]
    storage.delete_prefix("jobs/a/1")
    assert sorted(storage.keys("jobs/")) == ["jobs/a/2/q.onnx", "jobs/ab/1/q.onnx"]
    storage.delete("models/x/model.onnx")
    assert storage.keys("models/") == []
    with pytest.raises(FileNotFoundError):
        storage.size("models/x/model.onnx")
    storage.check()


def test_a_key_that_holds_nothing_is_object_missing_on_every_read(storage: Storage, tmp_path: Path) -> None:
    """Not StorageUnavailable: a worker fails a job whose input is gone instead of trying it again."""
    for read in (
        lambda: storage.download("models/gone/model.onnx", tmp_path / "dest"),
        lambda: storage.open("models/gone/model.onnx"),
        lambda: storage.size("models/gone/model.onnx"),
    ):
        with pytest.raises(ObjectMissing):
            read()
    assert not (tmp_path / "dest").exists()


def test_keys_that_escape_the_store_are_refused(storage: Storage, tmp_path: Path) -> None:
    for key in ("../x", "/abs", "a//b", "a\\b"):
        with pytest.raises(ValueError):
            storage.put_file(key, blob(tmp_path, 1))


def test_a_failed_multipart_upload_is_aborted_and_leaves_nothing(s3_env: dict[str, str], s3_server: S3Server) -> None:
    storage = S3Storage.from_settings(Settings(s3_part_bytes=5 << 20))

    def broken() -> Iterator[bytes]:
        for _ in range(7):  # one part goes up, then the request "breaks"
            yield b"\0" * (1 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        storage.put_stream("jobs/j/1/quantized.onnx", broken())
    assert s3_server.unfinished_uploads(storage.bucket) == []
    assert storage.keys("jobs/") == []


def test_an_unreachable_store_is_storage_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    settings = Settings(
        data_dir=tmp_path, storage_url="s3://nowhere/p", s3_endpoint_url="http://127.0.0.1:9"
    )  # port 9: discard, nothing listens
    storage = open_storage(settings)
    with pytest.raises(StorageUnavailable):
        storage.check()


def test_local_presigned_is_none(tmp_path: Path) -> None:
    assert LocalStorage(tmp_path).presigned_url("a", expires_s=60, filename="a") is None


def test_the_api_answers_503_while_the_object_store_is_unreachable(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = sqlite_settings.model_copy(
        update={"storage_url": "s3://gone/qaas", "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 503 and "storage" in ready.text, ready.text
        model = matmul_mlp(tmp_path / "m.onnx")
        answer = api.post("/v1/models", files={"file": ("m.onnx", model.read_bytes())})
        assert_error(answer, 503, "unavailable")
        assert api.get("/v1/models").json()["items"] == []  # nothing was recorded
        staging = settings.resolved_data_dir / "staging"
        assert not staging.exists() or not any(staging.iterdir())


def test_a_writer_is_invisible_until_committed_and_leaves_nothing_when_aborted(
    storage: Storage, tmp_path: Path
) -> None:
    data = bytes(range(256)) * ((11 << 20) // 256)  # three parts on S3
    writer = storage.writer("uploads/u1/part-0")
    for i in range(0, len(data), 1 << 20):
        writer.write(memoryview(data)[i : i + (1 << 20)])
    assert storage.keys("uploads/") == []
    stored = writer.commit()
    assert (stored.size_bytes, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert storage.keys("uploads/") == ["uploads/u1/part-0"]
    assert b"".join(storage.iter_bytes("uploads/u1/part-0")) == data

    dropped = storage.writer("uploads/u2/part-0")
    dropped.write(data)
    dropped.abort()
    assert storage.keys("uploads/") == ["uploads/u1/part-0"]  # nothing of the aborted one
    if isinstance(storage, S3Storage):
        assert storage._call(storage.client.list_multipart_uploads).get("Uploads", []) == []


def test_the_hash_beside_the_write_equals_sha256_of_the_stream() -> None:
    import hashlib
    import os

    from service.storage.base import HASH_BATCH, BesideHash

    data = os.urandom(3 * HASH_BATCH + 12345)
    for sizes in ([len(data)], [1, 7, HASH_BATCH - 8, HASH_BATCH + 1], [65536] * (len(data) // 65536 + 1)):
        hasher, at = BesideHash(), 0
        for size in sizes:
            hasher.update(memoryview(data)[at : at + size])
            at += size
        assert hasher.hexdigest() == hashlib.sha256(data[:at]).hexdigest()
    assert BesideHash().hexdigest() == hashlib.sha256(b"").hexdigest()


def test_a_seekable_reader_reads_any_range_of_the_object_as_the_file_would(storage: Storage, tmp_path: Path) -> None:
    src = blob(tmp_path, (3 << 20) + 123)
    data = src.read_bytes()
    storage.put_file("datasets/d/data", src)
    rng = random.Random(0)
    with storage.open_seekable("datasets/d/data") as f:
        assert f.seekable() and f.seek(0, io.SEEK_END) == len(data)
        for _ in range(200):
            at, n = rng.randrange(len(data) + 10), rng.choice([0, 1, 7, 4096, 100_000, 2 << 20])
            assert f.seek(at) == at
            assert f.read(n) == data[at : at + n]
            assert f.tell() == max(at, min(at + n, len(data)))
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(5)
        f.seek(3, io.SEEK_CUR)
        assert f.read(2) == data[8:10]


def test_reading_an_object_forward_costs_few_requests_and_no_more_bytes_than_it_holds(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    storage = S3Storage.from_settings(Settings())
    src = blob(tmp_path, 32 << 20)
    storage.put_file("datasets/d/data", src)
    with storage.open_seekable("datasets/d/data") as f:
        reader = cast(RangedReader, f)
        for at in range(0, 32 << 20, 100_000):  # a header every 100 kB, as a zip's members lie
            f.seek(at)
            f.read(100)
        assert reader.requests < 20 and reader.fetched_bytes <= (32 << 20) + MAX_WINDOW
        f.seek(10)  # back to the start: a small window again, not MAX_WINDOW for 100 bytes
        f.read(100)
        assert len(reader.buffer) == MIN_WINDOW


def test_a_seekable_reader_whose_store_failed_says_so_when_it_is_left(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Whatever the code reading it made of the failure (zipfile calls it a bad zip), the `with`
    block ends with the store's failure."""
    storage = S3Storage.from_settings(Settings())
    storage.put_file("datasets/d/data", blob(tmp_path, 1000))
    dead = dead_object_store()
    with pytest.raises(StorageUnavailable), RangedReader(dead, "datasets/d/data", 1000) as f:
        try:
            f.read(10)
        except OSError as exc:
            raise ValueError("the reader's own verdict") from exc
