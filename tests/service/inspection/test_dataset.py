"""inspect_dataset / detect_format / parse_preprocess on arrays and image zips built here."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidDataset, PayloadTooLarge, ResourceLimit
from service.inspection.archive import ArchiveLimits
from service.inspection.dataset import DatasetLimits, detect_format, inspect_dataset, parse_preprocess

PRE = {"input": "input", "size": [8, 8]}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _lying_npy(shape: tuple[int, ...], data: bytes, descr: str = "<f4") -> bytes:
    """A .npy whose header declares `shape` whatever the data holds."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _png(size: tuple[int, int] = (4, 4), color: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(color, size).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int] = (4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a valid IHDR, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


# -- arrays ------------------------------------------------------------------------------------


def test_npz_stacked_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x=np.zeros((5, 1, 4), np.float32),
        step=np.array(3, np.int64),
        __labels__=np.arange(5, dtype=np.int64),
    )
    assert detect_format(path) == "npz"
    info = inspect_dataset(path, None)
    assert info.format == "npz"
    assert info.num_samples == 5
    assert info.tensors == {
        "x": {"dtype": "float32", "shape": [5, 1, 4]},
        "step": {"dtype": "int64", "shape": []},
    }
    assert info.has_labels is True
    assert info.num_classes is None


def test_compressed_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, a=np.ones((3, 2), np.float64))
    assert inspect_dataset(path, None).tensors == {"a": {"dtype": "float64", "shape": [3, 2]}}


def test_npy_is_keyed_star(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((7, 3, 8, 8), np.float32))
    assert detect_format(path) == "npy"
    info = inspect_dataset(path, None)
    assert (info.format, info.num_samples, info.has_labels) == ("npy", 7, False)
    assert info.tensors == {"*": {"dtype": "float32", "shape": [7, 3, 8, 8]}}


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "d.bin"
    path.write_bytes(b"GIF89a....")
    with pytest.raises(InvalidDataset, match=r"neither a \.npy"):
        detect_format(path)


def test_pickled_object_array_refused(tmp_path: Path) -> None:
    evil = np.array([{"a": 1}, None], dtype=object)
    path = _npz(tmp_path / "d.npz", {"x.npy": _npy_bytes(evil)})
    with pytest.raises(InvalidDataset, match="pickling"):
        inspect_dataset(path, None)
    npy = tmp_path / "d.npy"
    npy.write_bytes(_npy_bytes(evil))
    with pytest.raises(InvalidDataset, match="pickling"):
        inspect_dataset(npy, None)


def test_header_lying_about_size_refused(tmp_path: Path) -> None:
    liar = _lying_npy((1_000_000_000,), b"\x00" * 16)
    with pytest.raises(InvalidDataset, match="holds 16 bytes"):
        inspect_dataset(_npz(tmp_path / "d.npz", {"x.npy": liar}), None)
    npy = tmp_path / "d.npy"
    npy.write_bytes(liar)
    with pytest.raises(InvalidDataset, match="holds 16 bytes"):
        inspect_dataset(npy, None)


def test_garbage_member_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset, match=r"not a valid \.npy"):
        inspect_dataset(_npz(tmp_path / "d.npz", {"x.npy": b"\x93NUMPY\x09\x00garbage"}), None)


def test_declared_total_over_limit(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((64,), np.float32), b=np.zeros((64,), np.float32))
    with pytest.raises(PayloadTooLarge):
        inspect_dataset(path, None, DatasetLimits(max_total_bytes=300))


def test_too_many_members(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros(2), b=np.zeros(2), c=np.zeros(2))
    with pytest.raises(ResourceLimit, match="3 arrays"):
        inspect_dataset(path, None, DatasetLimits(max_members=2))


def test_too_many_zip_entries(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros(2), b=np.zeros(2), c=np.zeros(2))
    with pytest.raises(PayloadTooLarge, match="entries"):
        inspect_dataset(path, None, DatasetLimits(archive=ArchiveLimits(max_entries=2)))


def test_mismatched_axis0(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((4, 2)), b=np.zeros((5, 2)))
    with pytest.raises(InvalidDataset, match="'a' has 4, 'b' has 5"):
        inspect_dataset(path, None)


@pytest.mark.parametrize("labels", [np.zeros(4, np.float32), np.zeros((4, 1), np.int64)])
def test_labels_must_be_1d_int(tmp_path: Path, labels: np.ndarray) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((4, 2)), __labels__=labels)
    with pytest.raises(InvalidDataset, match="__labels__"):
        inspect_dataset(path, None)


def test_labels_only_is_not_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, __labels__=np.zeros(4, np.int64))
    with pytest.raises(InvalidDataset, match="no input arrays"):
        inspect_dataset(path, None)


def test_empty_axis0_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((0, 2)))
    with pytest.raises(InvalidDataset, match="no samples"):
        inspect_dataset(path, None)


# -- images ------------------------------------------------------------------------------------


def test_images_in_class_folders(tmp_path: Path) -> None:
    path = _npz(
        tmp_path / "imgs.zip",
        {
            "data/cat/1.png": _png(),
            "data/cat/2.jpg": _jpeg(),
            "data/dog/3.png": _png(color="L"),
            "data/.DS_Store": b"junk",
            "__MACOSX/data/._1.png": b"junk",
        },
    )
    assert detect_format(path) == "images"
    info = inspect_dataset(path, {**PRE, "layout": "NHWC"})
    assert (info.format, info.num_samples, info.has_labels, info.num_classes) == ("images", 3, True, 2)
    assert info.tensors == {"input": {"dtype": "float32", "shape": [3, 8, 8, 3]}}


