"""Big external-data models within twice their size: graphs loaded without their weights, weights read one
tensor at a time from their files, results written tensor by tensor into the output's one data file.

ONNX Runtime's quantizers, calibrators and onnxconverter-common's float16 converter load a whole model with
its weights (and shape inference serialises it again, and saving once more): a dynamic int8 job peaked at 4x
the model. Here they get the graph alone, with the external references in place: every weight ORT reads goes
through `onnx.numpy_helper.to_array`, which reads that tensor's bytes from its file (relative to the current
folder, so the work runs inside the folder that holds the data); what ORT adds (quantized weights, scales) is
in memory, a fraction of the float weights; `write` copies or converts every referenced tensor chunk by
chunk into the output's data file and appends the new ones."""

from __future__ import annotations

import contextlib
import importlib
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from core.model import external_locations, model_tensors

# External-data models at least this large (graph and data files) take the streaming path.
STREAMING_BYTES = 256 << 20
# Tensors of at least this many bytes go to the data file (as onnx.save_model's size_threshold).
SIZE_THRESHOLD = 1024
# Offsets of tensors of at least ALIGN_ABOVE bytes are page-aligned, so that ONNX Runtime can map them.
ALIGN = 4096
ALIGN_ABOVE = 1 << 20
CHUNK = 64 << 20
# ORT's quantize_nparray makes four float32 temporaries of the whole tensor; in pieces of this many values
# (same values: the arithmetic is elementwise) a big tensor costs a few of its own size less.
QUANTIZE_CHUNK = 4 << 20


def model_bytes(path: Path) -> int:
    """The graph file plus the external data files it names."""
    model = onnx.load(str(path), load_external_data=False)
    folder = Path(path).parent
    return Path(path).stat().st_size + sum(
        (folder / loc).stat().st_size for loc in external_locations(model) if (folder / loc).is_file()
    )


def should_stream(path: Path, threshold: int | None = None) -> bool:
    """Whether `path` keeps external data and is at least `threshold` bytes (default STREAMING_BYTES)."""
    model = onnx.load(str(path), load_external_data=False)
    if not external_locations(model):
        return False
    return model_bytes(path) >= (STREAMING_BYTES if threshold is None else threshold)


