"""Validation and summary of an uploaded dataset (.npz, .npy, zip of images) from headers only.

No array is ever loaded and no image decoded: `.npy` headers and image headers are read from
the stream and checked against the real sizes and the limits before anything is allocated. The
dataset is a file on disk or a seekable file (a stored object read in place, see
`Storage.open_seekable`); archive members are read in the order they are stored, so a reader that
reads ahead serves them from few requests.

`num_samples` is the length of axis 0 shared by the non-scalar arrays: for arrays stacked on a
new leading axis that is the number of samples, for arrays split into batches it is the number
of rows. A dataset of rank-0 arrays only has one sample. In `tensors`, a `.npy` file is keyed
`"*"`, meaning "the model's only input"; shapes are as stored, axis 0 included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from core import images as image_specs
from core.datasets import LABELS_KEY, SINGLE_INPUT_KEY, check_labels
from core.images import is_litter, member_name
from core.npy import NpyHeader, read_npy_header
from service.errors import InvalidDataset, PayloadTooLarge, ResourceLimit, service_errors
from service.inspection.archive import Archive, ArchiveLimits, ZipMembers, checked_zip

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_LABELS_CSV_BYTES = 64 << 20


@dataclass(frozen=True)
class DatasetLimits:
    max_total_bytes: int = 4 << 30
    max_members: int = 1024
    max_images: int = 100_000
    max_image_pixels: int = 50_000_000
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)


@dataclass(frozen=True)
class DatasetInfo:
    """`num_classes` is known for image datasets with labels; None for arrays (labels are not read)."""

    format: str
    num_samples: int
    tensors: dict[str, dict[str, Any]]
    has_labels: bool
    num_classes: int | None


def detect_format(dataset: Archive, archive: ArchiveLimits = ArchiveLimits()) -> str:
    """Return "npy", "npz" or "images", by magic bytes (and, for zips, by member names)."""
    with _reading(dataset) as fp:
        if _magic(fp) == "npy":
            return "npy"
        with checked_zip(fp, archive, InvalidDataset) as (_, infos):
            return _zip_format(infos)


@contextlib.contextmanager
def _reading(dataset: Archive) -> Iterator[BinaryIO]:
    if not isinstance(dataset, Path):
        yield dataset
        return
    try:
        fp = dataset.open("rb")
    except OSError as exc:
        raise InvalidDataset("The dataset file could not be read; upload it again.") from exc
    with fp:
        yield fp


def _magic(fp: BinaryIO) -> str:
    """ "npy" or "zip" by the file's first bytes; anything else is refused."""
    try:
        fp.seek(0)
        head = fp.read(8)
    except OSError as exc:
        raise InvalidDataset("The dataset file could not be read; upload it again.") from exc
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    raise InvalidDataset(
        "The dataset is neither a .npy array nor a zip (.npz or images); upload a .npz, .npy or .zip file.",
        detail={"magic": head.hex()},
    )


def _zip_format(infos: list[zipfile.ZipInfo]) -> str:
    names = [n for n in (member_name(i.filename) for i in infos) if n and not is_litter(n)]
    return "npz" if names and all(n.endswith(".npy") for n in names) else "images"


def inspect_dataset(
    dataset: Archive, preprocess: dict[str, Any] | None, limits: DatasetLimits = DatasetLimits()
) -> DatasetInfo:
    """Validate the dataset (a path, or a seekable file) and summarise it. `preprocess` is only used
    for images. A zip's central directory is checked against the limits, then parsed once."""
    with service_errors(), _reading(dataset) as fp:
        return _inspect(fp, preprocess, limits)


def _inspect(fp: BinaryIO, preprocess: dict[str, Any] | None, limits: DatasetLimits) -> DatasetInfo:
    size = fp.seek(0, io.SEEK_END)
    if size > limits.max_total_bytes:
        raise _too_large(limits.max_total_bytes)
    if _magic(fp) == "npy":
        return _inspect_npy(fp, size, limits)
    archive = dataclasses.replace(
        limits.archive, max_total_bytes=min(limits.archive.max_total_bytes, limits.max_total_bytes)
    )
    with checked_zip(fp, archive, InvalidDataset) as (members, infos):
        if _zip_format(infos) == "npz":
            return _inspect_npz(members, infos, limits)
        return _inspect_images(members, infos, parse_preprocess(preprocess), limits)


