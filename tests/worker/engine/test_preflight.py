"""The pre-flight: each distinct layer timed once per CPU and ONNX Runtime version, and the predictions made
from the timings. Decisions are tested with injected layer timings (`layer_timers`); the one test that times on
this CPU asserts what was built and timed, never how fast."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.recipe import Recipe
from tests.onnx_models import hardswish_net
from tests.worker.engine.layer_timers import TableTimer, hardswish_blocks
from worker.engine.checks import model_facts
from worker.engine.preflight import (
    OrtKernelTimer,
    PreflightResult,
    TimedNode,
    Timing,
    TimingCache,
    preflight,
)
from worker.engine.quantize import prepare_for
from worker.engine.spec import no_progress

CPU: dict[str, Any] = {
    "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
    "cpu_features": ["amx_int8", "avx512_vnni"],
    "onnxruntime": "1.32.0",
}


@pytest.fixture(scope="module")
def hardswish(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The HardSwish net, prepared as mode auto's static candidates are, and one input."""
    tmp = tmp_path_factory.mktemp("hardswish")
    model = hardswish_net(tmp / "hs.onnx", channels=64, size=16, blocks=1)
    prepared = prepare_for(
        model, Recipe(mode="static", per_channel=True), model_facts(model), tmp / "prep", no_progress
    )
    return prepared.path, {"x": np.random.default_rng(0).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}


def _preflight(
    model: tuple[Path, dict[str, np.ndarray]], tmp: Path, cache: TimingCache, timer: TableTimer | OrtKernelTimer
) -> PreflightResult:
    path, feeds = model
    return preflight(path, feeds, tmp / "work", int8="vnni", cache=cache, timer=timer, deadline=math.inf)


