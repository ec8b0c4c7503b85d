"""Sensitivity: per-channel error sees crushed small channels, the dynamic simulation matches ONNX
Runtime's own rounding, bypassing a Q/DQ pair keeps a folded Relu, and the ranking finds the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from tests.onnx_models import encoder_inputs, outlier_encoder
from worker.engine.data import Batch
from worker.engine.sensitivity import ChannelError, dynamic_sensitivity, dynamic_uint8


def test_per_channel_error_sees_what_an_outlier_channel_hides() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    x[:, 0] = 3000.0  # one outlier channel holds almost all the energy
    err = ChannelError()
    err.add(x, dynamic_uint8(x))
    assert err.sqnr_db is not None and err.sqnr_db > 30  # the whole tensor looks fine
    assert err.nsr is not None and err.nsr > 0.5  # most channels are mostly lost


def test_dynamic_rounding_matches_onnx_runtime() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(1).normal(0, 3, (4, 16)).astype(np.float32)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(dynamic_uint8(x), want, atol=1e-6)


def test_dynamic_ranking_finds_the_down_projection(tmp_path: Path) -> None:
    model = outlier_encoder(tmp_path / "e.onnx")
    data = encoder_inputs(6)
    batches = [Batch({k: v[i] for k, v in data.items()}, None) for i in range(6)]
    sens = dynamic_sensitivity(model, batches, candidate="dynamic int8")
    assert sens.nodes[0].node == "layer0.ffn_down"
    assert sens.nodes[0].score > 10 * sens.nodes[1].score
    assert sens.groups()[0] == ["layer0.ffn_down"]
    assert not list(tmp_path.glob("*.sensitivity.onnx"))  # the augmented copy is removed


def test_bypassing_a_pair_keeps_the_relu_the_quantizer_folded(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from worker.engine.sensitivity import _folded_activations, bypass_qdq

    model = outlier_encoder(tmp_path / "e.onnx")
    data = encoder_inputs(4)
    feeds = [{k: v[i] for k, v in data.items()} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(model), str(tmp_path / "q.onnx"), Reader())
    q = onnx.load(str(tmp_path / "q.onnx"))
    folded = _folded_activations(model, q)
    assert "layer0.ffn_act" in folded  # the FFN Relu lives on only as the Q/DQ pair's clamp
    bypassed = bypass_qdq(tmp_path / "q.onnx", ["layer0.ffn_act"], tmp_path / "b.onnx", folded)
    restored = [n for n in onnx.load(str(bypassed)).graph.node if n.name.endswith("_restored")]
    assert [n.op_type for n in restored] == ["Relu"]
    ort.InferenceSession(str(bypassed), providers=["CPUExecutionProvider"]).run(None, feeds[0])


def test_dynamic_sensitivity_when_every_matmul_reads_a_graph_input(tmp_path: Path) -> None:
    """Nothing to fetch from the model (both MatMuls read the input `x` itself): ONNX Runtime's
    `run([])` means "every output", which once broke `auto` on this model."""
    from tests.onnx_models import cancelling_matmuls

    model = cancelling_matmuls(tmp_path / "c.onnx", features=16)
    x = np.random.default_rng(0).normal(0, 1, (4, 16)).astype(np.float32)
    sens = dynamic_sensitivity(model, [Batch({"x": x}, None, num_samples=4)], candidate="dynamic int8")
    assert {n.node for n in sens.nodes} == {"mm_a", "mm_b"}
    assert all(n.score > 0 for n in sens.nodes)  # the input's rounding and the weights' both count
    assert sens.samples == 4
