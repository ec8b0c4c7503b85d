"""Zip members that inflate past what they declare (issue #23), checked where the API reads them, in
this process: the memory a read takes follows what the reader asks for, never what the archive says.

zipfile trusts the declared sizes: `read()` takes a member's whole compressed window (a stored
`labels.csv` declaring 10 bytes was read whole), and a member that inflates past its declared size is
cut there without a word. The HTTP side, bzip2 and LZMA bombs against the real API, is in
test_hostile_datasets.py and test_hostile_models.py."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import InvalidDataset, InvalidModel, ServiceError
from service.inspection.archive import extract_flat
from service.inspection.dataset import inspect_dataset, parse_preprocess
from tests.security import hostile as h

LABELS = b"a.png,0\n\n\n"  # 10 bytes that label the one image


def peak_memory(fn: Callable[[], object]) -> tuple[int, ServiceError | None]:
    """The peak of Python allocations while `fn` runs, and the service error it raised, if any."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except ServiceError as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


def test_a_stored_labels_csv_larger_than_it_declares_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(
        h.patched_zip(
            {"a.png": h.png(), "labels.csv": LABELS + bytes(64 << 20)},
            "labels.csv",
            declared=len(LABELS),
            crc=zlib.crc32(LABELS),
        )
    )
    peak, error = peak_memory(lambda: inspect_dataset(path, parse_preprocess(h.PREPROCESS)))
    assert isinstance(error, InvalidDataset), error
    assert "declares 10 bytes and holds 67108874" in error.message
    assert peak < 1 << 20, f"{peak >> 20} MiB allocated for a 10-byte labels.csv"


def test_a_deflate_member_that_inflates_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    """64 MiB of zeros deflated, declared as its first 1,000 bytes (with their CRC): zipfile stops at
    1,000 bytes and the CRC agrees, so the lie went unnoticed."""
    path = tmp_path / "weights.zip"
    path.write_bytes(
        h.patched_zip(
            {"w.bin": zlib.compress(bytes(64 << 20), 9)[2:-4]},  # raw deflate, as zip stores it
            "w.bin",
            method=h.zipfile.ZIP_DEFLATED,
            declared=1000,
            crc=zlib.crc32(bytes(1000)),
        )
    )
    out = tmp_path / "out"
    peak, error = peak_memory(lambda: extract_flat(path, out))
    assert isinstance(error, InvalidModel), error
    assert "inflates past its declared size of 1000 bytes" in error.message
    assert list(out.iterdir()) == []
    assert peak < 4 << 20, f"{peak >> 20} MiB allocated to read 1,000 bytes"


@pytest.mark.parametrize("method", [h.zipfile.ZIP_BZIP2, h.zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_bzip2_and_lzma_members_are_refused_before_anything_inflates(tmp_path: Path, method: int) -> None:
    path = tmp_path / "calib.npz"
    path.write_bytes(h.members_zip({"input.npy": h.npy_of(1000)}, method))
    with pytest.raises(InvalidDataset, match="zip -Z deflate"):
        inspect_dataset(path, None)
