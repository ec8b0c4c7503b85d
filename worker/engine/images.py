"""`.zip` of JPEG/PNG images as model feeds, decoded one image at a time.

preprocess: {"input": name, "size": [H, W], "layout": "NCHW"|"NHWC", "color": "RGB"|"BGR"|"L",
             "scale": 1/255, "mean": [..] | float, "std": [..] | float}
Each image is EXIF-rotated, converted to the colour mode, resized to (H, W) (bilinear), then
`(pixel * scale - mean) / std`, laid out as asked. Integer inputs get the raw pixel values.
Labels come from a `labels.csv` (`filename,label`) or from class sub-folders (sorted folder
names give the class ids).
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from worker.engine.data import Batch, check_dtype, mismatch
from worker.engine.errors import EngineError
from worker.engine.spec import DatasetSource, TensorSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABELS_FILE = "labels.csv"
# Decompression-bomb guard: PIL warns above this many pixels (an error here) and raises at 2x.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # one member, uncompressed

if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------------------------
# Index of the archive


@dataclass
class ImageIndex:
    """The images of an archive, in feed order, and their class ids (None when unlabelled)."""

    members: list[str]
    labels: list[int] | None
    class_names: list[str] = field(default_factory=list)
    label_source: str | None = None  # "folders" | "labels.csv" | None

    @property
    def num_samples(self) -> int:
        return len(self.members)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    if not base or base.startswith(".") or name.startswith("__MACOSX/") or "/__MACOSX/" in name:
        return False
    return base.lower().endswith(IMAGE_EXTENSIONS)


def _common_dir(paths: Sequence[str]) -> str:
    dirs = [posixpath.dirname(p).split("/") if posixpath.dirname(p) else [] for p in paths]
    if not dirs:
        return ""
    common: list[str] = []
    for parts in zip(*dirs, strict=False):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return "/".join(common)


def _rel(name: str, root: str) -> str:
    return name[len(root) + 1 :] if root else name


def _parse_labels_csv(text: str, members: Sequence[str], root: str) -> tuple[list[int], list[str]]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    by_rel = {_rel(m, root): m for m in members}
    by_base: dict[str, str] = {}
    for m in members:
        by_base.setdefault(posixpath.basename(m), m)
    mapping: dict[str, str] = {}
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise EngineError("invalid_dataset", f"labels.csv line {i + 1} is not 'filename,label'.", {"line": i + 1})
        fname, label = row[0].strip().lstrip("./"), row[1].strip()
        member = by_rel.get(fname) or by_base.get(posixpath.basename(fname))
        if member is None:
            if i == 0:  # a header row such as "filename,label"
                continue
            raise EngineError(
                "invalid_dataset",
                f"labels.csv names '{fname}', which is not an image in the archive.",
                {"file": fname},
            )
        mapping[member] = label
    missing = [m for m in members if m not in mapping]
    if missing:
        raise EngineError(
            "invalid_dataset",
            f"labels.csv gives no label for {len(missing)} image(s), e.g. '{missing[0]}'.",
            {"missing": missing[:20]},
        )
    values = [mapping[m] for m in members]
    try:
        ids = [int(v) for v in values]
        return ids, []
    except ValueError:
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return [index[v] for v in values], names


def index_archive(path: Path) -> ImageIndex:
    """List the images of a .zip (sorted by path) and work out their labels."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise EngineError("invalid_dataset", f"The image archive could not be opened: {exc}", {}) from exc
    with zf:
        infos = zf.infolist()
        members = sorted(i.filename for i in infos if not i.is_dir() and _is_image(i.filename))
        if not members:
            raise EngineError("invalid_dataset", "The archive holds no JPEG or PNG image.", {})
        root = _common_dir(members)
        csv_names = [
            i.filename
            for i in infos
            if posixpath.basename(i.filename).lower() == LABELS_FILE and not i.filename.startswith("__MACOSX/")
        ]
        if csv_names:
            csv_name = min(csv_names, key=lambda n: (n.count("/"), n))
            info = zf.getinfo(csv_name)
            if info.file_size > 64 * 1024 * 1024:
                raise EngineError("invalid_dataset", "labels.csv is too large.", {})
            text = zf.read(csv_name).decode("utf-8-sig", errors="replace")
            labels, names = _parse_labels_csv(text, members, root)
            return ImageIndex(members, labels, names, "labels.csv")
        rels = [_rel(m, root) for m in members]
        if all("/" in r for r in rels):
            classes = [r.split("/", 1)[0] for r in rels]
            names = sorted(set(classes))
            index = {n: i for i, n in enumerate(names)}
            return ImageIndex(members, [index[c] for c in classes], names, "folders")
        return ImageIndex(members, None, [], None)


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class ImagePreprocess:
    input: str
    size: tuple[int, int]  # H, W
    layout: str  # NCHW | NHWC
    color: str  # RGB | BGR | L
    scale: float
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)


