"""Hostile dataset uploads over HTTP: pickles, lying .npy headers, zip bombs, traversal names,
decompression-bomb images. Each answers a clear 4xx, unpickles and extracts nothing, and leaves
the service serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.security import hostile as h
from tests.security.conftest import Hostile, PeakMemory, assert_contained, assert_serving, normal_job, start
from tests.service.helpers import assert_error, npz_bytes

pytestmark = pytest.mark.e2e

MAX_DATASET_BYTES = 32 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    yield from start(tmp_path_factory, "hostile-datasets", QAAS_MAX_DATASET_BYTES=str(MAX_DATASET_BYTES))


@dataclass(frozen=True)
class Case:
    upload: Callable[[Hostile], tuple[str, bytes]]  # file name and content
    status: int
    code: str
    says: str
    preprocess: str | None = None


def _pwn(s: Hostile) -> str:
    return f"touch {s.outside / 'pwned'}"


def _npy_member_of(total: int) -> bytes:
    """A float32 .npy of exactly `total` bytes, zeros."""
    header = h.npy_header((0,))
    count = (total - len(header)) // 4
    header = h.npy_header((count,))
    return header + bytes(count * 4)


def _under_ratio_members(count: int) -> bytes:
    """`count` members just under the size where the ratio test starts: only the total can stop them."""
    member = _npy_member_of((1 << 20) - 4096)
    return h.members_zip({f"a{i}.npy": member for i in range(count)}, h.zipfile.ZIP_DEFLATED)


LABELS = b"a.png,0\n\n\n"  # 10 bytes that label the one image


CASES = {
    # Never unpickled: object arrays carry code that np.load(allow_pickle=True) would run.
    "pickled-npy": Case(lambda s: ("calib.npy", h.pickled_npy(_pwn(s))), 422, "invalid_dataset", "pickling"),
    "pickled-npz-member": Case(
        lambda s: ("calib.npz", h.members_zip({"input.npy": h.pickled_npy(_pwn(s))})),
        422,
        "invalid_dataset",
        "pickling",
    ),
    "structured-dtype-with-objects": Case(
        lambda _s: ("calib.npy", h.npy_header((4,), [("a", "<f4"), ("b", "|O")]) + bytes(64)),
        422,
        "invalid_dataset",
        "pickling",
    ),
    # Headers that lie about the size: checked against the real size before anything is allocated.
    "npz-header-claims-terabytes": Case(
        lambda _s: ("calib.npz", h.members_zip({"input.npy": h.npy_header((1 << 40,)) + bytes(16)})),
        422,
        "invalid_dataset",
        "holds 16 bytes",
    ),
    "npy-header-claims-less": Case(
        lambda _s: ("calib.npy", h.npy_header((4,)) + bytes(1 << 20)),
        422,
        "invalid_dataset",
        "declares float32 [4]",
    ),
    "npy-header-overflows": Case(
        lambda _s: ("calib.npy", h.npy_header((1 << 62, 1 << 62)) + bytes(16)),
        422,
        "invalid_dataset",
        "holds 16 bytes",
    ),
    "npy-header-code": Case(
        lambda _s: ("calib.npy", h.raw_npy_header("{'descr': __import__('os').system('id')")),
        422,
        "invalid_dataset",
        "not a valid .npy array",
    ),
    "npy-header-deeply-nested": Case(
        lambda _s: (
            "calib.npy",
            h.raw_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 20_000 + ")" * 20_000 + "}"),
        ),
        422,
        "invalid_dataset",
        "not a valid .npy array",
    ),
    # Zip bombs: ratio, total expanded size, entry count.
    "zip-bomb-ratio": Case(
        lambda _s: ("calib.npz", h.zeros_npz_member("input.npy", 64 << 20)),
        413,
        "payload_too_large",
        "compression ratio",
    ),
    "zip-bomb-total": Case(
        lambda _s: ("calib.npz", _under_ratio_members(40)),
        413,
        "payload_too_large",
        f"limit of {MAX_DATASET_BYTES} bytes",
    ),
    "zip-too-many-entries": Case(
        lambda _s: ("calib.zip", h.many_entries_zip(100_001)),
        413,
        "payload_too_large",
        "100001 entries",
        h.PREPROCESS,
    ),
    # Zip members that inflate past what they declare (#23): only stored and deflate members are read.
    "npz-bzip2-bomb": Case(
        lambda _s: ("calib.npz", h.bzip2_bomb_zip("input.npy", h.npy_of(1000))),
        422,
        "invalid_dataset",
        "re-create the archive with np.savez_compressed",
    ),
    "npz-lzma-member": Case(
        lambda _s: ("calib.npz", h.members_zip({"input.npy": h.npy_of(1000)}, h.zipfile.ZIP_LZMA)),
        422,
        "invalid_dataset",
        "compressed with LZMA",
    ),
    "labels-csv-stored-larger-than-declared": Case(
        lambda _s: (
            "images.zip",
            h.patched_zip(
                {"a.png": h.png(), "labels.csv": LABELS + bytes(16 << 20)},
                "labels.csv",
                declared=len(LABELS),
                crc=h.zlib.crc32(LABELS),
            ),
        ),
        422,
        "invalid_dataset",
        "declares 10 bytes and holds 16777226",
        h.PREPROCESS,
    ),
    "npz-too-many-arrays": Case(
        lambda _s: ("calib.npz", h.members_zip({f"a{i}.npy": h.npy_header((1,)) + bytes(4) for i in range(1025)})),
        422,
        "resource_limit",
        "1025 arrays",
    ),
    # Image archives: names, links, formats, decompression bombs.
    "image-zip-dotdot": Case(
        lambda _s: ("images.zip", h.zip_of([("../../../outside/evil.png", h.png())])),
        422,
        "invalid_dataset",
        "unsafe",
        h.PREPROCESS,
    ),
    "image-zip-absolute": Case(
        lambda s: ("images.zip", h.zip_of([(str(s.outside / "evil.png"), h.png())])),
        422,
        "invalid_dataset",
        "unsafe",
        h.PREPROCESS,
    ),
    "image-zip-symlink": Case(
        lambda _s: ("images.zip", h.symlink_zip("cat/a.png", "/etc/passwd", [("cat/b.png", h.png())])),
        422,
        "invalid_dataset",
        "symbolic link",
        h.PREPROCESS,
    ),
    "decompression-bomb-png": Case(
        lambda _s: ("images.zip", h.zip_of([("cat/bomb.png", h.bomb_png())])),
        422,
        "resource_limit",
        "decompression bomb",
        h.PREPROCESS,
    ),
    "non-image-entry": Case(
        lambda _s: (
            "images.zip",
            h.zip_of([("cat/a.png", h.png()), ("cat/run.sh", b"#!/bin/sh\nrm -rf /\n")]),
        ),
        422,
        "invalid_dataset",
        "not a JPEG or PNG",
        h.PREPROCESS,
    ),
    "disguised-image": Case(
        lambda _s: ("images.zip", h.zip_of([("cat/a.png", b"GIF89a" + bytes(64))])),
        422,
        "invalid_dataset",
        "not a JPEG or PNG",
        h.PREPROCESS,
    ),
    "garbage": Case(
        lambda _s: ("calib.npz", b"MZ\x90\x00 not an array " * 32),
        422,
        "invalid_dataset",
        "neither a .npy array nor a zip",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_dataset_is_refused(service: Hostile, name: str) -> None:
    case = CASES[name]
    before = service.tree()
    file_name, content = case.upload(service)
    data = {"preprocess": case.preprocess} if case.preprocess else {}
    with service.client() as http:
        response = http.post("/v1/datasets", files={"file": (file_name, content)}, data=data)
        error = assert_error(response, case.status, case.code)
        assert case.says in error["message"], error
        assert http.get("/v1/datasets").json()["items"] == []
    assert str(service.dep.data_dir) not in response.text, "the answer leaks the server's folders"
    assert not (service.outside / "pwned").exists(), "the pickle ran"
    assert_contained(service, before)
    assert_serving(service)


def test_a_bzip2_bomb_leaves_the_api_memory_flat(service: Hostile) -> None:
    """Issue #23: zipfile inflates a bzip2 member a whole compressed window at a time, whatever the
    member declares, so this 1 KiB .npz (one member declaring 1,000 bytes) made the API allocate 1 GiB."""
    bomb = h.bzip2_bomb_zip("input.npy", h.npy_of(1000))
    assert len(bomb) < 2048
    with service.client() as http:
        with PeakMemory(service.api_process().pid) as peak:
            response = http.post("/v1/datasets", files={"file": ("calib.npz", bomb)})
        assert_error(response, 422, "invalid_dataset")
    assert peak.growth < 100 << 20, f"the API's peak memory grew by {peak.growth >> 20} MiB"
    assert_serving(service)


def test_client_file_name_is_metadata(service: Hostile) -> None:
    before = service.tree()
    samples = np.zeros((2, 1, 3, 8, 8), dtype=np.float32)
    with service.client() as http:
        created = http.post("/v1/datasets", files={"file": ("../../../outside/calib.npz", npz_bytes(input=samples))})
        assert created.status_code == 201, created.text
        assert http.delete(f"/v1/datasets/{created.json()['id']}").status_code == 204
    stored = [p.name for p in (service.dep.data_dir / "storage").rglob("*") if p.is_file()]
    assert "calib.npz" not in stored, stored
    assert_contained(service, before)


def test_a_normal_job_still_completes(service: Hostile, tmp_path: Path) -> None:
    normal_job(service, tmp_path)
    assert_serving(service)