def test_images_without_labels(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png(), "b.jpg": _jpeg()})
    info = inspect_dataset(path, PRE)
    assert (info.num_samples, info.has_labels, info.num_classes) == (2, False, None)
    assert info.tensors == {"input": {"dtype": "float32", "shape": [2, 3, 8, 8]}}


def test_images_with_labels_csv_names(tmp_path: Path) -> None:
    csv = "filename,label\na.png,zebra\nsub/b.jpg,ant\nc.png,zebra\n"
    path = _npz(
        tmp_path / "imgs.zip",
        {"a.png": _png(), "sub/b.jpg": _jpeg(), "c.png": _png(), "labels.csv": csv.encode()},
    )
    info = inspect_dataset(path, PRE)
    assert (info.num_samples, info.has_labels, info.num_classes) == (3, True, 2)


def test_images_with_labels_csv_ints(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png(), "b.png": _png(), "labels.csv": b"a.png,0\nb.png,7\n"})
    info = inspect_dataset(path, PRE)
    assert (info.has_labels, info.num_classes) == (True, 8)


@pytest.mark.parametrize(
    ("csv", "match"),
    [
        (b"a.png,0\n", "no line in labels.csv"),
        (b"a.png,0\nb.png,1\nzz.png,1\n", "not an image"),
        (b"a.png\nb.png,1\n", "not `filename,label`"),
        (b"a.png,0\na.png,1\nb.png,1\n", "twice"),
    ],
)
def test_bad_labels_csv(tmp_path: Path, csv: bytes, match: str) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png(), "b.png": _png(), "labels.csv": csv})
    with pytest.raises(InvalidDataset, match=match):
        inspect_dataset(path, PRE)


def test_images_mixing_folders_and_root(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"cat/1.png": _png(), "dog/2.png": _png(), "3.png": _png()})
    with pytest.raises(InvalidDataset, match=r"'3\.png' is outside any class folder"):
        inspect_dataset(path, PRE)


def test_non_image_entry_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png(), "notes.txt": b"hello"})
    with pytest.raises(InvalidDataset, match=r"'notes\.txt' is not a JPEG or PNG"):
        inspect_dataset(path, PRE)


def test_truncated_png_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png()[:20]})
    with pytest.raises(InvalidDataset, match="not a readable"):
        inspect_dataset(path, PRE)


def test_images_need_preprocess(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"a.png": _png()})
    with pytest.raises(InvalidDataset, match="preprocess"):
        inspect_dataset(path, None)


def test_decompression_bomb_png(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"bomb.png": _png_header_only(100_000, 100_000)})
    with pytest.raises(ResourceLimit, match=r"bomb\.png"):
        inspect_dataset(path, PRE)


def test_image_over_pixel_limit(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {"big.png": _png_header_only(8_000, 8_000)})
    with pytest.raises(ResourceLimit, match="50000000 pixels"):
        inspect_dataset(path, PRE)


def test_too_many_images(tmp_path: Path) -> None:
    path = _npz(tmp_path / "imgs.zip", {f"{i}.png": _png() for i in range(3)})
    with pytest.raises(ResourceLimit, match="3 images"):
        inspect_dataset(path, PRE, DatasetLimits(max_images=2))


# -- preprocess --------------------------------------------------------------------------------


def test_preprocess_defaults_and_json() -> None:
    expected = {
        "input": "x",
        "size": [224, 200],
        "layout": "NCHW",
        "color": "RGB",
        "scale": 1 / 255,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
    }
    assert parse_preprocess({"input": "x", "size": [224, 200]}) == expected
    assert parse_preprocess('{"input": "x", "size": [224, 200]}') == expected
    assert parse_preprocess(expected) == expected
    assert parse_preprocess(None) is None
    assert parse_preprocess("  ") is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("{not json", "preprocess"),
        ("[1, 2]", "preprocess"),
        ({"size": [8, 8]}, "preprocess.input"),
        ({"input": "x", "size": [0, 8]}, "preprocess.size"),
        ({"input": "x", "size": [8]}, "preprocess.size"),
        ({"input": "x", "size": [8, True]}, "preprocess.size"),
        ({"input": "x", "size": [8, 8], "layout": "CHW"}, "preprocess.layout"),
        ({"input": "x", "size": [8, 8], "color": "CMYK"}, "preprocess.color"),
        ({"input": "x", "size": [8, 8], "scale": 0}, "preprocess.scale"),
        ({"input": "x", "size": [8, 8], "mean": [0, 0]}, "preprocess.mean"),
        ({"input": "x", "size": [8, 8], "std": [1, 0, 1]}, "preprocess.std"),
        ({"input": "x", "size": [8, 8], "sclae": 1.0}, "preprocess.sclae"),
    ],
)
def test_preprocess_invalid_names_the_field(raw: object, field: str) -> None:
    with pytest.raises(InvalidDataset) as err:
        parse_preprocess(raw)  # type: ignore[arg-type]
    assert err.value.detail["field"] == field
    assert field in err.value.message