def _info(tensor: TensorProto) -> tuple[str, int, int | None]:
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries["location"], int(entries.get("offset", "0")), None if length is None else int(length)


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def read_array(tensor: TensorProto, folder: Path, dtype: np.dtype[Any] | None = None) -> np.ndarray:
    """One tensor's values, from its inline data or, memory-mapped, from its external file under `folder`
    (`dtype`: the type its bytes hold, when the tensor now declares another)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    location, offset, length = _info(tensor)
    dtype = np.dtype(dtype) if dtype is not None else onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if length is not None and length != count * dtype.itemsize:
        raise ValueError(f"tensor {tensor.name!r}: {length} bytes for {count} values of {dtype}")
    return np.memmap(folder / location, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


# How a tensor's bytes are converted while copied: the type they hold, and an elementwise function.
Convert = tuple[np.dtype[Any], Callable[[np.ndarray], np.ndarray]]


def write(
    model: onnx.ModelProto,
    out_path: Path,
    *,
    source_dir: Path,
    convert: dict[str, Convert] | None = None,
) -> None:
    """Save `model` at `out_path` with every tensor of SIZE_THRESHOLD bytes or more in `<name>.data` beside it:
    inline bytes are moved there, external references (read under `source_dir`) copied chunk by chunk, or
    passed through `convert[tensor name]` (the type the bytes hold, and an elementwise function applied chunk
    by chunk; the tensor's declared type is the result's). Never more than one chunk of weights in memory
    besides what `model` holds inline."""
    out_path = Path(out_path).resolve()
    data_path = out_path.with_name(out_path.name + ".data")
    source_dir = Path(source_dir).resolve()
    convert = convert or {}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with data_path.open("wb") as out:

        def start(nbytes: int) -> int:
            if nbytes >= ALIGN_ABOVE:
                pad = -out.tell() % ALIGN
                if pad:
                    out.write(b"\0" * pad)
            return out.tell()

        for tensor in model_tensors(model):
            if tensor.data_location == TensorProto.EXTERNAL:
                location, offset, length = _info(tensor)
                source = (source_dir / location).resolve()
                if source == data_path:
                    raise ValueError(f"{out_path.name} would overwrite the data it reads ({location})")
                how = convert.get(tensor.name)
                if how is not None:
                    held, fn = how
                    values = read_array(tensor, source_dir, held).reshape(-1)
                    at = None
                    for i in range(0, values.size, CHUNK // max(1, values.itemsize)):
                        piece = np.ascontiguousarray(fn(np.asarray(values[i : i + CHUNK // max(1, values.itemsize)])))
                        if at is None:
                            at = start(piece.itemsize * values.size)
                        out.write(piece.tobytes())
                    at = out.tell() if at is None else at
                    del values
                    _set_external(tensor, data_path.name, at, out.tell() - at)
                    continue
                if length is None:
                    length = source.stat().st_size - offset
                at = start(length)
                with source.open("rb") as src:
                    src.seek(offset)
                    left = length
                    while left:
                        block = src.read(min(CHUNK, left))
                        if not block:
                            raise ValueError(f"{location} ends before the {length} bytes of tensor {tensor.name!r}")
                        out.write(block)
                        left -= len(block)
                _set_external(tensor, data_path.name, at, length)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
                raw = tensor.raw_data
                at = start(len(raw))
                out.write(raw)
                _set_external(tensor, data_path.name, at, len(raw))
                del raw
    onnx.save_model(model, str(out_path))


def rewrite(path: Path, source_dir: Path, out_path: Path) -> None:
    """Gather the weights of the graph at `path` (references under `source_dir`, inline tensors) into the data
    file of `out_path`."""
    model = onnx.load(str(path), load_external_data=False)
    write(model, out_path, source_dir=source_dir)


@contextlib.contextmanager
def output_beside(weights: Path, out_path: Path, name: str) -> Iterator[Path]:
    """A path beside the weights for a tool that saves its result the usual way (new tensors in the data file
    beside its result, the others referring to `weights`' files), run as `weights_read_in` runs it; on success
    the result is gathered, tensor by tensor, into `out_path` and its data file, and the path removed."""
    folder = Path(weights).resolve().parent
    out_path = Path(out_path).resolve()
    tmp = folder / name
    try:
        with weights_read_in(folder):
            yield tmp
        rewrite(tmp, folder, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)


@contextlib.contextmanager
def weights_read_in(folder: Path) -> Iterator[None]:
    """Run ORT's quantization tools on graphs without weights: inside `folder` (so `to_array` finds the
    external files the references name), with ORT's loaders (`load_model_with_shape_infer`, the quantizers'
    and calibrators' loader, and `save_and_reload_model_with_shape_infer`), which load every weight, swapped
    for ones that keep the references."""
    from onnxruntime.quantization import base_quantizer, calibrate, onnx_quantizer, qdq_quantizer, quant_utils

    # The package's `quantize` attribute is the function of that name, not its module.
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    swaps: dict[str, Any] = {
        "load_model_with_shape_infer": load_graph_with_shapes,
        "save_and_reload_model_with_shape_infer": reload_graph_with_shapes,
        "quantize_nparray": _chunked(quant_utils.quantize_nparray),
        "tensor_proto_to_array": _mapped(quant_utils.tensor_proto_to_array),
        "compute_data_quant_params": _ranged(quant_utils.compute_data_quant_params),
    }
    saved: list[tuple[Any, str, Any]] = []
    for module in (quant_utils, calibrate, ort_quantize, base_quantizer, onnx_quantizer, qdq_quantizer):
        for name, fn in swaps.items():
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, fn)
    try:
        with contextlib.chdir(folder):
            yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


class _Weights(np.ndarray):
    """A weight mapped read-only from its file, whose `flatten()` is a view: ORT's quantizers flatten a weight
    only to read it, and the copy would hold the whole weight once more."""

    def flatten(self, order: Any = "C") -> np.ndarray:
        return np.asarray(self).reshape(-1) if order in ("C", "A", "K") else np.asarray(self).flatten(order)


def _mapped(tensor_proto_to_array: Callable[[TensorProto], np.ndarray]) -> Callable[[TensorProto], np.ndarray]:
    """ORT's `tensor_proto_to_array`, with an external float weight mapped from its file (read under the current
    folder, as `weights_read_in` runs) instead of read whole into memory and copied."""

    def to_array(tensor: TensorProto) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL or tensor.data_type not in (
            TensorProto.FLOAT,
            TensorProto.FLOAT16,
        ):
            return tensor_proto_to_array(tensor)
        return read_array(tensor, Path.cwd()).view(_Weights)

    return to_array


def _mapping(arr: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The file mapping behind `arr` (a view of a `read_array` memmap) and where `arr` starts in it, or None."""
    base: Any = arr
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if base is None or not isinstance(mapping, mmap.mmap):
        return None
    start = int(base.offset) % mmap.ALLOCATIONGRANULARITY + arr.ctypes.data - base.ctypes.data
    return mapping, start