def _bad(message: str, **detail: Any) -> EngineError:
    return EngineError("invalid_dataset", message, detail)


def _per_channel(value: Any, channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        return np.repeat(arr, channels)
    if arr.size != channels:
        raise _bad(f"preprocess '{what}' must be one number or {channels} numbers, not {arr.size}.", field=what)
    return arr


def resolve_preprocess(
    preprocess: Mapping[str, Any] | None, inputs: Sequence[TensorSpec]
) -> tuple[ImagePreprocess, TensorSpec]:
    """Validate the preprocess spec against the model input it feeds."""
    pp = dict(preprocess or {})
    name = pp.get("input")
    if name is None:
        if len(inputs) != 1:
            raise _bad(
                "preprocess must name the 'input' the images feed (the model has several inputs).",
                inputs=[s.name for s in inputs],
            )
        name = inputs[0].name
    specs = {s.name: s for s in inputs}
    if name not in specs:
        raise EngineError(
            "dataset_model_mismatch",
            f"The images feed input '{name}', which the model does not have.",
            {"input": name, "inputs": sorted(specs)},
        )
    others = [s.name for s in inputs if s.name != name]
    if others:
        raise EngineError(
            "dataset_model_mismatch",
            f"An image dataset feeds one input but the model also needs {', '.join(others)}; use a .npz.",
            {"input": name, "missing": others},
        )
    spec = specs[name]
    layout = str(pp.get("layout") or "NCHW").upper()
    if layout not in ("NCHW", "NHWC"):
        raise _bad(f"preprocess 'layout' must be NCHW or NHWC, not {layout}.", field="layout")
    color = str(pp.get("color") or "RGB").upper()
    if color in ("GRAY", "GREY", "GRAYSCALE"):
        color = "L"
    if color not in ("RGB", "BGR", "L"):
        raise _bad(f"preprocess 'color' must be RGB, BGR or L, not {color}.", field="color")
    channels = 1 if color == "L" else 3
    rank = len(spec.shape)
    if rank not in (3, 4):
        raise mismatch(spec, (), "image", f"images need an input of rank 4 ({layout}) or 3")
    dims = spec.shape[1:] if rank == 4 else spec.shape
    c_dim, h_dim, w_dim = (dims[0], dims[1], dims[2]) if layout == "NCHW" else (dims[2], dims[0], dims[1])
    size = pp.get("size")
    if size is None:
        if isinstance(h_dim, int) and isinstance(w_dim, int):
            size = (h_dim, w_dim)
        else:
            raise _bad(
                "preprocess needs 'size' [H, W]: the model's input has no fixed height and width.",
                field="size",
            )
    try:
        h, w = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise _bad("preprocess 'size' must be [H, W].", field="size") from exc
    if h <= 0 or w <= 0 or h * w > MAX_IMAGE_PIXELS:
        raise _bad(f"preprocess 'size' {h}x{w} is out of range.", field="size")
    given = (channels, h, w) if layout == "NCHW" else (h, w, channels)
    given_shape = ((1,) if rank == 4 else ()) + given
    if (
        (isinstance(c_dim, int) and c_dim != channels)
        or (isinstance(h_dim, int) and h_dim != h)
        or (isinstance(w_dim, int) and w_dim != w)
    ):
        raise mismatch(
            spec,
            given_shape,
            "float32",
            f"the preprocessed images ({layout}, {color}, {h}x{w}) do not have the input's shape",
        )
    check_dtype(spec, np.dtype("float32") if np.dtype(spec.dtype).kind == "f" else np.dtype("uint8"), given_shape)
    scale = float(pp["scale"]) if pp.get("scale") is not None else 1.0 / 255.0
    mean = _per_channel(pp.get("mean") if pp.get("mean") is not None else 0.0, channels, "mean")
    std = _per_channel(pp.get("std") if pp.get("std") is not None else 1.0, channels, "std")
    if np.any(std == 0):
        raise _bad("preprocess 'std' must not be 0.", field="std")
    return ImagePreprocess(name, (h, w), layout, color, scale, mean, std), spec


def decode_image(data: bytes, pp: ImagePreprocess, *, name: str = "image", raw: bool = False) -> np.ndarray:
    """One encoded image -> (C,H,W) or (H,W,C) float32 (uint8 when `raw`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                if opened.format not in ("JPEG", "PNG", "MPO"):
                    raise ValueError(f"unsupported image format {opened.format}")
                side = max(pp.size)
                opened.draft("RGB" if pp.color != "L" else "L", (side, side))
                img: Image.Image = ImageOps.exif_transpose(opened)
                img = img.convert("L" if pp.color == "L" else "RGB")
                img = img.resize((pp.size[1], pp.size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bad(f"Image '{name}' is too large to decode safely.", file=name) from exc
    except Exception as exc:  # any decoding failure is a bad dataset
        raise _bad(f"Image '{name}' could not be decoded: {exc}", file=name) from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pp.color == "BGR":
        pixels = pixels[:, :, ::-1]
    if raw:
        out: np.ndarray = pixels
    else:
        out = (pixels.astype(np.float32) * np.float32(pp.scale) - pp.mean) / pp.std
    if pp.layout == "NCHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# Feeds


def _rows_per_feed(spec: TensorSpec, batch_size: int) -> int | None:
    """Images per feed; None when the input has no batch axis (rank 3: one image per feed)."""
    if len(spec.shape) == 3:
        return None
    lead = spec.shape[0]
    return int(lead) if isinstance(lead, int) and lead > 0 else max(1, int(batch_size))


def _feed_count(n_images: int, spec: TensorSpec, batch_size: int) -> int:
    rows = _rows_per_feed(spec, batch_size)
    if rows is None:
        return n_images
    if isinstance(spec.shape[0], int):  # fixed batch: the remainder cannot be fed
        return n_images // rows
    return math.ceil(n_images / rows)


def image_rows_per_feed(source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1) -> int:
    _, spec = resolve_preprocess(source.preprocess, inputs)
    return _rows_per_feed(spec, batch_size) or 1


def _indexed(
    source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int
) -> tuple[ImagePreprocess, TensorSpec, ImageIndex, int]:
    """(preprocess, the input it feeds, the archive's index, number of feeds); at least one feed."""
    pp, spec = resolve_preprocess(source.preprocess, inputs)
    index = index_archive(Path(source.path))
    total = _feed_count(index.num_samples, spec, batch_size)
    if total == 0:
        raise mismatch(
            spec,
            (index.num_samples,),
            "image",
            f"{index.num_samples} image(s) cannot fill one batch of the input's fixed size",
        )
    return pp, spec, index, total


def count_image_batches(
    source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1, limit: int | None = None
) -> int:
    n = _indexed(source, inputs, batch_size)[3]
    return n if limit is None else min(n, max(0, limit))


def iter_image_batches(
    source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1, limit: int | None = None
) -> Iterator[Batch]:
    pp, spec, index, total = _indexed(source, inputs, batch_size)
    if limit is not None:
        total = min(total, max(0, limit))
    return _image_batches(source, pp, spec, index, total, batch_size)


def _image_batches(
    source: DatasetSource,
    pp: ImagePreprocess,
    spec: TensorSpec,
    index: ImageIndex,
    total: int,
    batch_size: int,
) -> Iterator[Batch]:
    dtype = np.dtype(spec.dtype)
    raw = dtype.kind != "f"
    rows = _rows_per_feed(spec, batch_size)
    with zipfile.ZipFile(Path(source.path)) as zf:
        for i in range(total):
            start = i * (rows or 1)
            names = index.members[start : start + (rows or 1)]
            images = []
            for name in names:
                info = zf.getinfo(name)
                if info.file_size > MAX_IMAGE_BYTES:
                    raise _bad(f"Image '{name}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", file=name)
                images.append(decode_image(zf.read(name), pp, name=name, raw=raw))
            arr = np.stack(images) if rows is not None else images[0]
            labels = (
                np.asarray(index.labels[start : start + len(names)], dtype=np.int64)
                if index.labels is not None
                else None
            )
            yield Batch(feeds={spec.name: arr.astype(dtype, copy=False)}, labels=labels, num_samples=len(names))
