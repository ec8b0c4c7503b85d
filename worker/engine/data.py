"""Datasets as model feeds: `.npz`, `.npy` and `.zip` of images, streamed one feed at a time.

The forms (see the HTTP contract):
- an array whose rank is the input's rank + 1 holds N samples stacked on a new leading axis,
  each fed as is (works for inputs whose batch axis is not first, and for scalar inputs);
- an array whose rank equals the input's rank is split along axis 0 into batches of
  `batch_size` rows (or of the input's fixed leading dimension when it has one);
- a rank-0 array (for a scalar input) is fed unchanged with every sample;
- `__labels__` (N,) int class ids, optional.

Nothing here loads a whole array: `.npz` members are read row by row from the zip stream,
`.npy` files are memory-mapped. Pickled (object) arrays are refused.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, cast

import numpy as np
from numpy.lib import format as npformat

from core.datasets import LABELS_KEY, SINGLE_INPUT_KEY, DatasetPlan, Form, check_labels, plan_arrays
from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import TensorSpec, is_fixed
from core.npy import NpyHeader, read_npy_header
from worker.engine.batch import Batch
from worker.engine.checks import model_facts
from worker.engine.images import count_image_batches, image_rows_per_feed, iter_image_batches
from worker.engine.plans import PLANS, plan_key, planned

# --------------------------------------------------------------------------------------------
# Model inputs


def model_inputs(model_path: Path) -> list[TensorSpec]:
    """The graph inputs that are not initializers, in graph order."""
    return list(model_facts(model_path).inputs)


# --------------------------------------------------------------------------------------------
# Array readers (header first, rows streamed)


class _ArrayReader:
    """Sequential access to the rows (axis 0) of one stored array."""

    header: NpyHeader

    def rows(self, start: int, count: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def whole(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ZipMemberReader(_ArrayReader):
    """Reads rows of a .npy member of a zip (.npz) in order, decompressing as it goes."""

    def __init__(self, zf: zipfile.ZipFile, member: str, what: str) -> None:
        self._zf = zf
        self._member = member
        self._what = what
        self._fp: IO[bytes] | None = zf.open(member)
        self.header = read_npy_header(self._fp, what)
        self._pos = 0  # next row in the stream
        self._row_shape = self.header.shape[1:]
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.header.dtype.itemsize
        self._full: np.ndarray | None = None

    def _load_full(self) -> np.ndarray:
        if self._full is None:
            with self._zf.open(self._member) as fp:
                self._full = npformat.read_array(fp, allow_pickle=False)
        return self._full

    def whole(self) -> np.ndarray:
        if self.header.fortran_order or not self.header.shape:
            return np.asarray(self._load_full())
        assert self._fp is not None
        data = self._fp.read(int(np.prod(self.header.shape, dtype=np.int64)) * self.header.dtype.itemsize)
        return np.frombuffer(data, dtype=self.header.dtype).reshape(self.header.shape)

    def rows(self, start: int, count: int) -> np.ndarray:
        if self.header.fortran_order:
            return np.ascontiguousarray(self._load_full()[start : start + count])
        assert self._fp is not None
        if start < self._pos:  # rewind (not used by iter_batches, kept correct anyway)
            self._fp.close()
            self._fp = self._zf.open(self._member)
            read_npy_header(self._fp, self._what)
            self._pos = 0
        if start > self._pos:
            self._skip((start - self._pos) * self._row_bytes)
            self._pos = start
        want = count * self._row_bytes
        data = self._fp.read(want)
        if len(data) != want:
            raise RuleError("invalid_dataset", f"{self._what} is truncated.", {"array": self._what})
        self._pos += count
        return np.frombuffer(data, dtype=self.header.dtype).reshape((count, *self._row_shape))

    def _skip(self, nbytes: int) -> None:
        assert self._fp is not None
        while nbytes > 0:
            chunk = self._fp.read(min(nbytes, 1 << 20))
            if not chunk:
                raise RuleError("invalid_dataset", f"{self._what} is truncated.", {"array": self._what})
            nbytes -= len(chunk)

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
            self._fp = None
        self._full = None


class _NpyReader(_ArrayReader):
    """Rows of a .npy file through a read-only memory map."""

    def __init__(self, path: Path, what: str) -> None:
        try:
            with open(path, "rb") as fp:
                self.header = read_npy_header(fp, what)
        except OSError as exc:
            raise RuleError("invalid_dataset", f"{what} could not be read: {exc}", {"array": what}) from exc
        try:
            self._arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise RuleError("invalid_dataset", f"{what} could not be read: {exc}", {"array": what}) from exc

    def whole(self) -> np.ndarray:
        return np.asarray(self._arr)

    def rows(self, start: int, count: int) -> np.ndarray:
        return np.ascontiguousarray(self._arr[start : start + count])

    def close(self) -> None:
        self._arr = None


# --------------------------------------------------------------------------------------------
# An opened array dataset, planned by the shared rules


class _Opened:
    """An opened array dataset: a reader per array, planned against the inputs by the shared rules."""

    def __init__(self, source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int) -> None:
        self.readers: dict[str, _ArrayReader] = {}  # by array name
        self.labels_reader: _ArrayReader | None = None
        self._zf: zipfile.ZipFile | None = None
        try:
            self._open(source)
            self.labels_reader = self.readers.pop(LABELS_KEY, None)
            self.plan = planned(plan_key(source, inputs, batch_size), lambda: self._plan(inputs, batch_size))
            if SINGLE_INPUT_KEY in self.readers:
                self.readers = {inputs[0].name: self.readers[SINGLE_INPUT_KEY]}
        except BaseException:
            self.close()
            raise

    def _plan(self, inputs: Sequence[TensorSpec], batch_size: int) -> DatasetPlan:
        labels = self.labels_reader
        if labels is not None:
            check_labels(labels.header.shape, labels.header.dtype.name)
        arrays = {k: (r.header.shape, r.header.dtype.name) for k, r in self.readers.items()}
        return plan_arrays(arrays, inputs, batch_size, labels.header.shape[0] if labels else None)

    @property
    def num_feeds(self) -> int:
        return self.plan.num_feeds

    def _open(self, source: DatasetSource) -> None:
        path = Path(source.path)
        if source.format == "npy":
            self.readers[SINGLE_INPUT_KEY] = _NpyReader(path, "The .npy array")
            return
        if source.format != "npz":
            raise RuleError("invalid_dataset", f"Unknown dataset format '{source.format}'.", {"format": source.format})
        try:
            self._zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise RuleError("invalid_dataset", f"The .npz file could not be opened: {exc}", {}) from exc
        for member in self._zf.namelist():
            if member.endswith(".npy"):
                key = member.removesuffix(".npy")
                what = f"'{LABELS_KEY}'" if key == LABELS_KEY else f"Array {key!r}"
                self.readers[key] = _ZipMemberReader(self._zf, member, what)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        if self.labels_reader is not None:
            self.labels_reader.close()
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def batches(self, limit: int | None) -> Iterator[Batch]:
        plans = self.plan.arrays
        total = self.num_feeds if limit is None else min(self.num_feeds, max(0, limit))
        constants = {
            p.input.name: np.asarray(self.readers[p.input.name].whole()).astype(p.cast_to, copy=False)
            for p in plans
            if p.form == Form.CONSTANT
        }
        batched = next((p for p in plans if p.form == Form.BATCHED), None)
        per_label = self.plan.labels_per_feed
        for i in range(total):
            feeds: dict[str, np.ndarray] = {}
            for p in plans:
                if p.form == Form.CONSTANT:
                    feeds[p.input.name] = constants[p.input.name]
                    continue
                reader = self.readers[p.input.name]
                if p.form == Form.STACKED:
                    arr = reader.rows(i, 1)[0]
                else:
                    start = i * p.rows_per_feed
                    arr = reader.rows(start, min(p.rows_per_feed, p.shape[0] - start))
                feeds[p.input.name] = np.array(arr, dtype=p.cast_to, order="C")  # writable copy
            n_samples = min(batched.rows_per_feed, batched.shape[0] - i * batched.rows_per_feed) if batched else 1
            labels = None
            if self.labels_reader is not None and per_label is not None:
                start = i * per_label
                count = min(per_label, self.labels_reader.header.shape[0] - start)
                labels = self.labels_reader.rows(start, count).astype(np.int64)
            yield Batch(feeds=feeds, labels=labels, num_samples=n_samples)


# --------------------------------------------------------------------------------------------
# Public API


def iter_batches(
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int = 1,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Yield the dataset's feeds one at a time (at most `limit`). Raises RuleError
    (`invalid_dataset`, `dataset_model_mismatch`) before the first feed when the data cannot fit."""
    if source.format == "images":
        return iter_image_batches(source, inputs, batch_size=batch_size, limit=limit)
    opened = _Opened(source, inputs, batch_size)  # validate eagerly, before the caller iterates
    return _closing(opened, limit)


