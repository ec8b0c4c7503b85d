"""Models and data generated in code for the benchmarks.

- `conv_model`: a plain convolutional classifier of about 10 MB of float32 weights (a VGG-like
  stack of 3x3 convolutions with ReLU, global average pooling and a 1000-class Gemm).
- `calibration_npz`: N samples stacked on a new leading axis (the contract's unambiguous form).
- `external_data_model`: a model whose initializers all live in one external data file of a
  chosen size (written in chunks, never held in memory), for the upload benchmark.
- `tiny_model`: a few-KB classifier for jobs that only need to exist (the API load test).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
INPUT = "input"

# (out_channels, stride) of each 3x3 convolution; about 2.56 M weights with the 256x1000 Gemm.
CONV_LAYERS = ((32, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (256, 1), (256, 1))
CLASSES = 1000


def conv_model(path: Path, *, image_size: int = 128, seed: int = 0, width: float = 1.0) -> Path:
    """Write the conv classifier to `path` (input [batch, 3, size, size], output logits [batch, 1000])."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev, channels = INPUT, 3
    for i, (out, stride) in enumerate(CONV_LAYERS):
        out = max(8, int(out * width))
        fan_in = channels * 9
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (out, channels, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 0.01, (out,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(b, f"conv{i}.b")]
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"conv{i}.w", f"conv{i}.b"],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        prev, channels = f"relu{i}", out
    fc = rng.normal(0.0, np.sqrt(1.0 / channels), (CLASSES, channels)).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc, "fc.w"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc.b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_conv",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="qaas-bench",
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def calibration_npz(path: Path, samples: int, *, image_size: int = 128, seed: int = 1) -> Path:
    """N samples of [1, 3, size, size] image-like data in [0, 1), stacked: array `input` [N, 1, 3, H, W].

    Written sample by sample through `np.lib.format` so that 512 samples never sit in memory at once."""
    rng = np.random.default_rng(seed)
    shape = (samples, 1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
        "fortran_order": False,
        "shape": shape,
    }
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
        zf.open(f"{INPUT}.npy", "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_1_0(f, header)
        # Smooth "images": a low-resolution random field upsampled, plus a little noise.
        for _ in range(samples):
            low = rng.random((1, 3, image_size // 8, image_size // 8), dtype=np.float32)
            img = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)
            img += rng.normal(0.0, 0.05, img.shape).astype(np.float32)
            f.write(np.ascontiguousarray(img, dtype=np.float32).tobytes())
    return path


def tiny_model(path: Path) -> Path:
    """The README's walk-through classifier: a few KB, input [batch, 3, 32, 32]."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=init,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION),
        str(path),
    )
    return path


def tiny_npz(path: Path, samples: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.random((samples, 1, 3, 32, 32), dtype=np.float32))
    return path


def external_data_model(onnx_path: Path, total_bytes: int, *, tensors: int = 16, seed: int = 2) -> tuple[Path, Path]:
    """A chain of `Add`s over `tensors` float32 initializers of equal size that together fill one
    external data file of about `total_bytes` (`<name>.bin` beside the model). Returns both paths.

    The bytes are a repeated random block written in chunks, so memory stays small."""
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = onnx_path.with_suffix(".bin")
    per_tensor = max(1, total_bytes // tensors // 4)  # float32 elements per tensor
    rng = np.random.default_rng(seed)
    block = rng.normal(0.0, 1.0, min(per_tensor, 4 << 20)).astype(np.float32).tobytes()  # <= 16 MB
    inits = []
    offset = 0
    with data_path.open("wb") as f:
        for i in range(tensors):
            remaining = per_tensor * 4
            while remaining:
                piece = block[: min(len(block), remaining)]
                f.write(piece)
                remaining -= len(piece)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[per_tensor])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_path.name),
                ("offset", str(offset)),
                ("length", str(per_tensor * 4)),
            ):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
            offset += per_tensor * 4
    nodes = []
    prev = "x"
    for i in range(tensors):
        out = "y" if i == tensors - 1 else f"a{i}"
        nodes.append(helper.make_node("Add", [prev, f"w{i}"], [out], name=f"add{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "bench_big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [per_tensor])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [per_tensor])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="qaas-bench",
    )
    with onnx_path.open("wb") as f:
        f.write(model.SerializeToString())
    return onnx_path, data_path