# ----------------------------------------------------------------------------------------------
# Arrays


def _check_data_size(header: NpyHeader, stored: int, what: str) -> None:
    if stored != header.nbytes:
        raise InvalidDataset(
            f"{what} declares {header.dtype.name} {list(header.shape)} ({header.nbytes} bytes) but holds "
            f"{stored} bytes of data; save the array again with numpy.",
            detail={"array": what, "declared_bytes": header.nbytes, "stored_bytes": stored},
        )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The dataset holds more than the limit of {limit} bytes; upload fewer samples.",
        detail={"limit_bytes": limit},
    )


def _inspect_npy(fp: BinaryIO, size: int, limits: DatasetLimits) -> DatasetInfo:
    fp.seek(0)
    header = read_npy_header(fp, "The .npy file")
    _check_data_size(header, size - header.data_offset, "The .npy file")
    if header.nbytes > limits.max_total_bytes:
        raise _too_large(limits.max_total_bytes)
    return _array_info("npy", {SINGLE_INPUT_KEY: header})


def _inspect_npz(members: ZipMembers, infos: list[zipfile.ZipInfo], limits: DatasetLimits) -> DatasetInfo:
    arrays = [(name, i) for i in _stored_order(infos) if (name := member_name(i.filename)) and not is_litter(name)]
    if len(arrays) > limits.max_members:
        raise ResourceLimit(
            f"The .npz holds {len(arrays)} arrays, more than the limit of {limits.max_members}; "
            "keep one array per model input.",
            detail={"arrays": len(arrays), "limit": limits.max_members},
        )
    headers: dict[str, NpyHeader] = {}
    total = 0
    for name, info in arrays:
        key = name.removesuffix(".npy")
        what = f"Array {key!r}"
        with members.open(info) as fp:
            header = read_npy_header(fp, what)
        _check_data_size(header, info.file_size - header.data_offset, what)
        total += header.nbytes
        if total > limits.max_total_bytes:
            raise _too_large(limits.max_total_bytes)
        headers[key] = header
    return _array_info("npz", headers)


