"""Validation and summary of an uploaded dataset (.npz, .npy, zip of images) from headers only.

No array is ever loaded and no image decoded: `.npy` headers and image headers are read from
the stream and checked against the real sizes and the limits before anything is allocated.

`num_samples` is the length of axis 0 shared by the non-scalar arrays: for arrays stacked on a
new leading axis that is the number of samples, for arrays split into batches it is the number
of rows. A dataset of rank-0 arrays only has one sample. In `tensors`, a `.npy` file is keyed
`"*"`, meaning "the model's only input"; shapes are as stored, axis 0 included.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from numpy.lib import format as npformat
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidDataset, PayloadTooLarge, ResourceLimit
from service.inspection.archive import ArchiveLimits, checked_zip, safe_member_name

LABELS_KEY = "__labels__"
SINGLE_INPUT_KEY = "*"
LABELS_CSV = "labels.csv"

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_HEADER_SIZE = 1 << 16
_MAX_LABELS_CSV_BYTES = 64 << 20
_MAX_IMAGE_SIDE = 16_384
_ALLOWED_KINDS = "biufc"  # bool, ints, floats, complex: what ONNX tensors can hold
_PREPROCESS_KEYS = ("input", "size", "layout", "color", "scale", "mean", "std")


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


def detect_format(path: Path, archive: ArchiveLimits = ArchiveLimits()) -> str:
    """Return "npy", "npz" or "images", by magic bytes (and, for zips, by member names)."""
    if _magic(path) == "npy":
        return "npy"
    with checked_zip(path, archive, InvalidDataset) as (_, infos):
        return _zip_format(infos)


def _magic(path: Path) -> str:
    """ "npy" or "zip" by the file's first bytes; anything else is refused."""
    try:
        with open(path, "rb") as fp:
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
    names = [n for n in (safe_member_name(i.filename) for i in infos) if n and not _ignored(n)]
    return "npz" if names and all(n.endswith(".npy") for n in names) else "images"