def _let_go(arr: np.ndarray, start: int, stop: int) -> None:
    """Drop the file's pages behind values [start, stop) of `arr` (contiguous) from memory once read: a mapped
    weight read end to end otherwise stays resident whole (they are read again from the file if needed)."""
    found = _mapping(arr)
    if found is None:
        return
    mapping, at = found
    page = mmap.PAGESIZE
    first = -(-(at + start * arr.itemsize) // page) * page
    last = (at + stop * arr.itemsize) // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _ranged(compute_data_quant_params: Callable[..., Any]) -> Callable[..., Any]:
    """ORT's `compute_data_quant_params` on a big mapped weight: its min and max taken piece by piece (the same
    values: min and max are exact), each piece's pages let go, then ORT's own function with them as overrides."""

    def compute(
        data: Any,
        quant_type: Any,
        symmetric: Any,
        reduce_range: Any = False,
        min_real_range: Any = None,
        rmin_override: Any = None,
        rmax_override: Any = None,
    ) -> Any:
        flat = data.reshape(-1) if isinstance(data, np.ndarray) and data.flags.c_contiguous else None
        if (
            flat is not None
            and flat.size > QUANTIZE_CHUNK
            and rmin_override is None
            and rmax_override is None
            and _mapping(flat) is not None
        ):
            for i in range(0, flat.size, QUANTIZE_CHUNK):
                piece = flat[i : i + QUANTIZE_CHUNK]
                lo, hi = piece.min(), piece.max()
                rmin_override = lo if rmin_override is None else np.minimum(rmin_override, lo)
                rmax_override = hi if rmax_override is None else np.maximum(rmax_override, hi)
                _let_go(flat, i, i + piece.size)
        return compute_data_quant_params(
            data, quant_type, symmetric, reduce_range, min_real_range, rmin_override, rmax_override
        )

    return compute


def _chunked(quantize_nparray: Callable[..., Any]) -> Callable[..., Any]:
    """ORT's `quantize_nparray`, run piece by piece on a big array with one scale and zero point (the
    integer types; float 8 and per-element scales go through it whole)."""
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE

    def quantize(qtype: int, arr: Any, scale: Any, zero_point: Any, low: Any = None, high: Any = None) -> Any:
        integer = qtype in ONNX_TYPE_TO_NP_TYPE and np.dtype(ONNX_TYPE_TO_NP_TYPE[qtype]).kind in "iu"
        if not (integer and isinstance(arr, np.ndarray) and arr.size > QUANTIZE_CHUNK):
            return quantize_nparray(qtype, arr, scale, zero_point, low, high)
        if np.size(scale) != 1 or np.size(zero_point) != 1:
            return quantize_nparray(qtype, arr, scale, zero_point, low, high)
        flat = arr.reshape(-1)
        out = np.empty(flat.shape, dtype=ONNX_TYPE_TO_NP_TYPE[qtype])
        for i in range(0, flat.size, QUANTIZE_CHUNK):
            out[i : i + QUANTIZE_CHUNK] = quantize_nparray(
                qtype, flat[i : i + QUANTIZE_CHUNK], scale, zero_point, low, high
            )
            _let_go(flat, i, min(flat.size, i + QUANTIZE_CHUNK))
        return out.reshape(arr.shape)

    return quantize


def load_graph_with_shapes(model_path: Path) -> onnx.ModelProto:
    """ORT's `load_model_with_shape_infer` without the weights: ONNX shape inference, the metadata ORT marks."""
    return reload_graph_with_shapes(onnx.load(str(model_path), load_external_data=False))


def reload_graph_with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's `save_and_reload_model_with_shape_infer` for a graph whose weights stay where they are."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(inferred)
    return inferred


def save_references(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph whose external references point at files beside `path` (nothing is copied)."""
    onnx.save_model(model, str(path))


def symbolic_shapes(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """ORT's symbolic shape inference (as quant_pre_process runs it, auto_merge) on a graph without weights."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with contextlib.chdir(folder):
        inferred = SymbolicShapeInference.infer_shapes(model, 2**31 - 1, True, False, 0)
    if inferred is None:
        raise RuntimeError("Incomplete symbolic shape inference")
    return inferred


def optimize_basic(src: Path, dst: Path) -> None:
    """ORT's basic graph optimisation (quant_pre_process's), written to `dst` with its weights in
    `dst.data`; the session maps the weights and packs none of them."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(SIZE_THRESHOLD))
    so.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    del session
    if not dst.is_file():
        raise RuntimeError("ONNX Runtime wrote no optimised model")


def onnx_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, and the mark quant_pre_process leaves (ORT's quantizers warn without it)."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    inferred = onnx.shape_inference.infer_shapes(model)
    add_pre_process_metadata(inferred)
    return inferred


def float16_converter(min_positive_val: float = 1e-7, max_finite_val: float = 1e4) -> Convert:
    """float32 bytes to float16 exactly as onnxconverter-common converts a weight (same clamping)."""
    from onnxconverter_common import float16

    def convert(values: np.ndarray) -> np.ndarray:
        return np.asarray(float16.convert_np_to_float16(values, min_positive_val, max_finite_val), dtype=np.float16)

    return np.dtype(np.float32), convert


def retyped(before: dict[str, int], model: onnx.ModelProto) -> list[str]:
    """External tensors whose declared type went from float32 to float16 (the converter flips the type of
    a weight it cannot read)."""
    return [
        t.name
        for t in model_tensors(model)
        if t.data_location == TensorProto.EXTERNAL
        and before.get(t.name) == TensorProto.FLOAT
        and t.data_type == TensorProto.FLOAT16
    ]


def external_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model_tensors(model) if t.data_location == TensorProto.EXTERNAL}


def _tensor_bytes(tensor: TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def measured_apart(original: Path, quantized: Path, threshold: int | None = None) -> bool:
    """Whether the evaluation should hold one model's session at a time: the original is at least `threshold`
    bytes (default STREAMING_BYTES) and the quantized model keeps most of its weights in float16. ONNX
    Runtime's CPU provider casts float16 weights to float32 when it loads such a model, so its session holds
    as much as the original's: side by side, the two would hold the weights twice over."""
    if model_bytes(original) < (STREAMING_BYTES if threshold is None else threshold):
        return False
    model = onnx.load(str(quantized), load_external_data=False)
    sizes = [(t.data_type, _tensor_bytes(t)) for t in model_tensors(model) if t.data_type != TensorProto.STRING]
    total = sum(n for _, n in sizes)
    half = sum(n for kind, n in sizes if kind == TensorProto.FLOAT16)
    return total > 0 and 2 * half >= total
