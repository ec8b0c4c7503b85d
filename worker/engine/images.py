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
import posixpath
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from service.contract.formats import ImagePlan, Preprocess, parse_preprocess, plan_images
from worker.engine.data import Batch
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


def _bad(message: str, **detail: Any) -> EngineError:
    return EngineError("invalid_dataset", message, detail)


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


def _planned(source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int) -> tuple[ImagePlan, ImageIndex]:
    """The archive's index and its plan against the inputs (the API's rules, on the real file)."""
    if source.preprocess is None:
        raise _bad("An image dataset needs its preprocess JSON; upload it again with one.", field="preprocess")
    pp = parse_preprocess(source.preprocess)
    index = index_archive(Path(source.path))
    plan = plan_images(pp, index.num_samples, inputs, batch_size).images
    assert plan is not None
    return plan, index


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
    plan, index = _planned(source, inputs, batch_size)
    total = plan.num_feeds if limit is None else min(plan.num_feeds, max(0, limit))
    return _image_batches(source, plan, index, total)


def _image_batches(source: DatasetSource, plan: ImagePlan, index: ImageIndex, total: int) -> Iterator[Batch]:
    dtype = np.dtype(plan.input.dtype)
    rows = plan.rows_per_feed
    with zipfile.ZipFile(Path(source.path)) as zf:
        for i in range(total):
            start = i * (rows or 1)
            names = index.members[start : start + (rows or 1)]
            images = []
            for name in names:
                info = zf.getinfo(name)
                if info.file_size > MAX_IMAGE_BYTES:
                    raise _bad(f"Image '{name}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", file=name)
                images.append(decode_image(zf.read(name), plan.preprocess, name=name, raw=plan.raw))
            arr = np.stack(images) if rows is not None else images[0]
            labels = (
                np.asarray(index.labels[start : start + len(names)], dtype=np.int64)
                if index.labels is not None
                else None
            )
            yield Batch(feeds={plan.input.name: arr.astype(dtype, copy=False)}, labels=labels, num_samples=len(names))