def inspect_dataset(
    path: Path, preprocess: dict[str, Any] | None, limits: DatasetLimits = DatasetLimits()
) -> DatasetInfo:
    """Validate the dataset at `path` and summarise it. `preprocess` is only used for images.
    A zip's central directory is checked against the limits, then parsed once."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_total_bytes:
        raise _too_large(limits.max_total_bytes)
    if _magic(path) == "npy":
        return _inspect_npy(path, limits)
    archive = dataclasses.replace(
        limits.archive, max_total_bytes=min(limits.archive.max_total_bytes, limits.max_total_bytes)
    )
    with checked_zip(path, archive, InvalidDataset) as (zf, infos):
        if _zip_format(infos) == "npz":
            return _inspect_npz(zf, infos, limits)
        return _inspect_images(zf, infos, parse_preprocess(preprocess), limits)


# ----------------------------------------------------------------------------------------------
# Arrays


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    data_offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(fp: IO[bytes], what: str) -> _Header:
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=_MAX_HEADER_SIZE)
        elif version == (2, 0):
            shape, _fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=_MAX_HEADER_SIZE)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        offset = fp.tell()
    except Exception as exc:  # numpy's header parser raises many types (TokenError, RecursionError, ...)
        raise InvalidDataset(
            f"{what} is not a valid .npy array ({str(exc).strip()[:200]}); save it with numpy.save or numpy.savez.",
            detail={"array": what},
        ) from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in _ALLOWED_KINDS:
        raise InvalidDataset(
            f"{what} has dtype {dtype}, which needs pickling or is not numeric; save plain numeric arrays.",
            detail={"array": what, "dtype": str(dtype)},
        )
    if any(d < 0 for d in shape):
        raise InvalidDataset(
            f"{what} declares the negative shape {list(shape)}; save it again.",
            detail={"array": what, "shape": list(shape)},
        )
    return _Header(tuple(int(d) for d in shape), dtype, int(offset))


def _check_data_size(header: _Header, stored: int, what: str) -> None:
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


def _inspect_npy(path: Path, limits: DatasetLimits) -> DatasetInfo:
    with open(path, "rb") as fp:
        header = _read_header(fp, "The .npy file")
    _check_data_size(header, path.stat().st_size - header.data_offset, "The .npy file")
    if header.nbytes > limits.max_total_bytes:
        raise _too_large(limits.max_total_bytes)
    return _array_info("npy", {SINGLE_INPUT_KEY: header})


def _inspect_npz(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: DatasetLimits) -> DatasetInfo:
    members = [
        (name, i) for i in infos if not i.is_dir() and (name := safe_member_name(i.filename)) and not _ignored(name)
    ]
    if len(members) > limits.max_members:
        raise ResourceLimit(
            f"The .npz holds {len(members)} arrays, more than the limit of {limits.max_members}; "
            "keep one array per model input.",
            detail={"arrays": len(members), "limit": limits.max_members},
        )
    headers: dict[str, _Header] = {}
    total = 0
    for name, info in members:
        key = name.removesuffix(".npy")
        what = f"Array {key!r}"
        with zf.open(info) as fp:
            header = _read_header(fp, what)
        _check_data_size(header, info.file_size - header.data_offset, what)
        total += header.nbytes
        if total > limits.max_total_bytes:
            raise _too_large(limits.max_total_bytes)
        headers[key] = header
    return _array_info("npz", headers)


def _array_info(fmt: str, headers: dict[str, _Header]) -> DatasetInfo:
    labels = headers.get(LABELS_KEY)
    if labels is not None and (len(labels.shape) != 1 or labels.dtype.kind not in "iu"):
        raise InvalidDataset(
            f"{LABELS_KEY!r} is {labels.dtype.name} {list(labels.shape)} but must be a 1-D integer array "
            "of class ids; save it as numpy int64 of shape (N,).",
            detail={"array": LABELS_KEY, "dtype": labels.dtype.name, "shape": list(labels.shape)},
        )
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


def _ignored(name: str) -> bool:
    """macOS and editor litter that archivers add: __MACOSX/, .DS_Store, ._resource forks."""
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


# ----------------------------------------------------------------------------------------------
# Images


def _inspect_images(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], preprocess: dict[str, Any] | None, limits: DatasetLimits
) -> DatasetInfo:
    if preprocess is None:
        raise InvalidDataset(
            "A zip of images needs a `preprocess` JSON (input, size, layout, ...) to become model inputs; "
            "send it with the upload.",
            detail={"field": "preprocess"},
        )
    height, width = preprocess["size"]
    if height * width > limits.max_image_pixels:
        raise InvalidDataset(
            f"preprocess.size {height}x{width} is more than {limits.max_image_pixels} pixels; use a smaller size.",
            detail={"field": "preprocess.size"},
        )
    files = [
        (name, i) for i in infos if not i.is_dir() and (name := safe_member_name(i.filename)) and not _ignored(name)
    ]
    csvs = [(n, i) for n, i in files if PurePosixPath(n).name == LABELS_CSV]
    images = [(n, i) for n, i in files if PurePosixPath(n).name != LABELS_CSV]
    if len(csvs) > 1:
        raise InvalidDataset(
            f"The zip holds {len(csvs)} labels.csv files; keep one.", detail={"entries": [n for n, _ in csvs]}
        )
    if not images:
        raise InvalidDataset("The zip holds no images; add JPEG or PNG files.")
    if len(images) > limits.max_images:
        raise ResourceLimit(
            f"The zip holds {len(images)} images, more than the limit of {limits.max_images}; upload fewer.",
            detail={"images": len(images), "limit": limits.max_images},
        )
    if Image.MAX_IMAGE_PIXELS is None:  # keep Pillow's decompression-bomb guard on
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    num_classes: int | None
    for name, info in images:
        _check_image(zf, info, name, limits)
    if csvs:
        labels, num_classes = _labels_from_csv(zf, csvs[0], [n for n, _ in images])
    else:
        labels, num_classes = _labels_from_folders([n for n, _ in images])
    n = len(images)
    layout = preprocess["layout"]
    shape = [n, 3, height, width] if layout == "NCHW" else [n, height, width, 3]
    return DatasetInfo(
        format="images",
        num_samples=n,
        tensors={preprocess["input"]: {"dtype": "float32", "shape": shape}},
        has_labels=labels,
        num_classes=num_classes,
    )


def _check_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: DatasetLimits) -> None:
    with zf.open(info) as fp:
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


def _labels_from_folders(names: list[str]) -> tuple[bool, int | None]:
    """ImageFolder-style: the first folder level below any common wrapper folder is the class."""
    parts = [PurePosixPath(n).parts for n in names]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    relative = [p[depth:] for p in parts]
    if all(len(r) == 1 for r in relative):
        return False, None
    loose = next((n for n, r in zip(names, relative, strict=True) if len(r) == 1), None)
    if loose is not None:
        raise InvalidDataset(
            f"Image {loose!r} is outside any class folder while other images are in class folders; "
            "put every image in a class folder, or none and add labels.csv.",
            detail={"entry": loose},
        )
    return True, len({r[0] for r in relative})


_INT = re.compile(r"[+-]?\d+")


def _labels_from_csv(zf: zipfile.ZipFile, entry: tuple[str, zipfile.ZipInfo], images: list[str]) -> tuple[bool, int]:
    name, info = entry
    if info.file_size > _MAX_LABELS_CSV_BYTES:
        raise InvalidDataset(
            f"labels.csv is larger than {_MAX_LABELS_CSV_BYTES} bytes; keep one short line per image.",
            detail={"entry": name},
        )
    try:
        text = zf.read(info).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidDataset("labels.csv is not UTF-8 text; save it as UTF-8.", detail={"entry": name}) from exc
    folder = PurePosixPath(name).parent
    by_path: dict[str, str] = {}
    by_base: dict[str, list[str]] = {}
    for image in images:
        path = PurePosixPath(image)
        if folder != PurePosixPath(".") and folder in path.parents:
            by_path[str(path.relative_to(folder))] = image
        elif folder == PurePosixPath("."):
            by_path[image] = image
        by_base.setdefault(path.name, []).append(image)
    labels: dict[str, str] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if line_no == 1 and row[0].strip().lower() in ("filename", "file", "image", "path", "name"):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InvalidDataset(
                f"Line {line_no} of labels.csv is not `filename,label`; write one image and its label per line.",
                detail={"entry": name, "line": line_no},
            )
        key = safe_member_name(row[0].strip()) or ""
        match = by_path.get(key)
        if match is None and len(by_base.get(key, [])) == 1:
            match = by_base[key][0]
        if match is None:
            raise InvalidDataset(
                f"Line {line_no} of labels.csv names {row[0].strip()!r}, which is not an image in the zip; "
                "fix the file name.",
                detail={"entry": name, "line": line_no, "file_name": row[0].strip()},
            )
        if match in labels:
            raise InvalidDataset(
                f"labels.csv labels {match!r} twice (line {line_no}); keep one line per image.",
                detail={"entry": name, "line": line_no, "file_name": match},
            )
        labels[match] = row[1].strip()
    missing = [i for i in images if i not in labels]
    if missing:
        raise InvalidDataset(
            f"Image {missing[0]!r} has no line in labels.csv ({len(missing)} of {len(images)} images "
            "lack one); label every image.",
            detail={"entry": missing[0], "unlabelled": len(missing)},
        )
    values = list(labels.values())
    if all(_INT.fullmatch(v) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise InvalidDataset(
                "labels.csv has a negative class id; use ids from 0 or class names.", detail={"entry": name}
            )
        return True, max(ids) + 1
    return True, len(set(values))


# ----------------------------------------------------------------------------------------------
# Preprocess


def parse_preprocess(raw: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The images `preprocess` JSON, validated and with defaults filled in; None when absent."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _bad("preprocess", f"is not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(raw, dict):
        raise _bad("preprocess", "must be a JSON object")
    unknown = sorted(set(raw) - set(_PREPROCESS_KEYS))
    if unknown:
        raise _bad(f"preprocess.{unknown[0]}", f"is not a known field (known: {', '.join(_PREPROCESS_KEYS)})")
    name = raw.get("input")
    if not isinstance(name, str) or not name:
        raise _bad("preprocess.input", "must be the name of the model input the images feed")
    size = raw.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= _MAX_IMAGE_SIDE for s in size)
    ):
        raise _bad("preprocess.size", f"must be [height, width], two integers from 1 to {_MAX_IMAGE_SIDE}")
    layout = str(raw.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise _bad("preprocess.layout", "must be NCHW or NHWC")
    color = str(raw.get("color", "RGB")).upper()
    if color not in ("RGB", "BGR"):
        raise _bad("preprocess.color", "must be RGB or BGR")
    scale = raw.get("scale", 1.0 / 255.0)
    if not _is_number(scale) or not scale > 0:
        raise _bad("preprocess.scale", "must be a positive number such as 0.00392 (1/255)")
    mean = _triple(raw.get("mean", [0.0, 0.0, 0.0]), "preprocess.mean", positive=False)
    std = _triple(raw.get("std", [1.0, 1.0, 1.0]), "preprocess.std", positive=True)
    return {
        "input": name,
        "size": [int(size[0]), int(size[1])],
        "layout": layout,
        "color": color,
        "scale": float(scale),
        "mean": mean,
        "std": std,
    }


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _triple(value: object, field: str, *, positive: bool) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise _bad(field, "must be a list of three numbers, one per colour channel")
    if positive and not all(v > 0 for v in value):
        raise _bad(field, "must hold three positive numbers")
    return [float(v) for v in value]


def _bad(field: str, problem: str) -> InvalidDataset:
    return InvalidDataset(f"The field {field} {problem}; fix it and upload again.", detail={"field": field})
