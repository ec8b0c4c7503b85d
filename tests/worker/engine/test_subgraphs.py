"""Static int8 inside If/Loop/Scan bodies: their tensors calibrated, their Conv/MatMul/Gemm quantized
(QDQ and QOperator), the result checked and close to float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource, JobFile, Limits
from core.recipe import Recipe
from tests.worker.engine import pitfall_models as pm
from tests.worker.engine.test_quantize import _npz, _session, worst_cosine
from worker.engine import job
from worker.engine.data import model_inputs
from worker.engine.quantize import quantize
from worker.engine.subgraphs import calibrate_bodies, scopes

QOPERATOR = {"QLinearConv", "QLinearMatMul"}


def _bodies(path: Path) -> dict[str, onnx.GraphProto]:
    """Every body of the model by its scope key, `<owner's first output>.<attribute>` joined by ` > `."""
    model = onnx.load(str(path))
    return {" > ".join(s.key): s.graph for s in scopes(model.graph) if s.key}


def _fed_by_dq(graph: onnx.GraphProto, op_type: str) -> list[str]:
    """The `op_type` nodes of `graph` whose activation and weight both come out of a DequantizeLinear."""
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type == op_type and n.input[0] in dq and n.input[1] in dq]


def _audio(tmp: Path, n: int = 6) -> tuple[Path, DatasetSource, list[dict[str, np.ndarray]]]:
    """The streaming audio model (the If on an `sr` input), with data taking both branches."""
    rng = np.random.default_rng(1)
    arrays = {
        "audio": rng.normal(0, 0.3, (n, 2, 64)).astype(np.float32),
        "state": rng.normal(0, 0.3, (n, 2, 2, 16)).astype(np.float32),
        "sr": np.array([16000, 8000] * (n // 2), np.int64),
    }
    feeds = [{k: np.asarray(v[i]) for k, v in arrays.items()} for i in range(n)]
    return pm.streaming_audio(tmp / "audio.onnx"), _npz(tmp / "audio.npz", **arrays), feeds


def _long_chunks(tmp: Path, n: int = 6) -> tuple[Path, DatasetSource, list[dict[str, np.ndarray]]]:
    audio = np.random.default_rng(2).normal(0, 0.5, (n, 2, 64)).astype(np.float32)
    feeds = [{"audio": a} for a in audio]
    return pm.shape_if_streaming(tmp / "shape_if.onnx"), _npz(tmp / "long.npz", audio=audio), feeds


def test_both_if_branches_are_quantized_in_qdq_and_qoperator(tmp_path: Path) -> None:
    model, data, feeds = _audio(tmp_path)
    qdq = quantize(model, Recipe(), tmp_path / "qdq", calibration=data)
    bodies = _bodies(qdq.model_path)
    for branch, tag in (("/If_output_0.then_branch", "sr16k"), ("/If_output_0.else_branch", "sr8k")):
        assert _fed_by_dq(bodies[branch], "Conv") == [f"/_model/{tag}/Conv"]
        assert _fed_by_dq(bodies[branch], "MatMul") == [f"/_model/{tag}/MatMul"]
    assert {(n.name, n.subgraph) for n in qdq.facts.quantized_in_subgraphs} == {
        ("/_model/sr16k/Conv", "/If.then_branch"),
        ("/_model/sr16k/MatMul", "/If.then_branch"),
        ("/_model/sr8k/Conv", "/If.else_branch"),
        ("/_model/sr8k/MatMul", "/If.else_branch"),
    }
    assert not qdq.facts.float_in_subgraphs
    assert not any("stay in float" in w and "subgraphs" in w for w in qdq.warnings)
    assert qdq.facts.check is not None and qdq.facts.check.onnx_checker and qdq.facts.check.ran_on_sample
    onnx.checker.check_model(str(qdq.model_path), full_check=True)
    assert worst_cosine(model, qdq.model_path, feeds) > 0.99

    qop = quantize(model, Recipe(format="qoperator"), tmp_path / "qop", calibration=data)
    bodies = _bodies(qop.model_path)
    for branch in ("/If_output_0.then_branch", "/If_output_0.else_branch"):
        assert {n.op_type for n in bodies[branch].node} >= QOPERATOR
    assert {n.op_type for n in qop.facts.quantized_in_subgraphs} == QOPERATOR
    onnx.checker.check_model(str(qop.model_path), full_check=True)
    assert worst_cosine(model, qop.model_path, feeds) > 0.99


def test_shape_switched_branches_outer_weights_and_a_nested_loop(tmp_path: Path) -> None:
    """The If's condition comes from a shape; the long branch reads main-graph weights and holds a Loop
    whose body reads them too. Calibrated on long chunks only: the long branch and its Loop go int8, the
    short branch (never run) stays float, and the warning says why."""
    model, data, feeds = _long_chunks(tmp_path)
    out = quantize(model, Recipe(per_channel=True), tmp_path / "q", calibration=data)
    bodies = _bodies(out.model_path)
    long_branch = bodies["/If_output_0.then_branch"]
    assert _fed_by_dq(long_branch, "Conv") == ["/long/Conv"]
    assert _fed_by_dq(long_branch, "MatMul") == ["/long/MatMul"]
    loop = bodies["/If_output_0.then_branch > /long/out.body"]
    assert len(_fed_by_dq(loop, "Gemm") + _fed_by_dq(loop, "MatMul")) == 1  # MatMul+Add fused into a Gemm
    # The int8 copies of the outer weights live in the bodies; the float ones nothing reads are gone.
    top = {t.name for t in onnx.load(str(out.model_path)).graph.initializer}
    assert not top & {"conv.weight", "proj.weight", "loop.weight"}
    assert {n.name for n in out.facts.float_in_subgraphs} == {"/short/Conv", "/short/MatMul"}
    assert any("never ran" in w and "/short/Conv" in w for w in out.warnings)
    onnx.checker.check_model(str(out.model_path), full_check=True)
    assert worst_cosine(model, out.model_path, feeds) > 0.99
    # Short chunks take the float branch (the top graph's MatMul after it is int8).
    short = np.random.default_rng(3).normal(0, 0.5, (3, 2, 16)).astype(np.float32)
    assert worst_cosine(model, out.model_path, [{"audio": a} for a in short]) > 0.99


@pytest.mark.parametrize("name", ["loop", "scan"])
def test_loop_and_scan_bodies(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(4)
    if name == "loop":
        model = pm.loop_body(tmp_path / "m.onnx")
        arrays = {"x": rng.normal(0, 1, (6, 2, 8)).astype(np.float32)}
    else:
        model = pm.scan_body(tmp_path / "m.onnx")
        arrays = {
            "x": rng.normal(0, 1, (6, 5, 2, 8)).astype(np.float32),
            "h0": rng.normal(0, 0.3, (6, 2, 16)).astype(np.float32),
        }
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(6)]
    out = quantize(model, Recipe(), tmp_path / "q", calibration=_npz(tmp_path / "d.npz", **arrays))
    (body,) = _bodies(out.model_path).values()
    quantized = _fed_by_dq(body, "MatMul") + _fed_by_dq(body, "Gemm")
    assert len(quantized) == (1 if name == "loop" else 2)
    assert len(out.facts.quantized_in_subgraphs) == len(quantized) and not out.facts.float_in_subgraphs
    onnx.checker.check_model(str(out.model_path), full_check=True)
    assert worst_cosine(model, out.model_path, feeds) > 0.99


def test_ranges_inside_a_scan_body_are_those_of_the_data(tmp_path: Path) -> None:
    """The body's state `h_out` is every step's hidden state, which the model also returns stacked
    (`hs`): its MinMax range is the min and max of `hs` over the data. Entropy gets a histogram range
    within it."""
    from onnxruntime.quantization.calibrate import TensorData

    from worker.engine.calibration import seed_histograms

    rng = np.random.default_rng(5)
    model = pm.scan_body(tmp_path / "scan.onnx")
    arrays = {
        "x": rng.normal(0, 1, (4, 5, 2, 8)).astype(np.float32),
        "h0": rng.normal(0, 0.3, (4, 2, 16)).astype(np.float32),
    }
    source = _npz(tmp_path / "d.npz", **arrays)
    probe = onnx.load(str(model))
    probe.graph.output.append(onnx.helper.make_tensor_value_info("hs", onnx.TensorProto.FLOAT, None))
    onnx.save(probe, str(tmp_path / "probe.onnx"))
    session = _session(tmp_path / "probe.onnx")
    hs = np.stack([session.run(["hs"], {k: v[i] for k, v in arrays.items()})[0] for i in range(4)])
    inputs = model_inputs(model)
    ranges = calibrate_bodies(model, Recipe(), ["MatMul", "Add", "Tanh"], source, inputs, seed=seed_histograms)
    assert ranges is not None
    (key,) = [k for k in ranges.scopes if k]
    h_out: TensorData = ranges.scopes[key]["h_out"]
    np.testing.assert_allclose([h_out.lowest, h_out.highest], [hs.min(), hs.max()], rtol=1e-6)
    assert {"x_t", "h_in", "scan/xw", "scan/hw", "scan/sum"} <= set(ranges.scopes[key])
    assert not (tmp_path / "scan.bodies.onnx").exists()
    entropy = calibrate_bodies(
        model, Recipe(calibration_method="entropy"), ["MatMul", "Add", "Tanh"], source, inputs, seed=seed_histograms
    )
    assert entropy is not None
    lo, hi = entropy.scopes[key]["h_out"].range_value
    assert hs.min() - 1e-6 <= lo < hi <= hs.max() + 1e-6


def test_nodes_to_exclude_reaches_into_bodies(tmp_path: Path) -> None:
    model, data, feeds = _audio(tmp_path)
    out = quantize(model, Recipe(nodes_to_exclude=("/_model/sr8k/Conv",)), tmp_path / "q", calibration=data)
    bodies = _bodies(out.model_path)
    assert _fed_by_dq(bodies["/If_output_0.else_branch"], "Conv") == []
    assert _fed_by_dq(bodies["/If_output_0.else_branch"], "MatMul") == ["/_model/sr8k/MatMul"]
    assert "/_model/sr8k/Conv" not in {n.name for n in out.facts.quantized_in_subgraphs}
    assert not out.facts.float_in_subgraphs  # excluded on purpose, not left behind
    assert worst_cosine(model, out.model_path, feeds) > 0.99


def test_a_static_job_reports_the_int8_nodes_inside_bodies(tmp_path: Path) -> None:
    """Through the worker's entry (run_job): the result lists the nodes quantized inside bodies and counts
    the Q/DQ pairs there."""
    model, data, _ = _audio(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    spec = EvaluationSpec(latency_runs=2, warmup_runs=0, max_samples=4)
    result, _ = job.run_job(
        JobFile("j", model, tuple(model_inputs(model)), Recipe(mode="static"), spec, Limits(), data, data, True), work
    )
    assert result.quantization is not None
    inside = result.quantization.quantized_in_subgraphs
    assert len(inside) == 4 and {n.subgraph for n in inside} == {"/If.then_branch", "/If.else_branch"}
    # The top graph has one MatMul: its two inputs' Q/DQ and its output's; the branches add theirs.
    assert result.quantization.quantized_op_counts["DequantizeLinear"] > 6


def test_auto_picks_int8_inside_the_branches(tmp_path: Path) -> None:
    """Mode auto's candidates are static recipes: its pick on the streaming audio model holds int8
    inside both If branches (the deterministic meter of test_auto times the graph)."""
    from tests.worker.engine.test_auto import OpsMeter, _run

    model, _, _ = _audio(tmp_path)
    rng = np.random.default_rng(6)
    data = {
        "audio": rng.normal(0, 0.3, (8, 2, 64)).astype(np.float32),
        "state": rng.normal(0, 0.3, (8, 2, 2, 16)).astype(np.float32),
        "sr": np.array([16000, 8000] * 4, np.int64),
    }
    outcome, _, search = _run(tmp_path, model, data, OpsMeter())
    assert search["verdict"] == "quantized", search
    assert {n.subgraph for n in outcome.facts.quantized_in_subgraphs} == {"/If.then_branch", "/If.else_branch"}
    bodies = _bodies(outcome.model_path)
    assert all(_fed_by_dq(g, "Conv") or {"QLinearConv"} <= {n.op_type for n in g.node} for g in bodies.values()), (
        "every branch's Conv is int8"
    )


def test_a_loop_whose_tensors_grow_falls_back_to_minmax_ranges_for_histograms(tmp_path: Path) -> None:
    """Entropy needs the body's values, which a Loop cannot stack when they change shape between iterations;
    its min and max it can: those ranges are used, and the warning says so."""
    model = pm.growing_loop(tmp_path / "grow.onnx")
    x = np.random.default_rng(7).normal(0, 1, (4, 2, 8)).astype(np.float32)
    data = _npz(tmp_path / "d.npz", x=x)
    out = quantize(model, Recipe(calibration_method="entropy"), tmp_path / "q", calibration=data)
    assert [n.name for n in out.facts.quantized_in_subgraphs] == ["grow/MatMul"]
    assert any("entropy ranges could not be collected inside" in w and "MinMax" in w for w in out.warnings)
    assert worst_cosine(model, out.model_path, [{"x": a} for a in x]) > 0.99
