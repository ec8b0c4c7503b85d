"""`.zip` of JPEG/PNG images as model feeds, decoded one image at a time.

preprocess: {"input": name, "size": [H, W], "layout": "NCHW"|"NHWC", "color": "RGB"|"BGR"|"L",
             "scale": 1/255, "mean": [..] | float, "std": [..] | float}
Each image is EXIF-rotated, converted to the colour mode, resized to (H, W) (bilinear), then
`(pixel * scale - mean) / std`, laid out as asked. Integer inputs get the raw pixel values.
Labels come from a `labels.csv` (`filename,label`) or from class sub-folders (sorted folder
names give the class ids).
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from core.datasets import ImagePlan, plan_images
from core.errors import RuleError
from core.images import ImageIndex, Preprocess, index_images, member_name, parse_preprocess
from core.jobfile import DatasetSource
from core.model import TensorSpec
from worker.engine.batch import Batch
from worker.engine.plans import plan_key, planned

MAX_LABELS_CSV_BYTES = 64 * 1024 * 1024
# Decompression-bomb guard: PIL warns above this many pixels (an error here) and raises at 2x.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # one member, uncompressed

if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------------------------
# Index of the archive


def index_archive(path: Path) -> tuple[ImageIndex, dict[str, zipfile.ZipInfo]]:
    """The images of a .zip in feed order with their labels (the rules the API applied at upload),
    and each image's zip entry."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise RuleError("invalid_dataset", f"The image archive could not be opened: {exc}", {}) from exc
    with zf:
        infos = {name: i for i in zf.infolist() if not i.is_dir() and (name := member_name(i.filename))}

        def read_text(entry: str) -> str:
            info = infos[entry]
            if info.file_size > MAX_LABELS_CSV_BYTES:
                raise _bad("labels.csv is too large.", entry=entry)
            return zf.read(info).decode("utf-8-sig", errors="replace")

        index = index_images(list(infos), read_text)
    return index, infos


# --------------------------------------------------------------------------------------------
# Preprocessing


def _bad(message: str, **detail: Any) -> RuleError:
    return RuleError("invalid_dataset", message, detail)


def decode_image(data: bytes, pp: Preprocess, *, name: str = "image", raw: bool = False) -> np.ndarray:
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
        mean = np.asarray(pp.mean, dtype=np.float32)
        std = np.asarray(pp.std, dtype=np.float32)
        out = (pixels.astype(np.float32) * np.float32(pp.scale) - mean) / std
    if pp.layout == "NCHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# Feeds


def _planned(
    source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int
) -> tuple[ImagePlan, ImageIndex, dict[str, zipfile.ZipInfo]]:
    """The archive's index and its plan against the inputs (the API's rules, on the real file)."""
    if source.preprocess is None:
        raise _bad("An image dataset needs its preprocess JSON; upload it again with one.", field="preprocess")
    pp = parse_preprocess(source.preprocess)

    def make() -> tuple[ImagePlan, ImageIndex, dict[str, zipfile.ZipInfo]]:
        index, infos = index_archive(Path(source.path))
        plan = plan_images(pp, index.num_samples, inputs, batch_size).images
        assert plan is not None
        return plan, index, infos

    return planned(plan_key(source, inputs, batch_size), make)


def image_rows_per_feed(source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1) -> int:
    return _planned(source, inputs, batch_size)[0].rows_per_feed or 1


def count_image_batches(
    source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1, limit: int | None = None
) -> int:
    n = _planned(source, inputs, batch_size)[0].num_feeds
    return n if limit is None else min(n, max(0, limit))


def iter_image_batches(
    source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1, limit: int | None = None
) -> Iterator[Batch]:
    plan, index, infos = _planned(source, inputs, batch_size)
    total = plan.num_feeds if limit is None else min(plan.num_feeds, max(0, limit))
    return _image_batches(source, plan, index, infos, total)


def _image_batches(
    source: DatasetSource, plan: ImagePlan, index: ImageIndex, infos: dict[str, zipfile.ZipInfo], total: int
) -> Iterator[Batch]:
    dtype = np.dtype(plan.input.dtype)
    rows = plan.rows_per_feed
    with zipfile.ZipFile(Path(source.path)) as zf:
        for i in range(total):
            start = i * (rows or 1)
            names = index.members[start : start + (rows or 1)]
            images = []
            for name in names:
                info = infos[name]
                if info.file_size > MAX_IMAGE_BYTES:
                    raise _bad(f"Image '{name}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", file=name)
                images.append(decode_image(zf.read(info), plan.preprocess, name=name, raw=plan.raw))
            arr = np.stack(images) if rows is not None else images[0]
            labels = (
                np.asarray(index.labels[start : start + len(names)], dtype=np.int64)
                if index.labels is not None
                else None
            )
            yield Batch(feeds={plan.input.name: arr.astype(dtype, copy=False)}, labels=labels, num_samples=len(names))