def _closing(opened: _Opened, limit: int | None) -> Iterator[Batch]:
    try:
        yield from opened.batches(limit)
    finally:
        opened.close()


def count_batches(
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int = 1,
    limit: int | None = None,
) -> int:
    """How many feeds `iter_batches` gives with the same arguments (reads headers only).
    Also validates the dataset against the inputs (same errors as iter_batches)."""
    if source.format == "images":
        return count_image_batches(source, inputs, batch_size=batch_size, limit=limit)
    n = _array_plan(source, inputs, batch_size).num_feeds
    return n if limit is None else min(n, max(0, limit))


def _array_plan(source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int) -> DatasetPlan:
    """The plan of an array dataset, opening it (headers only) the first time."""
    key = plan_key(source, inputs, batch_size)
    if key not in PLANS:
        _Opened(source, inputs, batch_size).close()
    return cast(DatasetPlan, PLANS[key])


def samples_per_feed(source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1) -> int:
    """How many dataset samples one (full) feed holds: the batch rows when arrays are split into
    batches, 1 when samples are stacked."""
    if source.format == "images":
        return image_rows_per_feed(source, inputs, batch_size=batch_size)
    return _array_plan(source, inputs, batch_size).samples_per_feed


def feed_limit(
    source: DatasetSource,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int = 1,
    max_samples: int | None = None,
) -> int | None:
    """The `limit` (in feeds) that reads at most about `max_samples` samples (None: no limit)."""
    if max_samples is None:
        return None
    return max(1, math.ceil(max_samples / samples_per_feed(source, inputs, batch_size=batch_size)))


def synthesize_batch(inputs: Sequence[TensorSpec], *, seed: int = 0, batch: int = 1) -> Batch:
    """A made-up feed for when there is no dataset: symbolic/unknown dims become `batch` for the
    leading axis and 1 elsewhere; floats in [0, 1), ints 0, bools False."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = tuple(int(d) if is_fixed(d) else (batch if i == 0 else 1) for i, d in enumerate(spec.shape or ()))
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError:
            dtype = np.dtype("float32")
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind in "US" or dtype.kind == "O":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return Batch(feeds=feeds, labels=None)