def _stored_order(infos: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The file entries in the order their bytes lie in the archive."""
    return sorted((i for i in infos if not i.is_dir()), key=lambda i: i.header_offset)


def _array_info(fmt: str, headers: dict[str, NpyHeader]) -> DatasetInfo:
    labels = headers.get(LABELS_KEY)
    if labels is not None:
        check_labels(labels.shape, labels.dtype.name)
    if not [k for k in headers if k != LABELS_KEY]:
        raise InvalidDataset(
            "The dataset holds no input arrays; save one array per model input, keyed by the input's name.",
            detail={"arrays": sorted(headers)},
        )
    lengths = {k: h.shape[0] for k, h in headers.items() if h.shape}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k!r} has {n}" for k, n in sorted(lengths.items()))
        raise InvalidDataset(
            f"The arrays disagree on the length of axis 0 ({listed}); give every array the same number of samples.",
            detail={"axis0": lengths},
        )
    num_samples = next(iter(lengths.values())) if lengths else 1
    if num_samples == 0:
        raise InvalidDataset(
            "The arrays hold no samples (axis 0 has length 0); upload at least one sample.",
            detail={"axis0": lengths},
        )
    tensors = {k: {"dtype": h.dtype.name, "shape": list(h.shape)} for k, h in headers.items() if k != LABELS_KEY}
    return DatasetInfo(fmt, num_samples, tensors, labels is not None, None)


# ----------------------------------------------------------------------------------------------
# Images


def _inspect_images(
    members: ZipMembers, infos: list[zipfile.ZipInfo], preprocess: dict[str, Any] | None, limits: DatasetLimits
) -> DatasetInfo:
    if preprocess is None:
        raise InvalidDataset(
            "A zip of images needs a `preprocess` JSON (input, size, layout, ...) to become model inputs; "
            "send it with the upload.",
            detail={"field": "preprocess"},
        )
    pp = image_specs.parse_preprocess(preprocess)
    height, width = pp.size
    if height * width > limits.max_image_pixels:
        raise InvalidDataset(
            f"preprocess.size {height}x{width} is more than {limits.max_image_pixels} pixels; use a smaller size.",
            detail={"field": "preprocess.size"},
        )
    files = {name: i for i in infos if not i.is_dir() and (name := member_name(i.filename))}
    index = image_specs.index_images(list(files), lambda entry: _labels_text(members, files[entry]))
    if index.num_samples > limits.max_images:
        raise ResourceLimit(
            f"The zip holds {index.num_samples} images, more than the limit of {limits.max_images}; upload fewer.",
            detail={"images": index.num_samples, "limit": limits.max_images},
        )
    if Image.MAX_IMAGE_PIXELS is None:  # keep Pillow's decompression-bomb guard on
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    for name in sorted(index.members, key=lambda n: files[n].header_offset):  # in the order they are stored
        _check_image(members, files[name], name, limits)
    n = index.num_samples
    return DatasetInfo(
        format="images",
        num_samples=n,
        tensors={pp.input: {"dtype": "float32", "shape": pp.tensor_shape(n)}},
        has_labels=index.labels is not None,
        num_classes=index.num_classes,
    )


def _labels_text(members: ZipMembers, info: zipfile.ZipInfo) -> str:
    if info.file_size > _MAX_LABELS_CSV_BYTES:
        raise InvalidDataset(
            f"labels.csv is larger than {_MAX_LABELS_CSV_BYTES} bytes; keep one short line per image.",
            detail={"entry": info.filename},
        )
    try:
        with members.open(info) as fp:
            return fp.read(info.file_size).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(
            "labels.csv is not UTF-8 text; save it as UTF-8.", detail={"entry": info.filename}
        ) from exc


def _check_image(members: ZipMembers, info: zipfile.ZipInfo, name: str, limits: DatasetLimits) -> None:
    with members.open(info) as fp:
        head = fp.read(8)
        if not (head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC)):
            raise InvalidDataset(
                f"Entry {name!r} is not a JPEG or PNG image; an image zip may hold only images and "
                "labels.csv (and an .npz only .npy arrays).",
                detail={"entry": name},
            )
        fp.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fp, formats=["JPEG", "PNG"]) as img:
                    width, height = img.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise _too_many_pixels(name, limits, "a possible decompression bomb") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidDataset(
                f"Entry {name!r} is not a readable JPEG or PNG image ({exc}); replace it.",
                detail={"entry": name},
            ) from exc
    if width * height > limits.max_image_pixels:
        raise _too_many_pixels(name, limits, f"{width}x{height}")


def _too_many_pixels(name: str, limits: DatasetLimits, size: str) -> ResourceLimit:
    return ResourceLimit(
        f"Image {name!r} declares more than {limits.max_image_pixels} pixels ({size}); resize it.",
        detail={"entry": name, "limit_pixels": limits.max_image_pixels},
    )


# ----------------------------------------------------------------------------------------------
# Preprocess


def parse_preprocess(raw: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The images `preprocess` JSON (a string from the form, or an object), validated by the shared
    rules and with defaults filled in; None when absent."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(
                f"The field preprocess is not valid JSON ({exc.msg} at position {exc.pos}); fix it and upload again.",
                detail={"field": "preprocess"},
            ) from exc
    if not isinstance(raw, dict):
        raise InvalidDataset(
            "The field preprocess must be a JSON object; fix it and upload again.", detail={"field": "preprocess"}
        )
    with service_errors():
        return image_specs.parse_preprocess(raw).to_dict()