def test_a_second_run_times_nothing_and_the_cache_is_kept_per_cpu_runtime_and_threads(
    hardswish: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    timer = hardswish_blocks()
    first = _preflight(hardswish, tmp_path, TimingCache(folder, **CPU), timer)
    layers = len(first.timings)
    assert layers >= 4 and len(timer.timed) == layers and first.layers_cached == 0
    assert {layer.key for layer in timer.timed} == set(first.timings)

    again = TableTimer({})  # would time every layer as float
    second = _preflight(hardswish, tmp_path, TimingCache(folder, **CPU), again)
    assert again.timed == [] and second.layers_cached == layers
    assert second.speedups() == first.speedups() and second.verdict() == first.verdict()

    others: list[dict[str, Any]] = [
        {"cpu_model": "AMD EPYC 9654"},
        {"onnxruntime": "1.33.0"},
        {"cpu_features": ["avx2"]},
        {"threads": 2},  # same file, its own entries
    ]
    for other in others:
        elsewhere = hardswish_blocks()
        _preflight(hardswish, tmp_path, TimingCache(folder, **{**CPU, **other}), elsewhere)
        assert len(elsewhere.timed) == layers, other
    files = sorted(folder.glob("preflight-*.json"))
    assert len(files) == 4
    stored = json.loads(files[0].read_text())
    assert {stored["cpu_model"], stored["onnxruntime"]} <= {CPU["cpu_model"], "AMD EPYC 9654", "1.32.0", "1.33.0"}


def test_a_damaged_cache_file_is_timed_again(hardswish: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    _preflight(hardswish, tmp_path, TimingCache(folder, **CPU), hardswish_blocks())
    [path] = folder.glob("preflight-*.json")
    path.write_text('{"entries": {"x": {"float_ms": "fast"}}')
    timer = hardswish_blocks()
    result = _preflight(hardswish, tmp_path, TimingCache(folder, **CPU), timer)
    assert timer.timed and result.layers_cached == 0


def test_the_verdict_names_the_op_type_that_blocks_int8(
    hardswish: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    result = _preflight(hardswish, tmp_path, TimingCache(None, **CPU), hardswish_blocks())
    verdict, helps = result.verdict()
    assert not helps and verdict.endswith("predicted)") and "int8 will not help here" in verdict
    assert "Conv 1.5x" in verdict and "blocks" in verdict, verdict
    speedups = result.speedups()
    assert all((speedups[kind] or 1.0) < 1 for kind in ("qdq", "qoperator", "s8s8")), speedups
    assert speedups["dynamic"] is None  # a CNN's dynamic variant (ConvInteger) is never timed
    ops = {row.op_type: row for row in result.ops()}
    assert ops["Conv"].speedups["qdq"] == pytest.approx(1.5)
    assert result.predict(Recipe(mode="static", per_channel=True)) == pytest.approx(speedups["qdq"], abs=1e-3)


def test_islands_pay_their_conversions_only_beside_int8_neighbours() -> None:
    """conv1 -> act -> conv2: the activation is left in float by the quantizer. All int8, it pays its
    conversions on both sides; with conv2 in float (nodes_to_exclude) only on its input side, and conv2 its own
    float time; a recipe that quantizes nothing around it pays nothing."""
    conv = Timing(float_ms=1.0, island_ms=1.2, int8_ms={"qdq": 0.5, "qoperator": 0.4})
    act = Timing(float_ms=0.2, island_ms=0.6)  # no int8 kind quantizes it
    nodes = {
        "conv1": TimedNode("conv1", "Conv", "c", (), ("act",)),
        "act": TimedNode("act", "HardSwish", "a", ("conv1",), ("conv2",)),
        "conv2": TimedNode("conv2", "Conv", "c", ("act",), ()),
    }
    result = PreflightResult(int8="vnni", nodes=nodes, timings={"c": conv, "a": act}, all_nodes=3)
    qdq = Recipe(mode="static")
    assert result.predicted_ms(qdq) == pytest.approx(0.5 + 0.6 + 0.5)
    assert result.predicted_ms(Recipe(mode="static", format="qoperator")) == pytest.approx(0.4 + 0.6 + 0.4)
    assert result.predicted_ms(Recipe(mode="static", nodes_to_exclude=("conv2",))) == pytest.approx(0.5 + 0.4 + 1.0)
    assert result.predicted_ms(Recipe(mode="static", op_types_to_quantize=("Gemm",))) == pytest.approx(2.2)
    assert result.predict(qdq) == pytest.approx(2.2 / 1.6)
    cost = result.exclusion_cost(qdq, ["conv2"])
    assert cost == pytest.approx((1.9 - 1.6) / 1.6)
    assert result.predict(Recipe(mode="static", activation_type="uint16")) is None  # not measured: no say


def test_layers_are_built_quantized_and_timed_on_this_cpu(
    hardswish: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """The real timer, briefly: every conv layer gets the three static kinds (ONNX Runtime's quantizer made
    them), the activations that it leaves in float none (they are islands), the Gemm a dynamic kind too."""
    result = _preflight(hardswish, tmp_path, TimingCache(None, **CPU), OrtKernelTimer(1, seconds=0.002))
    by_op: dict[str, set[str]] = {}
    for node in result.nodes.values():
        timing = result.timings[node.key]
        assert timing.float_ms > 0 and timing.island_ms > 0
        by_op.setdefault(node.op_type, set()).update(timing.int8_ms)
    assert by_op["Conv"] == {"qdq", "qoperator", "s8s8"}, by_op
    assert not by_op.get("HardSigmoid", by_op.get("HardSwish")), by_op
    assert "dynamic" in by_op["Gemm"], by_op
    assert result.verdict()[0]


def test_the_job_file_hands_the_workers_cache_folder_to_mode_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker names the folder (`Settings.preflight_cache_dir`: a dot folder under the input cache, whose
    eviction passes over dot names), the job file carries it, the engine hands it to the search."""
    from core.evaluation import EvaluationSpec
    from core.jobfile import JobFile
    from core.model import TensorSpec
    from service.settings import Settings
    from worker.engine import job as job_module
    from worker.sandbox import job_limits

    settings = Settings(data_dir=tmp_path / "var")
    assert settings.preflight_cache_dir.parent == settings.cache_dir
    assert settings.preflight_cache_dir.name.startswith(".")
    spec = JobFile(
        job_id="job-1",
        model_path=tmp_path / "m.onnx",
        inputs=(TensorSpec("x", "float32", (1, 16)),),
        recipe=Recipe(mode="auto"),
        evaluation=EvaluationSpec(),
        limits=job_limits(memory_bytes=0, timeout_s=60, file_bytes=0, open_files=0),
        preflight_cache=settings.preflight_cache_dir,
    )
    spec.write(tmp_path)
    handed: dict[str, Any] = {}

    def search(*args: Any, **kwargs: Any) -> Any:
        handed.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(job_module, "auto_quantize", search)
    with pytest.raises(RuntimeError):
        job_module._run(JobFile.read(tmp_path), spec.model_path, tmp_path / "engine", lambda *a: None, lambda n: None)
    assert handed["preflight_cache"] == settings.preflight_cache_dir


def test_a_clip_after_a_quantized_node_is_folded_away_in_int8() -> None:
    """Paddle's hard-swish is x * Clip(x + 3, 0, 6) / 6: the quantizer folds the Clip into the range of the
    quantized Add before it, so in int8 it costs nothing; after a node left in float it stays."""
    add = Timing(float_ms=0.2, island_ms=0.3, int8_ms={"qdq": 0.1})
    clip = Timing(float_ms=0.2, island_ms=0.5)
    nodes = {
        "add": TimedNode("add", "Add", "add", (), ("clip",)),
        "clip": TimedNode("clip", "Clip", "clip", ("add",), ()),
    }
    result = PreflightResult(int8="vnni", nodes=nodes, timings={"add": add, "clip": clip}, all_nodes=2)
    assert result.predicted_ms(Recipe(mode="static")) == pytest.approx(0.1)
    assert result.predicted_ms(Recipe(mode="static", nodes_to_exclude=("add",))) == pytest.approx(0.4)
    rows = {row.op_type: row for row in result.ops()}
    assert rows["Clip"].free_in == ["qdq"] and rows["Clip"].speedups["qdq"] is None
    assert "Clip folded away" in result.verdict()[0]
