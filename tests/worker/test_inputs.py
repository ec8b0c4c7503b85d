"""A worker's input cache: keyed by sha256, bounded, never a path into storage, and never a file whose
bytes are not the ones recorded for its key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.errors import RuleError
from service.settings import Settings
from service.storage import LocalStorage
from service.storage.s3 import S3Storage
from worker.inputs import InputCache


class Counting(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads: list[str] = []

    def download(self, key: str, dest: Path, *, sha256: str | None = None) -> None:
        self.downloads.append(key)
        super().download(key, dest, sha256=sha256)


def _store(storage: LocalStorage, tmp_path: Path, key: str, size: int) -> str:
    src = tmp_path / "src"
    src.write_bytes(key.encode() * (size // len(key)))
    return storage.put_file(key, src).sha256


def test_each_input_is_downloaded_once_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    storage = Counting(tmp_path / "storage")
    cache = InputCache(storage, tmp_path / "cache", max_bytes=2500)
    a, b = _store(storage, tmp_path, "models/a/model.onnx", 1000), _store(storage, tmp_path, "datasets/b/d.npz", 1000)
    for job in ("j1", "j2"):
        cache.fetch("models/a/model.onnx", a, 1000, tmp_path / job / "model.onnx", copy=True)
        cache.fetch("datasets/b/d.npz", b, 1000, tmp_path / job / "d.npz")
    assert storage.downloads == ["models/a/model.onnx", "datasets/b/d.npz"]  # the second job hit the cache
    copied = tmp_path / "j2" / "model.onnx"
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == a
    assert copied.stat().st_nlink == 1  # ONNX reads external data only from a file of its own

    c = _store(storage, tmp_path, "models/c/model.onnx", 1000)
    cache.fetch("models/c/model.onnx", c, 1000, tmp_path / "j3" / "model.onnx")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert a not in cached and sorted([b, c]) == cached  # least recently used went first
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 2500
    assert (tmp_path / "j1" / "model.onnx").read_bytes()  # a job's own copy outlives its eviction

    too_big = _store(storage, tmp_path, "models/d/model.onnx", 3000)
    cache.fetch("models/d/model.onnx", too_big, 3000, tmp_path / "j4" / "model.onnx")
    assert too_big not in {p.name for p in (tmp_path / "cache").iterdir()}


def test_bytes_that_do_not_hash_to_the_recorded_sha256_never_reach_a_job(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    """A sha256 may be the client's word (external data sent straight to the object store): the download
    is checked, and a cached file with that sha256 serves only keys whose own bytes were seen to have it
    (else declaring another tenant's sha256 would bring their weights into one's own job)."""
    storage = S3Storage.from_settings(Settings())
    cache = InputCache(storage, tmp_path / "cache", max_bytes=1 << 20)
    src = tmp_path / "src"
    src.write_bytes(b"alice's private weights")
    alice = storage.put_file("models/a/w.bin", src).sha256
    src.write_bytes(b"bob's bytes, declared with alice's sha256")
    storage.put_file("models/b/w.bin", src)

    assert (
        cache.fetch("models/a/w.bin", alice, 23, tmp_path / "j1" / "w.bin").read_bytes() == b"alice's private weights"
    )
    for job in ("j2", "j3"):  # cached or not, the key's own bytes decide
        with pytest.raises(RuleError) as refused:
            cache.fetch("models/b/w.bin", alice, 23, tmp_path / job / "w.bin", copy=True)
        assert refused.value.code == "input_corrupt" and refused.value.detail["sha256_recorded"] == alice
        assert not (tmp_path / job / "w.bin").exists()
    with pytest.raises(RuleError):  # too large for the cache: checked all the same
        InputCache(storage, tmp_path / "small", max_bytes=1).fetch("models/b/w.bin", alice, 23, tmp_path / "j4" / "w")
    assert not (tmp_path / "j4" / "w").exists()
    assert (tmp_path / "cache" / alice).read_bytes() == b"alice's private weights"
