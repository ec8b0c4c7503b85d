"""Image-zip datasets: the `preprocess` spec, which entries of an archive are images, and their labels
(class folders or labels.csv)."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from core.errors import RuleError

MAX_IMAGE_SIDE = 16_384
PREPROCESS_KEYS = ("input", "size", "layout", "color", "scale", "mean", "std")

# --------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a tensor: resized to `size` (H, W), converted to `color`,
    `(pixel * scale - mean) / std` per channel, laid out as `layout`."""

    input: str
    size: tuple[int, int]
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    def tensor_shape(self, n: int) -> list[int]:
        h, w = self.size
        return [n, self.channels, h, w] if self.layout == "NCHW" else [n, h, w, self.channels]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k in PREPROCESS_KEYS if (v := getattr(self, k)) is not None
        }


def parse_preprocess(raw: Mapping[str, Any]) -> Preprocess:
    """The images `preprocess` JSON object, checked, with defaults filled in."""
    unknown = sorted(set(raw) - set(PREPROCESS_KEYS))
    if unknown:
        raise _bad_preprocess(unknown[0], f"is not a known field (known: {', '.join(PREPROCESS_KEYS)})")
    name = raw.get("input")
    if not isinstance(name, str) or not name:
        raise _bad_preprocess("input", "must be the name of the model input the images feed")
    size = raw.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_IMAGE_SIDE for s in size)
    ):
        raise _bad_preprocess("size", f"must be [height, width], two integers from 1 to {MAX_IMAGE_SIDE}")
    layout = str(raw.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise _bad_preprocess("layout", "must be NCHW or NHWC")
    color = str(raw.get("color", "RGB")).upper()
    color = "L" if color in ("GRAY", "GREY", "GRAYSCALE") else color
    if color not in ("RGB", "BGR", "L"):
        raise _bad_preprocess("color", "must be RGB, BGR or L (grayscale)")
    channels = 1 if color == "L" else 3
    scale = raw.get("scale", 1.0 / 255.0)
    if not _is_number(scale) or not scale > 0:
        raise _bad_preprocess("scale", "must be a positive number such as 0.00392 (1/255)")
    mean = _per_channel(raw.get("mean", 0.0), channels, "mean", positive=False)
    std = _per_channel(raw.get("std", 1.0), channels, "std", positive=True)
    return Preprocess(name, (int(size[0]), int(size[1])), layout, color, float(scale), mean, std)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _per_channel(value: object, channels: int, name: str, *, positive: bool) -> tuple[float, ...]:
    values = [value] * channels if _is_number(value) else value
    if not isinstance(values, list | tuple) or len(values) != channels or not all(_is_number(v) for v in values):
        raise _bad_preprocess(name, f"must be one number or a list of {channels}, one per colour channel")
    if positive and not all(float(v) > 0 for v in values):
        raise _bad_preprocess(name, "must hold positive numbers")
    return tuple(float(v) for v in values)


def _bad_preprocess(name: str, problem: str) -> RuleError:
    return RuleError(
        "invalid_dataset",
        f"The field preprocess.{name} {problem}; fix it and upload again.",
        {"field": f"preprocess.{name}"},
    )


# --------------------------------------------------------------------------------------------
# Image archives: which entries are images, and their labels


@dataclass(frozen=True)
class ImageIndex:
    """The images of an archive in feed order (sorted names), and their class ids (None when
    unlabelled): ids from class folders (sorted folder names) or from `labels.csv`."""

    members: tuple[str, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] = ()
    label_source: str | None = None  # "folders" | "labels.csv" | None

    @property
    def num_samples(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else max(self.labels) + 1


def member_name(name: str) -> str | None:
    """A zip entry's name as a normalised relative POSIX path, or None when it is a directory or
    unsafe (empty, absolute, a drive letter, a `..` component, a backslash, a control character)."""
    if not name or name.endswith("/"):
        return None
    if "\\" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return None
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return str(PurePosixPath(*parts))


def is_litter(name: str) -> bool:
    """macOS and editor litter that archivers add: __MACOSX/, .DS_Store, ._resource forks."""
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def index_images(entries: Sequence[str], read_text: Callable[[str], str]) -> ImageIndex:
    """Index an image archive from its file entries (safe names, see `member_name`): every entry
    but litter and `labels.csv` is an image. `read_text(entry)` gives labels.csv's text."""
    files = sorted(n for n in entries if not is_litter(n))
    csvs = [n for n in files if PurePosixPath(n).name == LABELS_CSV]
    images = [n for n in files if PurePosixPath(n).name != LABELS_CSV]
    if len(csvs) > 1:
        raise _bad_images(f"The zip holds {len(csvs)} labels.csv files; keep one.", entries=csvs)
    if not images:
        raise _bad_images("The zip holds no images; add JPEG or PNG files.")
    if csvs:
        return _labels_from_csv(csvs[0], read_text(csvs[0]), images)
    return _labels_from_folders(images)


LABELS_CSV = "labels.csv"
_INT_LABEL = re.compile(r"[+-]?\d+")
_CSV_HEADERS = ("filename", "file", "image", "path", "name")


def _bad_images(message: str, **detail: Any) -> RuleError:
    return RuleError("invalid_dataset", message, detail)


def _labels_from_folders(images: list[str]) -> ImageIndex:
    """ImageFolder-style: the first folder level below any common wrapper folder is the class."""
    parts = [PurePosixPath(n).parts for n in images]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    relative = [p[depth:] for p in parts]
    if all(len(r) == 1 for r in relative):
        return ImageIndex(tuple(images), None)
    loose = next((n for n, r in zip(images, relative, strict=True) if len(r) == 1), None)
    if loose is not None:
        raise _bad_images(
            f"Image {loose!r} is outside any class folder while other images are in class folders; "
            "put every image in a class folder, or none and add labels.csv.",
            entry=loose,
        )
    classes = sorted({r[0] for r in relative})
    ids = {c: i for i, c in enumerate(classes)}
    return ImageIndex(tuple(images), tuple(ids[r[0]] for r in relative), tuple(classes), "folders")


def _labels_from_csv(entry: str, text: str, images: list[str]) -> ImageIndex:
    folder = PurePosixPath(entry).parent
    by_path: dict[str, str] = {}
    by_base: dict[str, list[str]] = {}
    for image in images:
        path = PurePosixPath(image)
        if folder == PurePosixPath("."):
            by_path[image] = image
        elif folder in path.parents:
            by_path[str(path.relative_to(folder))] = image
        by_base.setdefault(path.name, []).append(image)
    labels: dict[str, str] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if line_no == 1 and row[0].strip().lower() in _CSV_HEADERS:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise _bad_images(
                f"Line {line_no} of labels.csv is not `filename,label`; write one image and its label per line.",
                entry=entry,
                line=line_no,
            )
        key = member_name(row[0].strip()) or ""
        match = by_path.get(key)
        if match is None and len(by_base.get(key, [])) == 1:
            match = by_base[key][0]
        if match is None:
            raise _bad_images(
                f"Line {line_no} of labels.csv names {row[0].strip()!r}, which is not an image in the zip; "
                "fix the file name.",
                entry=entry,
                line=line_no,
                file_name=row[0].strip(),
            )
        if match in labels:
            raise _bad_images(
                f"labels.csv labels {match!r} twice (line {line_no}); keep one line per image.",
                entry=entry,
                line=line_no,
                file_name=match,
            )
        labels[match] = row[1].strip()
    missing = [i for i in images if i not in labels]
    if missing:
        raise _bad_images(
            f"Image {missing[0]!r} has no line in labels.csv ({len(missing)} of {len(images)} images "
            "lack one); label every image.",
            entry=missing[0],
            unlabelled=len(missing),
        )
    values = [labels[i] for i in images]
    if all(_INT_LABEL.fullmatch(v) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise _bad_images("labels.csv has a negative class id; use ids from 0 or class names.", entry=entry)
        return ImageIndex(tuple(images), tuple(ids), (), "labels.csv")
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return ImageIndex(tuple(images), tuple(index[v] for v in values), tuple(classes), "labels.csv")
