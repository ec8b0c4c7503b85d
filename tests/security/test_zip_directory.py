"""Zip central directories: the entry count and the directory's size come from the end records
(zip64 included) and are checked before anything parses the directory, and an upload parses each
archive's directory once. Parsing builds an object per entry, so a small zip of many tiny entries
used to cost the API many times its size in memory before the entry limit was even looked at."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.errors import PayloadTooLarge
from service.inspection.archive import ArchiveLimits, check_zip
from tests.security import hostile as h
from tests.service.helpers import npz_bytes


def hand_made_zip(
    path: Path, entries: int, *, declared: int | None = None, zip64: bool = False, name_length: int = 7
) -> Path:
    """`entries` empty stored files, written by hand (zipfile takes seconds for 100k entries). The end
    records declare `declared` entries (default: the truth); `zip64` adds the zip64 end records."""
    local, central = bytearray(), bytearray()
    for i in range(entries):
        name = f"f{i:0{name_length - 1}d}".encode()
        offset = len(local)
        local += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        fields = (20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0o100644 << 16, offset)
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", *fields) + name
    count = entries if declared is None else declared
    tail = b""
    if zip64:
        record_at = len(local) + len(central)
        tail += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), len(local))
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
        tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    path.write_bytes(bytes(local + central) + tail)
    return path


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time zipfile parses a central directory, the archive's file name."""
    seen: list[str] = []
    real: Callable[[zipfile.ZipFile], None] = zipfile.ZipFile._RealGetContents  # type: ignore[attr-defined]

    def counted(self: zipfile.ZipFile) -> None:
        seen.append(str(self.filename))
        real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", counted)
    return seen


def test_the_hand_made_archives_are_real_zips(tmp_path: Path) -> None:
    for zip64 in (False, True):
        path = hand_made_zip(tmp_path / f"ok-{zip64}.zip", 70, zip64=zip64)
        assert len(zipfile.ZipFile(path).infolist()) == 70
        assert len(check_zip(path, ArchiveLimits(max_entries=70))) == 70


def peak_memory(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
    except PayloadTooLarge:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("zip64", [False, True], ids=["plain", "zip64"])
def test_too_many_entries_are_refused_before_the_directory_is_parsed(
    tmp_path: Path, parses: list[str], zip64: bool
) -> None:
    path = hand_made_zip(tmp_path / "many.zip", 20_000, zip64=zip64)  # 1.3 MB of empty files
    with pytest.raises(PayloadTooLarge, match="20000 entries, more than the limit of 1000"):
        check_zip(path, ArchiveLimits(max_entries=1000))
    assert parses == []
    # Parsing all 20,000 entries costs several MiB; reading the end records costs their bytes.
    assert peak_memory(lambda: check_zip(path, ArchiveLimits(max_entries=1000))) < 512 << 10


def test_an_end_record_that_understates_the_count_does_not_get_past_the_limit(
    tmp_path: Path, parses: list[str]
) -> None:
    path = hand_made_zip(tmp_path / "liar.zip", 5000, declared=10)
    with pytest.raises(PayloadTooLarge, match="more than the limit of 1000"):
        check_zip(path, ArchiveLimits(max_entries=1000))
    assert parses == []


def test_an_oversized_central_directory_is_refused_before_it_is_parsed(tmp_path: Path, parses: list[str]) -> None:
    path = hand_made_zip(tmp_path / "long-names.zip", 400, name_length=200)  # a 96 KB directory
    with pytest.raises(PayloadTooLarge, match=r"central directory is \d+ bytes, more than the limit of 65536"):
        check_zip(path, ArchiveLimits(max_directory_bytes=64 << 10))
    assert parses == []


def image_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, color in enumerate(("red", "blue")):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), color).save(image, "PNG")
            zf.writestr(f"class{i}/img.png", image.getvalue())
    return buf.getvalue()


def model_with_zipped_weights() -> list[tuple[str, tuple[str, bytes]]]:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("w.bin", h.weights())
    return [
        ("file", ("m.onnx", h.external_data_model("w.bin"))),
        ("external_data", ("weights.zip", archive.getvalue())),
    ]


@pytest.mark.parametrize("upload", ["npz dataset", "image dataset", "model with zipped external data"])
def test_an_upload_parses_each_archive_directory_once(client: TestClient, parses: list[str], upload: str) -> None:
    if upload == "npz dataset":
        response = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=np.zeros((2, 3), np.float32)))})
    elif upload == "image dataset":
        preprocess = '{"input": "x", "size": [8, 8], "layout": "NCHW", "color": "RGB"}'
        response = client.post("/v1/datasets", files={"file": ("i.zip", image_zip())}, data={"preprocess": preprocess})
    else:
        response = client.post("/v1/models", files=model_with_zipped_weights())
    assert response.status_code == 201, response.text
    assert len(parses) == 1, parses
