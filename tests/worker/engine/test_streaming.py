"""Big external-data models quantized tensor by tensor (worker/engine/streaming.py): the same models as the
path that loads every weight, and a peak that does not hold the weights several times."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.model import external_locations
from core.recipe import Mode, Recipe
from worker.engine import streaming
from worker.engine.evaluate import evaluate
from worker.engine.quantize import quantize

ROOT = Path(__file__).resolve().parents[3]
STREAMED_STEP = "without loading its weights"


def _net(path: Path, *, seed: int = 0) -> Path:
    """Conv -> Relu -> Flatten -> MatMul+Add -> Relu -> Gemm(transB) -> Relu -> MatMul, every weight in
    `weights.bin` beside the model: input `x` [batch, 4, 6, 6], output `y` [batch, 16]."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return rng.normal(0.0, scale, shape).astype(np.float32)

    inits = [
        numpy_helper.from_array(w(8, 4, 3, 3), "conv.w"),
        numpy_helper.from_array(w(8, scale=0.05), "conv.b"),
        numpy_helper.from_array(w(288, 64, scale=0.06), "fc1.w"),
        numpy_helper.from_array(w(64, scale=0.05), "fc1.b"),
        numpy_helper.from_array(w(32, 64, scale=0.1), "fc2.w"),
        numpy_helper.from_array(w(32, scale=0.05), "fc2.b"),
        numpy_helper.from_array(w(32, 16, scale=0.2), "head.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="conv_relu"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "fc1.w"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "fc1.b"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="fc1_relu"),
        helper.make_node("Gemm", ["r1", "fc2.w", "fc2.b"], ["g2"], name="fc2", transB=1),
        helper.make_node("Relu", ["g2"], ["r2"], name="fc2_relu"),
        helper.make_node("MatMul", ["r2", "head.w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=64)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


RECIPES: dict[str, dict[str, Any]] = {
    "static_qdq": {"mode": "static"},
    "static_qoperator_per_channel": {"mode": "static", "format": "qoperator", "per_channel": True},
    "static_entropy": {"mode": "static", "calibration_method": "entropy"},
    "dynamic": {"mode": "dynamic"},
    "dynamic_per_channel": {"mode": "dynamic", "per_channel": True},
    "weight_only_int4": {"mode": "weight_only", "weight_type": "int4", "block_size": 32},
    "fp16": {"mode": "fp16"},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_streamed_path_makes_the_model_the_loading_path_makes(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "QUANTIZE_CHUNK", 1000)  # weights quantized in pieces too
    model = _net(tmp_path / "model" / "net.onnx")
    x = np.random.default_rng(1).random((6, 1, 4, 6, 6), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    source = DatasetSource(tmp_path / "calib.npz", "npz")
    spec = Recipe(**RECIPES[name])
    loaded = quantize(model, spec, tmp_path / "loaded", calibration=source)
    streamed = quantize(model, spec, tmp_path / "streamed", calibration=source, streaming_bytes=0)

    assert not any(STREAMED_STEP in s for s in loaded.preprocessing_steps)
    assert any(STREAMED_STEP in s for s in streamed.preprocessing_steps)
    assert streamed.facts.quantized_op_counts == loaded.facts.quantized_op_counts
    # One data file beside the result, nothing pointing back into the work folder.
    out = onnx.load(str(streamed.model_path), load_external_data=False)
    assert external_locations(out) == ["quantized.onnx.data"]
    assert sorted(p.name for p in streamed.model_path.parent.iterdir()) == ["quantized.onnx", "quantized.onnx.data"]
    feed = x[:3].reshape(3, 4, 6, 6)
    np.testing.assert_allclose(_run(streamed.model_path, feed), _run(loaded.model_path, feed), rtol=1e-5, atol=1e-5)


def test_write_gathers_references_and_inline_tensors_and_converts_chunk_by_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_path = _net(tmp_path / "src" / "net.onnx")
    model = onnx.load(str(model_path), load_external_data=False)
    model.graph.initializer.append(numpy_helper.from_array(np.arange(600, dtype=np.float32), "inline"))
    want = {t.name: numpy_helper.to_array(t, str(model_path.parent)) for t in model.graph.initializer}
    monkeypatch.setattr(streaming, "CHUNK", 1000)  # several chunks per tensor
    half = streaming.float16_converter()
    fc1 = next(t for t in model.graph.initializer if t.name == "fc1.w")
    fc1.data_type = TensorProto.FLOAT16  # as the float16 converter declares a weight it cannot read
    streaming.write(model, tmp_path / "out" / "m.onnx", source_dir=model_path.parent, convert={"fc1.w": half})

    saved = onnx.load(str(tmp_path / "out" / "m.onnx"))
    got = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    for name, values in want.items():
        expected = values.astype(np.float16) if name == "fc1.w" else values
        np.testing.assert_array_equal(got[name], expected)
    refs = onnx.load(str(tmp_path / "out" / "m.onnx"), load_external_data=False)
    assert external_locations(refs) == ["m.onnx.data"]


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np, onnx
    from onnx import TensorProto, helper
    from core.recipe import Recipe
    from worker.engine.preprocess import prepare_model
    from worker.engine.quantize import _dynamic

    folder, threshold = Path(sys.argv[1]), int(sys.argv[2])
    n, side = 16, 1024
    data = folder / "m" / "w.bin"
    data.parent.mkdir(parents=True)
    inits, nodes, prev = [], [], "x"
    with data.open("wb") as f:
        for i in range(n):
            offset = f.tell()
            w = np.random.default_rng(i).standard_normal((side, side), dtype=np.float32)
            w.tofile(f)
            t = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", "w.bin"), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, side])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "m" / "m.onnx"))
    size = data.stat().st_size
    # What the steps import (sympy for symbolic shape inference) is not the weights.
    import onnxruntime.quantization.quantize, onnxruntime.tools.symbolic_shape_infer  # noqa: E401, F401
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prepared = prepare_model(folder / "m" / "m.onnx", folder / "prep", streaming_bytes=threshold)
    (folder / "out").mkdir()
    _dynamic(prepared, Recipe(mode="dynamic"), folder / "out" / "quantized.onnx", [])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"size": size, "growth": after - before}))
    """
)


def test_streamed_preprocessing_and_dynamic_quantization_never_hold_the_weights(tmp_path: Path) -> None:
    """A 64 MB model of 16 weights, pre-processed and quantized (dynamic int8) in a child process: its peak
    grows by less than the model's size (0.6x measured; the path that loads every weight grows by about 4x:
    the model, shape inference's copies, the quantizer's save)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["growth"] < got["size"], got


_GATHER_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np, onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from core.recipe import Recipe
    from worker.engine.preprocess import prepare_model
    from worker.engine.quantize import _static

    folder = Path(sys.argv[1])
    vocab, dim = 16384, 1024
    data = folder / "m" / "w.bin"
    data.parent.mkdir(parents=True)
    with data.open("wb") as f:
        for i in range(0, vocab, 2048):
            np.random.default_rng(i).standard_normal((2048, dim), dtype=np.float32).tofile(f)
    emb = onnx.TensorProto(name="emb", data_type=TensorProto.FLOAT, dims=[vocab, dim])
    emb.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(vocab * dim * 4))):
        e = emb.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0), helper.make_node("Relu", ["e"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, dim])], [emb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "m" / "m.onnx"))
    size = data.stat().st_size
    import onnxruntime.quantization.quantize, onnxruntime.tools.symbolic_shape_infer  # noqa: E401, F401
    ranges = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.array(-4.0, np.float32), highest=np.array(4.0, np.float32)) for n in ("e", "y")
    })
    prepared = prepare_model(folder / "m" / "m.onnx", folder / "prep", streaming_bytes=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (folder / "out").mkdir()
    _static(prepared, Recipe(mode="static"), ranges, folder / "out" / "quantized.onnx", [])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"size": size, "growth": after - before}))
    """
)


def test_a_streamed_embedding_is_quantized_static_without_loading_it(tmp_path: Path) -> None:
    """A 64 MB Gather embedding, quantized static (QDQ) in a child process: ORT's quantizer reads it mapped from
    its file, its peak grows by 0.76x the weight (measured; 1.0x when ORT's reader copied it, 2.0x when static
    quantization loaded the whole model first)."""
    proc = subprocess.run(
        [sys.executable, "-c", _GATHER_CHILD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["growth"] < 1.5 * got["size"], got


def test_a_big_model_with_float16_weights_is_measured_one_session_at_a_time(tmp_path: Path) -> None:
    model = _net(tmp_path / "model" / "net.onnx")
    x = np.random.default_rng(2).random((5, 1, 4, 6, 6), dtype=np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    source = DatasetSource(tmp_path / "eval.npz", "npz")
    half = quantize(model, Recipe(mode=Mode.FP16), tmp_path / "fp16", calibration=source).model_path
    int8 = quantize(model, Recipe(mode=Mode.DYNAMIC), tmp_path / "int8", calibration=source).model_path
    assert streaming.measured_apart(model, half, threshold=0)
    assert not streaming.measured_apart(model, int8, threshold=0)  # int8 weights: side by side fits
    assert not streaming.measured_apart(model, half)  # a small model: side by side

    spec = EvaluationSpec(latency_runs=3, warmup_runs=1)
    apart = evaluate(model, half, spec, data=source, apart=True)
    side = evaluate(model, half, spec, data=source, apart=False)
    assert (apart.facts.interleaved, side.facts.interleaved) == (False, True)
    assert any("not interleaved" in w for w in apart.warnings)
    assert not any("not interleaved" in w for w in side.warnings)
    assert apart.facts.samples == side.facts.samples == 5
    assert apart.facts.latency_runs == 3
    assert apart.comparison.outputs == side.comparison.outputs  # the same outputs compared the same way
    assert apart.comparison.fidelity == side.comparison.fidelity
    for measured in (apart.original, apart.quantized):
        assert measured.latency_ms is not None and measured.latency_ms.p50 > 0


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_gather_embedding_is_quantized_from_its_mapped_file_as_the_loading_path_quantizes_it(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT's quantizers read a streamed weight mapped from its file (flattened as a view, not copied; its range
    and values taken piece by piece, each piece's pages let go): the same quantized embedding, bit for bit, as
    when every weight is loaded."""
    monkeypatch.setattr(streaming, "QUANTIZE_CHUNK", 1000)  # the embedding in 16 pieces
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(0.0, 0.5, (500, 32)).astype(np.float32), "emb")
    fc = numpy_helper.from_array(rng.normal(0.0, 0.2, (32, 8)).astype(np.float32), "fc.w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "fc.w"], ["y"])],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
        [emb, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "model" / "emb.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=64)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 500, (4, 1, 6), dtype=np.int64))
    source = DatasetSource(tmp_path / "calib.npz", "npz")
    loaded = quantize(path, Recipe(mode=Mode(mode)), tmp_path / "loaded", calibration=source)
    streamed = quantize(path, Recipe(mode=Mode(mode)), tmp_path / "streamed", calibration=source, streaming_bytes=0)

    def weights(p: Path) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t, str(p.parent)) for t in onnx.load(str(p)).graph.initializer}

    got, want = weights(streamed.model_path), weights(loaded.model_path)
    assert "emb_quantized" in want and want["emb_quantized"].dtype.kind in "iu"
    assert got.keys() == want.keys()
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
