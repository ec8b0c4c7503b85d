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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from numpy.lib import format as npformat

from worker.engine.errors import EngineError
from worker.engine.spec import DatasetSource, TensorSpec

LABELS_KEY = "__labels__"
# A .npy header is tiny; refuse absurd ones instead of parsing them.
_MAX_HEADER_SIZE = 1 << 16


@dataclass
class Batch:
    """One `session.run` feed and the class ids of the samples in it (or None)."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    # How many dataset samples this feed holds (rows of a batched array, 1 for a stacked sample).
    num_samples: int = 1


# --------------------------------------------------------------------------------------------
# Model inputs


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


def _np_dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # unknown or exotic element type
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def value_info_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    """A graph input/output as a TensorSpec (dtype as numpy name, shape entries int | str | None)."""
    t = vi.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        shape: tuple[int | str | None, ...] = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else ()
        return TensorSpec(name=vi.name, dtype=_np_dtype_name(tt.elem_type), shape=shape)
    kind = t.WhichOneof("value") or "unknown"
    return TensorSpec(name=vi.name, dtype=kind, shape=())


def model_inputs(model_path: Path) -> list[TensorSpec]:
    """The graph inputs that are not initializers, in graph order."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise EngineError("invalid_model", f"The model could not be read: {exc}", {"path": str(model_path)}) from exc
    initializers = {init.name for init in model.graph.initializer}
    return [value_info_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def model_outputs(model_path: Path) -> list[TensorSpec]:
    """The graph outputs, in graph order."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise EngineError("invalid_model", f"The model could not be read: {exc}", {"path": str(model_path)}) from exc
    return [value_info_spec(vi) for vi in model.graph.output]


# --------------------------------------------------------------------------------------------
# dtype and shape rules


def _kind_group(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return "float"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "USO":
        return "string"
    if dtype.kind == "c":
        return "complex"
    return dtype.kind


def _expected_dtype(spec: TensorSpec) -> np.dtype | None:
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        return None


def _shape_str(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def mismatch(spec: TensorSpec, given_shape: Sequence[int], given_dtype: str, why: str) -> EngineError:
    """A `dataset_model_mismatch` error naming the input, expected and given shape/dtype."""
    return EngineError(
        "dataset_model_mismatch",
        f"The dataset cannot feed input '{spec.name}': {why} (the model expects {spec.dtype} "
        f"{_shape_str(spec.shape)}, the dataset gives {given_dtype} {_shape_str(given_shape)}).",
        {
            "input": spec.name,
            "expected_shape": list(spec.shape),
            "expected_dtype": spec.dtype,
            "given_shape": [int(d) for d in given_shape],
            "given_dtype": given_dtype,
        },
    )


def check_dtype(spec: TensorSpec, given: np.dtype, given_shape: Sequence[int]) -> np.dtype:
    """The dtype to cast to; raises dataset_model_mismatch unless it is a same-kind cast."""
    expected = _expected_dtype(spec)
    if expected is None:
        raise mismatch(spec, given_shape, given.name, f"inputs of type {spec.dtype} cannot be fed from arrays")
    if _kind_group(expected) != _kind_group(given):
        raise mismatch(spec, given_shape, given.name, f"{given.name} data cannot be cast to {expected.name}")
    return expected


def _dims_fit(expected: Sequence[int | str | None], given: Sequence[int]) -> bool:
    if len(expected) != len(given):
        return False
    return all(not isinstance(e, int) or e == g for e, g in zip(expected, given, strict=True))


# --------------------------------------------------------------------------------------------
# Array readers (header first, rows streamed)


@dataclass
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _read_header(fp: IO[bytes], what: str) -> _Header:
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=_MAX_HEADER_SIZE)
        elif version in ((2, 0), (3, 0)):
            reader = getattr(npformat, "_read_array_header", None)
            if reader is not None:
                shape, fortran, dtype = reader(fp, version, max_header_size=_MAX_HEADER_SIZE)
            else:  # pragma: no cover - older numpy
                shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=_MAX_HEADER_SIZE)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:
        raise EngineError("invalid_dataset", f"{what} is not a valid .npy array: {exc}", {"array": what}) from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None:
        raise EngineError(
            "invalid_dataset",
            f"{what} holds Python objects or records ({dtype}); only plain numeric arrays are accepted.",
            {"array": what, "dtype": str(dtype)},
        )
    return _Header(tuple(int(d) for d in shape), dtype, bool(fortran))


class _ArrayReader:
    """Sequential access to the rows (axis 0) of one stored array."""

    header: _Header

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
        self.header = _read_header(self._fp, what)
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
            _read_header(self._fp, self._what)
            self._pos = 0
        if start > self._pos:
            self._skip((start - self._pos) * self._row_bytes)
            self._pos = start
        want = count * self._row_bytes
        data = self._fp.read(want)
        if len(data) != want:
            raise EngineError("invalid_dataset", f"{self._what} is truncated.", {"array": self._what})
        self._pos += count
        return np.frombuffer(data, dtype=self.header.dtype).reshape((count, *self._row_shape))

    def _skip(self, nbytes: int) -> None:
        assert self._fp is not None
        while nbytes > 0:
            chunk = self._fp.read(min(nbytes, 1 << 20))
            if not chunk:
                raise EngineError("invalid_dataset", f"{self._what} is truncated.", {"array": self._what})
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
                self.header = _read_header(fp, what)
        except OSError as exc:
            raise EngineError("invalid_dataset", f"{what} could not be read: {exc}", {"array": what}) from exc
        try:
            self._arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise EngineError("invalid_dataset", f"{what} could not be read: {exc}", {"array": what}) from exc

    def whole(self) -> np.ndarray:
        return np.asarray(self._arr)

    def rows(self, start: int, count: int) -> np.ndarray:
        return np.ascontiguousarray(self._arr[start : start + count])

    def close(self) -> None:
        self._arr = None


# --------------------------------------------------------------------------------------------
# Planning: which form each array has and how many feeds the dataset gives


@dataclass
class _Plan:
    spec: TensorSpec
    form: str  # "stacked" | "batched" | "constant"
    header: _Header
    cast_to: np.dtype
    rows_per_feed: int  # stacked: 1, batched: batch rows, constant: 0
    num_feeds: int | None  # None for constants


def _plan_array(spec: TensorSpec, header: _Header, batch_size: int) -> _Plan:
    shape = header.shape
    rank = len(spec.shape)
    cast_to = check_dtype(spec, header.dtype, shape)
    if len(shape) == 0:
        if rank != 0:
            raise mismatch(spec, shape, header.dtype.name, "a rank-0 array only fits a scalar input")
        return _Plan(spec, "constant", header, cast_to, 0, None)
    if len(shape) == rank + 1:
        if not _dims_fit(spec.shape, shape[1:]):
            raise mismatch(
                spec,
                shape,
                header.dtype.name,
                "the samples stacked on the leading axis do not have the input's shape",
            )
        if shape[0] == 0:
            raise EngineError(
                "invalid_dataset",
                f"The array for input '{spec.name}' holds no samples.",
                {"input": spec.name},
            )
        return _Plan(spec, "stacked", header, cast_to, 1, shape[0])
    if len(shape) == rank:
        if not _dims_fit(spec.shape[1:], shape[1:]):
            raise mismatch(spec, shape, header.dtype.name, "the dimensions after the batch axis differ")
        lead = spec.shape[0]
        rows = int(lead) if isinstance(lead, int) else max(1, int(batch_size))
        if shape[0] == 0:
            raise EngineError(
                "invalid_dataset",
                f"The array for input '{spec.name}' holds no samples.",
                {"input": spec.name},
            )
        if isinstance(lead, int) and shape[0] % lead != 0:
            raise mismatch(
                spec,
                shape,
                header.dtype.name,
                f"the input's leading dimension is fixed to {lead} and {shape[0]} rows do not split into "
                f"batches of {lead}",
            )
        return _Plan(spec, "batched", header, cast_to, rows, math.ceil(shape[0] / rows))
    raise mismatch(
        spec,
        shape,
        header.dtype.name,
        f"an array of rank {len(shape)} fits neither form (rank {rank} split into batches, "
        f"or rank {rank + 1} with samples stacked on a new leading axis)",
    )


def _num_feeds(plans: Sequence[_Plan]) -> int:
    counts = {p.spec.name: p.num_feeds for p in plans if p.num_feeds is not None}
    if not counts:
        return 1  # every input is a constant: one feed
    distinct = set(counts.values())
    if len(distinct) > 1:
        listed = ", ".join(f"'{k}' gives {v}" for k, v in counts.items())
        raise EngineError(
            "dataset_model_mismatch",
            f"The dataset's arrays do not give the same number of feeds ({listed}); give every input "
            "the same number of samples, in the same form.",
            {"feeds_per_input": counts},
        )
    return distinct.pop()


@dataclass
class _LabelPlan:
    per_feed: int  # labels per feed
    total: int


def _plan_labels(header: _Header, plans: Sequence[_Plan], num_feeds: int) -> _LabelPlan:
    if len(header.shape) != 1 or _kind_group(header.dtype) not in ("int", "bool"):
        raise EngineError(
            "invalid_dataset",
            f"'{LABELS_KEY}' must be a 1-D array of integer class ids, not {header.dtype.name} "
            f"{_shape_str(header.shape)}.",
            {"given_shape": list(header.shape), "given_dtype": header.dtype.name},
        )
    n = header.shape[0]
    batched = [p for p in plans if p.form == "batched"]
    stacked = [p for p in plans if p.form == "stacked"]
    if batched:
        rows = batched[0].header.shape[0]
        if n == rows:
            return _LabelPlan(batched[0].rows_per_feed, n)
        raise EngineError(
            "invalid_dataset",
            f"'{LABELS_KEY}' has {n} labels but the data has {rows} samples.",
            {"labels": n, "samples": rows},
        )
    if n == num_feeds:
        return _LabelPlan(1, n)
    if stacked and len(stacked[0].header.shape) >= 2:
        per = stacked[0].header.shape[1]
        if n == num_feeds * per:
            return _LabelPlan(per, n)
    raise EngineError(
        "invalid_dataset",
        f"'{LABELS_KEY}' has {n} labels but the data has {num_feeds} samples.",
        {"labels": n, "samples": num_feeds},
    )


def _check_inputs_present(inputs: Sequence[TensorSpec], available: Sequence[str]) -> None:
    for spec in inputs:
        if spec.name not in available:
            raise EngineError(
                "dataset_model_mismatch",
                f"The dataset has no array for input '{spec.name}' (it has: "
                f"{', '.join(sorted(available)) or 'nothing'}).",
                {
                    "input": spec.name,
                    "expected_shape": list(spec.shape),
                    "expected_dtype": spec.dtype,
                    "available": sorted(available),
                },
            )


class _Opened:
    """An opened array dataset: per-input readers, plans, labels."""

    def __init__(self, source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int) -> None:
        self.readers: dict[str, _ArrayReader] = {}
        self.labels_reader: _ArrayReader | None = None
        self._zf: zipfile.ZipFile | None = None
        try:
            self._open(source, inputs)
            self.plans = [_plan_array(s, self.readers[s.name].header, batch_size) for s in inputs]
            self.num_feeds = _num_feeds(self.plans)
            self.label_plan = (
                _plan_labels(self.labels_reader.header, self.plans, self.num_feeds)
                if self.labels_reader is not None
                else None
            )
        except BaseException:
            self.close()
            raise

    def _open(self, source: DatasetSource, inputs: Sequence[TensorSpec]) -> None:
        path = Path(source.path)
        if source.format == "npy":
            if len(inputs) != 1:
                raise EngineError(
                    "dataset_model_mismatch",
                    f"A .npy dataset holds one array but the model has {len(inputs)} inputs "
                    f"({', '.join(s.name for s in inputs)}); use a .npz keyed by input name.",
                    {"inputs": [s.name for s in inputs]},
                )
            self.readers[inputs[0].name] = _NpyReader(path, f"The array for input '{inputs[0].name}'")
            return
        if source.format != "npz":
            raise EngineError(
                "invalid_dataset", f"Unknown dataset format '{source.format}'.", {"format": source.format}
            )
        try:
            self._zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise EngineError("invalid_dataset", f"The .npz file could not be opened: {exc}", {}) from exc
        members = {n[: -len(".npy")]: n for n in self._zf.namelist() if n.endswith(".npy")}
        _check_inputs_present(inputs, [k for k in members if k != LABELS_KEY])
        for spec in inputs:
            self.readers[spec.name] = _ZipMemberReader(
                self._zf, members[spec.name], f"The array for input '{spec.name}'"
            )
        if LABELS_KEY in members:
            self.labels_reader = _ZipMemberReader(self._zf, members[LABELS_KEY], f"'{LABELS_KEY}'")

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        if self.labels_reader is not None:
            self.labels_reader.close()
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def batches(self, limit: int | None) -> Iterator[Batch]:
        total = self.num_feeds if limit is None else min(self.num_feeds, max(0, limit))
        constants = {
            p.spec.name: np.asarray(self.readers[p.spec.name].whole()).astype(p.cast_to, copy=False)
            for p in self.plans
            if p.form == "constant"
        }
        for i in range(total):
            feeds: dict[str, np.ndarray] = {}
            for p in self.plans:
                if p.form == "constant":
                    feeds[p.spec.name] = constants[p.spec.name]
                    continue
                reader = self.readers[p.spec.name]
                if p.form == "stacked":
                    arr = reader.rows(i, 1)[0]
                else:
                    n_rows = p.header.shape[0]
                    start = i * p.rows_per_feed
                    arr = reader.rows(start, min(p.rows_per_feed, n_rows - start))
                feeds[p.spec.name] = np.array(arr, dtype=p.cast_to, order="C")  # writable copy
            batched = [p for p in self.plans if p.form == "batched"]
            n_samples = (
                min(batched[0].rows_per_feed, batched[0].header.shape[0] - i * batched[0].rows_per_feed)
                if batched
                else 1
            )
            labels = None
            if self.labels_reader is not None and self.label_plan is not None:
                start = i * self.label_plan.per_feed
                count = min(self.label_plan.per_feed, self.label_plan.total - start)
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
    """Yield the dataset's feeds one at a time (at most `limit`). Raises EngineError
    (`invalid_dataset`, `dataset_model_mismatch`) before the first feed when the data cannot fit."""
    if source.format == "images":
        from worker.engine.images import iter_image_batches

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
        from worker.engine.images import count_image_batches

        return count_image_batches(source, inputs, batch_size=batch_size, limit=limit)
    opened = _Opened(source, inputs, batch_size)
    try:
        n = opened.num_feeds
    finally:
        opened.close()
    return n if limit is None else min(n, max(0, limit))


def samples_per_feed(source: DatasetSource, inputs: Sequence[TensorSpec], *, batch_size: int = 1) -> int:
    """How many dataset samples one (full) feed holds: the batch rows when arrays are split into
    batches, 1 when samples are stacked."""
    if source.format == "images":
        from worker.engine.images import image_rows_per_feed

        return image_rows_per_feed(source, inputs, batch_size=batch_size)
    opened = _Opened(source, inputs, batch_size)
    try:
        batched = [p for p in opened.plans if p.form == "batched"]
        return batched[0].rows_per_feed if batched else 1
    finally:
        opened.close()


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
        shape = tuple(
            d if isinstance(d, int) and d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(spec.shape)
        )
        dtype = _expected_dtype(spec) or np.dtype("float32")
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind in "US" or dtype.kind == "O":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return Batch(feeds=feeds, labels=None)
