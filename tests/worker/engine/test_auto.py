"""Mode auto: whole-model candidates, mixed precision, the float model as a candidate, objectives.

Speed decisions are tested with a deterministic meter (the share of compute nodes running int8
sets a candidate's latency), so the search logic is checked without timing anything; one test
runs the real meter and checks that the verdict agrees with what it measured."""

from __future__ import annotations

import importlib
import json
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core.errors import RuleError
from core.evaluation import EvaluationSpec
from core.jobfile import DatasetSource
from core.model import model_facts
from core.preflight_timings import MEASURED_FILE
from core.progress import CandidateProgress, Note
from core.recipe import Recipe
from tests.ocr_models import ocr_detector, ocr_recognizer
from tests.onnx_models import (
    INTEGER_QUANTIZED_OPS,
    cancelling_matmuls,
    conv_classifier,
    encoder_inputs,
    hardswish_net,
    labelled_by_the_model,
    matmul_mlp,
    outlier_encoder,
    spiky_cnn,
    spiky_images,
)
from tests.worker.engine.layer_timers import TableTimer, fast_int8, hardswish_blocks
from worker.engine import evaluate as evaluate_module
from worker.engine import fidelity as fidelity_module
from worker.engine.auto import FASTER_MARGIN, auto_quantize, rank_groups
from worker.engine.checks import model_facts as engine_model_facts
from worker.engine.data import model_inputs
from worker.engine.evaluate import Evaluation, evaluate
from worker.engine.fidelity import is_token_model
from worker.engine.preflight import PreflightResult, TimedNode, Timing
from worker.engine.quantize import preparation, quantize
from worker.engine.results import QuantizationOutcome
from worker.preflight_timings import TimingsKeeper

COMPUTE = ("MatMul", "Gemm", "Conv")
INT8_COMPUTE = ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "MatMulNBits", "QLinearConv", "QLinearMatMul")
FLOAT_MS = 10.0
FEW_RUNS = EvaluationSpec(latency_runs=3, warmup_runs=1, max_seconds=60)


class EachOnItsOwn:
    """`compare_many` as one `compare` per candidate: a deterministic meter's timings do not depend
    on what else is timed in the same loop."""

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        raise NotImplementedError

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        pairs = [self.compare(c, runs) for c in candidates]
        return FLOAT_MS, [p50 for _, p50 in pairs]


class OpsMeter(EachOnItsOwn):
    """Latency from the graph: the more compute nodes read 8-bit Q/DQ (or are integer kernels), the
    faster; 16-bit Q/DQ (com.microsoft domain here) buys nothing; `float_like` is the p50 of models
    with no int8 compute (float16 included)."""

    def __init__(self, *, float_like: float = FLOAT_MS, best: float = 0.5 * FLOAT_MS) -> None:
        self.float_like = float_like
        self.best = best
        self.calls: list[tuple[str, int]] = []

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        model = onnx.load(str(candidate), load_external_data=False)
        producers = {o: n for n in model.graph.node for o in n.output}
        int8 = total = 0
        for node in model.graph.node:
            if node.op_type in INT8_COMPUTE:
                int8 += 1
                total += 1
            elif node.op_type in COMPUTE:
                total += 1
                dq = producers.get(node.input[0])
                if dq is not None and dq.op_type == "DequantizeLinear" and dq.domain != "com.microsoft":
                    int8 += 1
        self.calls.append((str(candidate), runs))
        share = int8 / total if total else 0.0
        return FLOAT_MS, self.float_like - (self.float_like - self.best) * share


class SlowMeter(EachOnItsOwn):
    """Every candidate measures `factor` times float."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        return FLOAT_MS, FLOAT_MS * self.factor


def _run(
    tmp: Path,
    model: Path,
    data: dict[str, np.ndarray],
    meter: Any,
    *,
    evaluation: EvaluationSpec = FEW_RUNS,
    kernels: TableTimer | None = None,
    preflight_cache: Path | None = None,
    apart: bool | None = None,
    whole_models_only: bool | None = None,
    **recipe: Any,
) -> tuple[QuantizationOutcome, Evaluation, dict[str, Any]]:
    """Mode auto on `data` (calibration and evaluation both); `meter` None times on this CPU (the pre-flight
    too); with a meter the pre-flight's layers time as `kernels` says (default: int8 faster, S8S8 slower)."""
    np.savez(tmp / "data.npz", **data)
    source = DatasetSource(tmp / "data.npz", "npz")
    notes: list[Note] = []
    keeper = TimingsKeeper(preflight_cache) if preflight_cache is not None else None  # as the worker keeps it
    shutil.rmtree(tmp / "job", ignore_errors=True)
    (tmp / "job").mkdir()  # the job's own folder
    outcome, measured = auto_quantize(
        model,
        Recipe(mode="auto", **recipe),
        tmp / "work",
        evaluation,
        calibration=source,
        data=source,
        meter=meter,
        int8="vnni" if meter is not None else None,
        kernels=kernels or (fast_int8() if meter is not None else None),
        preflight_timings=keeper.hand_in(tmp / "job" / "inputs") if keeper else None,
        preflight_out=tmp / "job" / MEASURED_FILE if keeper else None,
        note=notes.append,
        apart=apart,
        whole_models_only=whole_models_only,
    )
    if keeper is not None:
        keeper.take_back(tmp / "job")
    NOTES[id(outcome)] = notes
    return outcome, measured, _search(outcome)


NOTES: dict[int, list[Note]] = {}  # the notes of each search `_run` made, by its outcome


def _search(outcome: QuantizationOutcome) -> dict[str, Any]:
    """The search as the result records it (JSON)."""
    assert outcome.facts.auto is not None
    return outcome.facts.auto.model_dump(mode="json")


@pytest.fixture(scope="module")
def encoder_search(tmp_path_factory: pytest.TempPathFactory) -> tuple[QuantizationOutcome, dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("encoder")
    model = outlier_encoder(tmp / "encoder.onnx")
    outcome, _, search = _run(tmp, model, encoder_inputs(24), OpsMeter())
    return outcome, search, model


def test_all_int8_misses_the_floor_and_mixed_precision_meets_it(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path],
) -> None:
    outcome, search, _ = encoder_search
    whole = [c for c in search["candidates"] if c["recipe"]["mode"] in ("static", "dynamic") and not c["error"]]
    assert whole and all(c["fidelity"] < 0.99 and not c["within_budget"] for c in whole)
    assert search["verdict"] == "quantized"
    chosen = next(s for s in search["steps"] if s["name"] == search["chosen"])
    assert chosen["within_budget"] and chosen["fidelity"] >= 0.99 and chosen["metric"] == "cosine"
    assert chosen["speedup"] >= 1 + FASTER_MARGIN
    # The outlier feeds the FFN down-projection: it goes back to float (with, in static QDQ, the
    # attention-mask Add whose -10000 entries crush the scores), and little else does.
    excluded = search["effective_recipe"]["nodes_to_exclude"]
    assert "layer0.ffn_down" in excluded and len(excluded) <= 4
    assert outcome.warnings == [] or not outcome.warnings[0].startswith("Keep float")
    notes: list[Note] = NOTES[id(outcome)]
    assert any(n.text.startswith("search step 1") and n.candidate is None for n in notes)
    # One note per whole-model candidate, in order, carrying the candidate typed; the search's later
    # notes carry none, and the last one (the pick's evaluation) ends the candidate for good.
    tried = [n.candidate for n in notes if n.candidate is not None]
    names = [c["name"] for c in search["candidates"]]
    assert tried == [CandidateProgress(k, len(names), name) for k, name in enumerate(names, start=1)]
    assert all(
        n.text == f"candidate {n.candidate.index} of {len(names)}: {n.candidate.name}" for n in notes if n.candidate
    )
    after = notes[max(i for i, n in enumerate(notes) if n.candidate is not None) + 1 :]
    assert after and all(n.candidate is None for n in after) and notes[-1].text.startswith("evaluating ")
    assert notes[0].text.startswith("pre-flight") and notes[0].candidate is None


def test_one_session_at_a_time_gives_the_same_search(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path], tmp_path: Path
) -> None:
    """A big model's search (issue #24: float's outputs spilled to disk before any candidate opens, each model
    timed alone) makes the same trials, scores and pick as the side-by-side one; the result says how it timed."""
    outcome, side_by_side, model = encoder_search
    apart_outcome, _, apart = _run(tmp_path, model, encoder_inputs(24), OpsMeter(), apart=True)

    def trials(search: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (t["name"], t["within_budget"], t["speedup"], pytest.approx(t["fidelity"], abs=1e-9))
            for t in search["candidates"] + search["steps"]
        ]

    assert apart["steps"] and trials(apart) == trials(side_by_side)
    assert (apart["verdict"], apart["chosen"]) == (side_by_side["verdict"], side_by_side["chosen"])
    assert side_by_side["interleaved"] and not apart["interleaved"]
    assert any("not interleaved" in w for w in apart_outcome.warnings)
    assert not any("not interleaved" in w for w in outcome.warnings)
    assert not (tmp_path / "work" / "reference").exists(), "the spilled outputs are removed"


def test_a_big_models_search_tries_whole_models_only_and_says_so(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path], tmp_path: Path
) -> None:
    """Mixed precision's sensitivity ranking holds float and quantized sessions and every weight's dequantized
    output at once (5x a generated 2 GB model): a model on the streaming path gets the whole-model candidates
    only, and a warning that says what was not searched and how to set it by hand."""
    _, side_by_side, model = encoder_search
    assert side_by_side["steps"]  # the premise: this model's search goes on to mixed precision
    outcome, _, whole = _run(tmp_path, model, encoder_inputs(24), OpsMeter(), apart=True, whole_models_only=True)
    assert whole["candidates"] and not [s for s in whole["steps"] if "node(s) in float" in s["name"]], whole["steps"]
    assert any("Mixed precision was not searched" in w for w in outcome.warnings), outcome.warnings


def test_a_big_models_search_never_opens_a_session_beside_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real meter, one session at a time: float alone, then each candidate alone; only the final
    evaluation of an int8 pick opens the quantized model beside float (1.25x, as static's own job does)."""
    opened: list[tuple[str, int]] = []
    alive: list[weakref.ref[Any]] = []
    real = fidelity_module.load_session

    def counting(path: Path, options: Any, which: str) -> Any:
        opened.append((which, sum(1 for r in alive if r() is not None)))
        session = real(path, options, which)
        alive.append(weakref.ref(session))
        return session

    for module in (fidelity_module, evaluate_module):
        monkeypatch.setattr(module, "load_session", counting)
    model = matmul_mlp(tmp_path / "mlp.onnx")
    data = {"x": np.random.default_rng(0).random((16, 16), dtype=np.float32)}
    _, _, search = _run(tmp_path, model, data, None, apart=True, kernels=fast_int8())
    assert len(opened) > 6 and not search["interleaved"]
    assert all(beside == 0 for which, beside in opened if which != "quantized"), opened
    assert search["candidates"] and all(c["speedup"] for c in search["candidates"] if not c["error"])


@pytest.mark.parametrize("apart", [True, False])
def test_a_big_models_float_artifact_is_evaluated_one_session_at_a_time(tmp_path: Path, apart: bool) -> None:
    """Keep float hands back the float model itself: beside the original, a big model's weights twice over."""
    data = {"x": np.random.default_rng(0).random((16, 16), dtype=np.float32)}
    _, measured, search = _run(tmp_path, matmul_mlp(tmp_path / "mlp.onnx"), data, SlowMeter(2.0), apart=apart)
    assert search["verdict"] == "keep_float" and search["chosen"] == "float (the original model)"
    assert measured.facts.interleaved is not apart


def test_pre_processing_and_calibration_are_shared_by_every_candidate_and_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README: pre-processing and calibration ranges are computed once and shared by every
    candidate and search step. Counted at the functions that do the work, wherever they are called
    from: once per distinct preparation, once per distinct calibration, however many trials use them."""
    auto_module = importlib.import_module("worker.engine.auto")
    quantize_module = importlib.import_module("worker.engine.quantize")  # the package's `quantize` is a function

    calls: dict[str, int] = {"prepare_for": 0, "calibrate": 0}

    def counting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for module in (auto_module, quantize_module):
        monkeypatch.setattr(module, "prepare_for", counting("prepare_for", quantize_module.prepare_for))
    monkeypatch.setattr(quantize_module, "calibrate", counting("calibrate", quantize_module.calibrate))
    model = outlier_encoder(tmp_path / "encoder.onnx")
    _, _, search = _run(tmp_path, model, encoder_inputs(24), OpsMeter())

    facts = engine_model_facts(model)
    trials = search["candidates"] + search["steps"]
    specs = [Recipe.from_mapping(t["recipe"]) for t in trials]
    static = [s for s in specs if s.mode == "static"]
    preparations = {preparation(s, facts) for s in specs}
    calibrations = {
        (preparation(s, facts), str(s.calibration_method), s.percentile, s.symmetric_activations) for s in static
    }
    assert search["steps"] and len(static) > len(calibrations), "the search must have reused something"
    assert calls == {"prepare_for": len(preparations), "calibrate": len(calibrations)}, (calls, len(trials))


def test_every_search_step_is_measured_and_the_sixteen_bit_and_op_type_steps_are_tried(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path],
) -> None:
    _, search, _ = encoder_search
    steps = search["steps"]
    for step in steps:
        assert step["error"] is None and step["fidelity"] is not None and step["speedup"] is not None, step
        assert step["latency_runs"] and step["p50_ms"] and step["size_bytes"], step
    static_starts = {s["parent"] for s in steps if s["recipe"]["mode"] == "static"}
    assert static_starts
    for start in static_starts:
        names = [s["name"] for s in steps if s["parent"] == start]
        if "QOperator" not in start:  # 16-bit activations are Q/DQ pairs
            assert any("16-bit activations on" in n for n in names), names
        assert any(n.endswith("left in float") for n in names), names


class _LoopSearch:
    """Just what `_mixed_precision`'s loop asks of a search: a step is within the budget from
    `fits_from` nodes in float on, and runs `speedup` times float."""

    def __init__(self, fits_from: int, speedup: float = 1.5) -> None:
        self.fits_from, self.speedup = fits_from, speedup
        self.tried: list[int] = []
        self.spec = Recipe(mode="auto")
        self.facts = SimpleNamespace(node_names=[f"n{i}" for i in range(10)])
        self.sensitivities: list[Any] = []
        self.whole_models_only = False  # a small model: mixed precision is searched

    def note(self, note: Note) -> None:
        pass

    def time_left(self) -> bool:
        return True

    def best_eligible(self) -> None:
        return None

    def exclusion_cost(self, start: Any, group: Any) -> None:
        return None

    def step(self, start: Any, name: str, nodes_to_exclude: tuple[str, ...]) -> Any:
        self.tried.append(len(nodes_to_exclude))
        return SimpleNamespace(within=len(nodes_to_exclude) >= self.fits_from, ok=True, speedup=self.speedup)


@pytest.mark.parametrize(
    ("fits_from", "speedup", "tried", "fitting"),
    [
        (5, 1.5, [1, 2, 4, 8, 6, 5], 5),  # doubling until the budget holds, then bisecting to the fewest
        (1, 1.5, [1], 1),
        (11, 1.5, [1, 2, 4, 8, 10], None),  # never within: every node of the ranking tried at most once
        (5, 0.9, [1], None),  # slower than float already: more float cannot win, the fallback stops
    ],
)
def test_mixed_precision_returns_groups_to_float_in_doubling_steps_then_bisects(
    monkeypatch: pytest.MonkeyPatch, fits_from: int, speedup: float, tried: list[int], fitting: int | None
) -> None:
    """The README: the search returns the worst groups of nodes to float in doubling steps, bisects to
    the fewest that meet the budget, then tries 16-bit activations on the worst tensors and the worst
    elementwise op type left in float."""
    auto_module = importlib.import_module("worker.engine.auto")
    sets = [[f"n{i}" for i in range(k)] for k in range(1, 11)]  # the top k groups, one node each
    monkeypatch.setattr(auto_module, "_sensitivity", lambda search, start: SimpleNamespace(scored_groups=list))
    monkeypatch.setattr(auto_module, "_exclusion_sets", lambda groups, names, excluded: sets)
    after: list[tuple[Any, ...]] = []
    monkeypatch.setattr(auto_module, "_sixteen_bit_step", lambda search, start, sens, k: after.append(("16-bit", k)))
    monkeypatch.setattr(auto_module, "_op_type_step", lambda search, start, sens: after.append(("op type",)))
    search = _LoopSearch(fits_from, speedup)
    start = SimpleNamespace(name="static", spec=Recipe(mode="static"))
    auto_module._mixed_precision(search, start)
    assert search.tried == tried
    assert after == [("16-bit", fitting), ("op type",)]


def test_sensitivity_artifact_ranks_the_damaging_tensors_first(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path],
) -> None:
    outcome, _, _ = encoder_search
    report = json.loads(outcome.artifacts["sensitivity.json"].read_text())
    static = report["sensitivities"][0]
    assert static["method"] == "activation_matching"
    top = {t["tensor"] for t in static["tensors"][:2]}
    assert top == {"layer0.ffn_act", "layer0.masked"}  # the down-projection's input, the masked scores
    assert all(t["gain_when_float"] > 0.01 for t in static["tensors"][:2])


def test_effective_recipe_reproduces_the_winner_as_a_plain_job(
    encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path], tmp_path: Path
) -> None:
    outcome, search, model = encoder_search
    np.savez(tmp_path / "d.npz", **encoder_inputs(24))
    plain = quantize(
        model,
        Recipe.from_mapping(search["effective_recipe"]),
        tmp_path / "plain",
        calibration=DatasetSource(tmp_path / "d.npz", "npz"),
    )
    got = onnx.load(str(plain.model_path))
    want = onnx.load(str(outcome.model_path))
    assert model_facts(got).op_counts == model_facts(want).op_counts
    assert sorted(n.name for n in got.graph.node) == sorted(n.name for n in want.graph.node)


class JointMeter(OpsMeter):
    """Times each model as OpsMeter does, except in a joint timing (`compare_many`), where the models
    measure the other way round: the last one given is the fastest. The search's one-by-one timings
    and the finalists' joint timing then disagree, and the joint one must decide."""

    def __init__(self) -> None:
        super().__init__()
        self.joint: list[tuple[list[str], int]] = []

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        self.joint.append(([str(c) for c in candidates], runs))
        n = len(candidates)
        return FLOAT_MS, [FLOAT_MS / (1.2 + 0.1 * i) for i in range(n)]


def test_the_finalists_are_timed_together_and_that_timing_decides(tmp_path: Path) -> None:
    meter = JointMeter()
    model = outlier_encoder(tmp_path / "encoder.onnx")
    _, _, search = _run(tmp_path, model, encoder_inputs(24), meter)
    assert len(meter.joint) == 1, "one timing for all the finalists"
    timed, runs = meter.joint[0]
    finalists = search["finalists"]
    assert len(finalists) >= 2 and len(timed) == len(finalists) and runs == search["final_latency_runs"]
    trials = {t["name"]: t for t in search["candidates"] + search["steps"]}
    # Ranked by the search's timings, the first finalist was the fastest; the joint timing says the last.
    speedups = [trials[name]["speedup"] for name in finalists]
    assert speedups == pytest.approx([1.2 + 0.1 * i for i in range(len(timed))])
    assert search["chosen"] == finalists[-1]
    assert all(trials[name]["latency_runs"] == runs for name in finalists)


def test_cnn_with_a_sensitive_first_conv(tmp_path: Path) -> None:
    model = spiky_cnn(tmp_path / "cnn.onnx")
    outcome, measured, search = _run(tmp_path, model, {"input": spiky_images(24)}, OpsMeter())
    static = [c for c in search["candidates"] if c["recipe"]["mode"] == "static"]
    assert static and all(c["metric"] == "agreement" and c["fidelity"] < 0.99 for c in static)
    assert all(c["recipe"]["per_channel"] for c in static)
    assert not any(c["recipe"]["mode"] == "dynamic" for c in search["candidates"])  # ConvInteger is slow
    report = json.loads(outcome.artifacts["sensitivity.json"].read_text())
    top = report["sensitivities"][0]["tensors"][0]
    assert top["tensor"] == "input" and top["group"] == ["first_conv"]
    assert search["verdict"] == "quantized"
    recipe = search["effective_recipe"]
    assert "first_conv" in (recipe["nodes_to_exclude"] or []) or "input" in (recipe["sixteen_bit_tensors"] or [])
    assert measured.comparison.fidelity is not None and measured.comparison.fidelity.within_budget


def test_dynamic_conv_is_several_times_slower_than_float(tmp_path: Path) -> None:
    """Why auto offers CNNs no dynamic candidate (worker/engine/candidates.py, the README's mode auto
    section): dynamic quantization turns Conv into ConvInteger, which ONNX Runtime runs at a fraction of
    float's speed on CPUs. If ONNX Runtime ever gives ConvInteger a fast kernel, this fails and CNNs
    should get the dynamic candidate back."""
    model = conv_classifier(tmp_path / "conv.onnx", channels=64, size=56, hidden=64)
    dynamic = quantize(model, Recipe(mode="dynamic"), tmp_path / "dynamic")
    assert "ConvInteger" in {n.op_type for n in onnx.load(str(dynamic.model_path)).graph.node}
    measured = evaluate(
        model, dynamic.model_path, EvaluationSpec(latency_runs=20, warmup_runs=2, threads=1, max_samples=2), data=None
    )
    assert (measured.comparison.speedup_p50 or 0) < 1 / 3, (
        measured.original.latency_ms,
        measured.quantized.latency_ms,
    )


def test_nothing_faster_than_float_keeps_float(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    outcome, measured, search = _run(
        tmp_path, model, {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)}, SlowMeter(1.2)
    )
    assert search["verdict"] == "keep_float" and search["effective_recipe"] is None
    assert outcome.warnings[0].startswith("Keep float")
    # No mixed-precision search started (nothing would win), so there is no ranking to hand back.
    assert search["sensitivity"] == [] and "sensitivity.json" not in outcome.artifacts
    # Nothing is not slower, so the artifact is the float model itself.
    assert outcome.model_path.read_bytes() == model.read_bytes()
    assert measured.comparison.size_ratio == pytest.approx(1.0)


def test_keep_float_hands_back_the_smallest_model_that_is_not_slower(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    _, _, search = _run(
        tmp_path,
        model,
        {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)},
        OpsMeter(float_like=FLOAT_MS, best=FLOAT_MS),  # everything exactly as fast as float
    )
    assert search["verdict"] == "keep_float"
    fits = [c for c in search["candidates"] + search["steps"] if c["within_budget"]]
    assert search["chosen"] == min(fits, key=lambda c: c["size_bytes"])["name"]


@pytest.mark.parametrize(("speedup", "verdict"), [(1.04, "keep_float"), (1.06, "quantized")])
def test_a_pick_must_run_at_least_five_percent_faster_than_float(tmp_path: Path, speedup: float, verdict: str) -> None:
    """The README: with objective latency a model must run at least 5% faster than float to be chosen."""
    model = matmul_mlp(tmp_path / "mlp.onnx")
    _, _, search = _run(
        tmp_path, model, {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)}, SlowMeter(1 / speedup)
    )
    assert any(c["within_budget"] for c in search["candidates"]), search["candidates"]
    assert search["verdict"] == verdict, search["candidates"]


class ScaleMeter(EachOnItsOwn):
    """Float runs `float_ms` per run; every candidate 1.2 times faster. Records the run counts asked."""

    def __init__(self, float_ms: float) -> None:
        self.float_ms = float_ms
        self.runs: list[int] = []

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        self.runs.append(runs)
        return self.float_ms, self.float_ms / 1.2

    def compare_many(self, candidates: Sequence[Path], runs: int) -> tuple[float, list[float]]:
        _, p50s = super().compare_many(candidates, runs)
        return self.float_ms, p50s


@pytest.mark.parametrize(("float_ms", "grown"), [(0.2, True), (1000.0, False)])
def test_run_counts_grow_for_sub_millisecond_models(tmp_path: Path, float_ms: float, grown: bool) -> None:
    """The README: run counts grow for sub-millisecond models (a few runs of them are noise); a slow
    model is timed with the counts asked for."""
    meter = ScaleMeter(float_ms)
    data = {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)}
    _, _, search = _run(tmp_path, matmul_mlp(tmp_path / "mlp.onnx"), data, meter)
    asked = FEW_RUNS.latency_runs
    if grown:
        assert search["final_latency_runs"] > asked and search["search_latency_runs"] > asked, search
    else:
        assert search["final_latency_runs"] == asked, search
    assert search["final_latency_runs"] in meter.runs  # the finalists were timed with it


class Float16Meter(EachOnItsOwn):
    """Integer models measure 1.2x slower than float; a float16 model measures the speedups of
    `float16` in turn (its search timing first, then each re-timing), the last one repeated."""

    def __init__(self, float16: list[float]) -> None:
        self.float16 = list(float16)
        self.timings: list[int] = []  # run counts of the float16 model's timings

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        model = onnx.load(str(candidate), load_external_data=False)
        if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
            self.timings.append(runs)
            speedup = self.float16.pop(0) if len(self.float16) > 1 else self.float16[0]
            return FLOAT_MS, FLOAT_MS / speedup
        quantized = {n.op_type for n in model.graph.node} & INTEGER_QUANTIZED_OPS
        return FLOAT_MS, FLOAT_MS * (1.2 if quantized else 1.0)


@pytest.mark.parametrize(
    ("float16", "kept"),
    [
        ([0.97, 0.96], False),  # within SLOWER_NOISE, the old rule's "not slower": now float itself
        ([1.0, 1.02, 0.98], False),  # not slower once, slower the second time
        ([0.99, 1.0, 1.01], True),  # at least as fast as float in both full-count timings
    ],
)
def test_a_keep_float_artifact_measured_not_slower_twice(tmp_path: Path, float16: list[float], kept: bool) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    meter = Float16Meter(float16)
    outcome, _, search = _run(
        tmp_path, model, {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)}, meter
    )
    assert search["verdict"] == "keep_float"
    fp16 = next(c for c in search["candidates"] if c["recipe"]["mode"] == "fp16")
    final_runs = search["final_latency_runs"]
    if kept:
        assert search["chosen"] == "float16" and outcome.model_path.read_bytes() != model.read_bytes()
        assert fp16["not_slower_checks"] == [1.0, 1.01] and meter.timings[1:] == [final_runs, final_runs]
        assert fp16["speedup"] == pytest.approx(float16[0])  # the timing the verdict was decided on
    else:
        assert search["chosen"] == "float (the original model)"
        assert outcome.model_path.read_bytes() == model.read_bytes()
        assert fp16["not_slower_checks"] and min(fp16["not_slower_checks"]) < 1.0


def test_keep_float_on_a_real_cpu_hands_back_nothing_slower(tmp_path: Path) -> None:
    """The tiny MLP, where int8 cannot beat float: what auto hands back is the float model, or one
    that auto timed at least as fast as float in both full-count timings."""
    model = matmul_mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((16, 1, 16), dtype=np.float32))
    source = DatasetSource(tmp_path / "d.npz", "npz")
    outcome, _ = auto_quantize(
        model,
        Recipe(mode="auto"),
        tmp_path / "work",
        EvaluationSpec(latency_runs=20, warmup_runs=2, max_seconds=60),
        calibration=source,
        data=source,
    )
    search = _search(outcome)
    if search["verdict"] == "keep_float" and search["effective_recipe"] is not None:
        chosen = next(t for t in search["candidates"] + search["steps"] if t["name"] == search["chosen"])
        assert len(chosen["not_slower_checks"]) == 2 and min(chosen["not_slower_checks"]) >= 1.0
        assert chosen["within_budget"]
    elif search["verdict"] == "keep_float":
        assert outcome.model_path.read_bytes() == model.read_bytes()
    else:
        chosen = next(t for t in search["candidates"] + search["steps"] if t["name"] == search["chosen"])
        assert chosen["speedup"] >= 1 + FASTER_MARGIN and chosen["latency_runs"] == search["final_latency_runs"]


def test_float16_is_not_chosen_for_latency_when_it_is_no_faster(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    _, _, search = _run(
        tmp_path, model, {"x": np.random.default_rng(0).random((16, 1, 16), dtype=np.float32)}, OpsMeter()
    )
    fp16 = next(c for c in search["candidates"] if c["recipe"]["mode"] == "fp16")
    assert fp16["within_budget"] and fp16["size_bytes"] < search["candidates"][0]["size_bytes"] * 2
    assert search["effective_recipe"]["mode"] != "fp16"


def test_objective_size_picks_the_smallest_model_within_budget(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx", features=64, hidden=256)
    _, _, search = _run(
        tmp_path,
        model,
        {"x": np.random.default_rng(0).random((16, 1, 64), dtype=np.float32)},
        SlowMeter(1.5),
        objective="size",
        fidelity={"metric": "cosine", "min": 0.95},
    )
    names = [c["name"] for c in search["candidates"]]
    assert "weight-only int4" in names and "float16" in names
    fits = [c for c in search["candidates"] + search["steps"] if c["within_budget"]]
    assert search["verdict"] == "quantized"  # slower, but the objective is size
    assert search["chosen"] == min(fits, key=lambda c: c["size_bytes"])["name"]


def test_the_time_budget_stops_the_search(tmp_path: Path) -> None:
    model = matmul_mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((8, 1, 16), dtype=np.float32))
    source = DatasetSource(tmp_path / "d.npz", "npz")
    ticks = iter(range(0, 10_000, 100))  # every look at the clock is 100 s later
    outcome, _ = auto_quantize(
        model,
        Recipe(mode="auto", max_search_seconds=150),
        tmp_path / "work",
        FEW_RUNS,
        calibration=source,
        data=source,
        meter=OpsMeter(),
        int8="vnni",
        kernels=fast_int8(),
        clock=lambda: float(next(ticks)),
    )
    search = _search(outcome)
    assert search["time_budget_exhausted"]
    assert len(search["candidates"]) < 5 and search["steps"] == []
    assert any("max_search_seconds" in w for w in outcome.warnings)


@pytest.mark.parametrize(
    ("kind", "build", "dynamic"),
    [
        ("cnn", spiky_cnn, set()),
        ("detector", ocr_detector, set()),  # a CNN: ConvInteger is slow (see the test above)
        ("mlp", matmul_mlp, {"dynamic int8", "dynamic int8, MatMul only"}),
        (
            "encoder",
            outlier_encoder,
            {"dynamic int8", "dynamic int8, MatMul only", "transformer fusion + dynamic int8"},
        ),
        # A hybrid (a conv backbone): dynamic Conv would be ConvInteger, so dynamic quantizes its MatMuls only.
        ("recognizer", ocr_recognizer, {"dynamic int8, MatMul only", "transformer fusion + dynamic int8"}),
    ],
)
def test_the_candidates_are_the_ones_the_readme_lists(tmp_path: Path, kind: str, build: Any, dynamic: set[str]) -> None:
    """The README's mode auto section: static per-channel (MinMax, Percentile, compute ops only) as QDQ and
    as QOperator, dynamic int8 and its MatMul/Gemm-only variant for MatMul models but not CNNs, for models
    with Conv and MatMul the MatMul-only one and the static Conv/dynamic MatMul hybrid, dynamic int8 after
    transformer fusion for transformers, float16; with objective size, weight-only int4 for MatMul models."""
    from worker.engine.candidates import candidates_for

    model = build(tmp_path / f"{kind}.onnx")
    facts = engine_model_facts(model)
    token = is_token_model(model_inputs(model))
    latency = {c.name: c for c in candidates_for(facts.op_counts, token_inputs=token, int8="vnni", objective="latency")}
    static = {
        name for name, c in latency.items() if c.changes["mode"] == "static" and "dynamic_op_types" not in c.changes
    }
    for method in ("MinMax", "Percentile"):  # in both formats, from one calibration
        assert {f"static QDQ, per-channel, {method}", f"static QOperator, per-channel, {method}"} <= static, static
    only = {name for name in static if name.endswith(" only")}
    assert {name.split(",")[0] for name in only} == {"static QDQ", "static QOperator"} and len(only) == 2, only
    for name in static:
        assert latency[name].changes.get("format", "qdq") == ("qoperator" if "QOperator" in name else "qdq")
        assert set(latency[name].changes.get("op_types_to_quantize") or COMPUTE) <= set(COMPUTE)
    assert all(latency[name].changes["per_channel"] for name in static)
    assert not any("S8S8" in name for name in latency), "S8S8 only where the pre-flight measured it fast"
    hybrid = {name for name, c in latency.items() if "dynamic_op_types" in c.changes}
    assert hybrid == ({"hybrid: static QDQ Conv/Gemm, dynamic int8 MatMul"} if kind == "recognizer" else set())
    assert {name for name, c in latency.items() if c.changes["mode"] == "dynamic"} == dynamic
    assert "float16" in latency
    size = [c.name for c in candidates_for(facts.op_counts, token_inputs=token, int8="vnni", objective="size")]
    assert ("weight-only int4" in size) == bool(facts.op_counts.get("MatMul")), size
    assert "weight-only int4" not in latency


def test_the_cpu_decides_u8s8_or_s8s8(tmp_path: Path) -> None:
    from worker.engine.candidates import candidates_for

    counts = {"Conv": 3, "Relu": 3}
    vnni = candidates_for(counts, token_inputs=False, int8="vnni", objective="latency")
    avx2 = candidates_for(counts, token_inputs=False, int8="avx2", objective="latency")
    assert vnni[0].changes["activation_type"] == "uint8" and not vnni[0].changes["reduce_range"]
    assert avx2[0].changes["activation_type"] == "int8" and avx2[0].changes["reduce_range"]


def test_a_real_search_agrees_with_what_it_measured(tmp_path: Path) -> None:
    model = outlier_encoder(tmp_path / "encoder.onnx")
    np.savez(tmp_path / "d.npz", **encoder_inputs(16))
    source = DatasetSource(tmp_path / "d.npz", "npz")
    outcome, measured = auto_quantize(
        model,
        Recipe(mode="auto", max_search_seconds=120),
        tmp_path / "work",
        FEW_RUNS,
        calibration=source,
        data=source,
    )
    search = _search(outcome)
    trials = {t["name"]: t for t in search["candidates"] + search["steps"]}
    if search["verdict"] == "quantized":
        chosen = trials[search["chosen"]]
        assert chosen["within_budget"] and chosen["speedup"] >= 1 + FASTER_MARGIN
    else:  # every finalist measured no faster beyond noise in its deciding timing
        assert all(trials[name]["speedup"] < 1 + FASTER_MARGIN for name in search["finalists"])
        assert all(trials[name]["latency_runs"] == search["final_latency_runs"] for name in search["finalists"])
    onnx.checker.check_model(str(outcome.model_path))
    assert measured.comparison.outputs[0].name == "last_hidden_state"


def test_auto_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as info:
        auto_quantize(
            matmul_mlp(tmp_path / "m.onnx"),
            Recipe(mode="auto"),
            tmp_path,
            EvaluationSpec(),
            calibration=None,
            data=None,
        )
    assert info.value.code == "invalid_recipe"


def test_transformers_get_a_fused_candidate(encoder_search: tuple[QuantizationOutcome, dict[str, Any], Path]) -> None:
    _, search, _ = encoder_search
    fused = next(c for c in search["candidates"] if c["recipe"]["transformer_fusion"])
    assert fused["error"] is None and fused["recipe"]["mode"] == "dynamic"


def test_transformer_fusion_as_a_plain_recipe(tmp_path: Path) -> None:
    model = outlier_encoder(tmp_path / "encoder.onnx")
    out = quantize(model, Recipe(mode="dynamic", transformer_fusion=True), tmp_path / "q")
    ops = model_facts(onnx.load(str(out.model_path))).op_counts
    assert ops.get("SkipLayerNormalization") == 2
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert any(step.startswith("Transformer fusion") for step in out.preprocessing_steps)


def test_sixteen_bit_tensors_as_a_plain_recipe(tmp_path: Path) -> None:
    model = spiky_cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "d.npz", input=spiky_images(8))
    out = quantize(
        model,
        Recipe(mode="static", per_channel=True, sixteen_bit_tensors=("input", "no_such_tensor")),
        tmp_path / "q",
        calibration=DatasetSource(tmp_path / "d.npz", "npz"),
    )
    # A name the model lacks is left out with a warning (ONNX Runtime's quantizer would fail the job).
    assert [w for w in out.warnings if "no_such_tensor" in w and "stay 8-bit" in w]
    graph = onnx.load(str(out.model_path)).graph
    wide = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
    zero_points = {i.name: i for i in graph.initializer}
    assert len(wide) == 1 and wide[0].domain == "com.microsoft"
    assert zero_points[wide[0].input[2]].data_type == onnx.TensorProto.UINT16


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        ({"mode": "dynamic", "sixteen_bit_tensors": ("x",)}, "sixteen_bit_tensors"),
        ({"mode": "fp16", "transformer_fusion": True}, "transformer_fusion"),
        ({"mode": "auto", "max_search_seconds": 0}, "max_search_seconds"),
        ({"mode": "auto", "fidelity": {"metric": "sqnr", "min": 500}}, "fidelity.min"),
    ],
)
def test_the_new_recipe_fields_are_checked(recipe: dict[str, Any], field: str) -> None:
    with pytest.raises(RuleError) as info:
        Recipe.from_mapping(recipe)
    assert info.value.code == "invalid_recipe" and info.value.detail["field"] == field


def _top1(model: Path, samples: np.ndarray, labels: np.ndarray) -> float:

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return float(
        np.mean([np.argmax(session.run(None, {"x": x})[0]) == y for x, y in zip(samples, labels, strict=True)])
    )


def test_auto_keeps_the_weights_in_float_where_every_int8_recipe_breaks_the_budget(tmp_path: Path) -> None:
    """A model where the right answer is known by construction (see `cancelling_matmuls`): int8
    recipes lose about a third of top-1, float16 loses nothing. With a budget of 5 points, a search
    that honours the budget must hand back a model without integer quantization, and that model must
    measure within the budget, whether the search picks float16 or keeps the float model."""
    model = cancelling_matmuls(tmp_path / "m.onnx")
    samples = np.random.default_rng(0).normal(0, 1, (64, 1, 64)).astype(np.float32)
    labels = labelled_by_the_model(model, samples, "x")
    np.savez(tmp_path / "d.npz", x=samples, __labels__=labels)
    data = DatasetSource(tmp_path / "d.npz", "npz")
    # The premise, measured apart from the search: int8 breaks a 5-point budget on this model.
    int8 = quantize(model, Recipe(mode="dynamic"), tmp_path / "int8").model_path
    assert _top1(int8, samples, labels) < 0.9, "the model no longer defeats int8; the test proves nothing"
    outcome, measured = auto_quantize(
        model,
        Recipe(mode="auto", accuracy_tolerance=0.05),
        tmp_path / "work",
        FEW_RUNS,
        calibration=data,
        data=data,
    )
    chosen_ops = {n.op_type for n in onnx.load(str(outcome.model_path)).graph.node}
    assert not chosen_ops & INTEGER_QUANTIZED_OPS, chosen_ops
    accuracy = measured.comparison.accuracy
    assert accuracy is not None and accuracy.original == 1.0 and (accuracy.delta or 0) >= -0.05, accuracy
    onnx.checker.check_model(str(outcome.model_path))


# --------------------------------------------------------------------------------------------
# The pre-flight, QOperator, S8S8 and the speed-aware ranking (issue #22, points 2, 3 and 6)


class FormatMeter(EachOnItsOwn):
    """QOperator models (QLinearConv, QLinearMatMul) run at `qoperator` times float's p50, QDQ models at `qdq`
    times, the others (float16) as float; a deterministic stand-in for a CPU where QOperator is the faster."""

    def __init__(self, *, qoperator: float = 0.5, qdq: float = 0.8) -> None:
        self.qoperator, self.qdq = qoperator, qdq

    def compare(self, candidate: Path, runs: int) -> tuple[float, float]:
        ops = {n.op_type for n in onnx.load(str(candidate), load_external_data=False).graph.node}
        if ops & {"QLinearConv", "QLinearMatMul"}:
            return FLOAT_MS, FLOAT_MS * self.qoperator
        return FLOAT_MS, FLOAT_MS * (self.qdq if "DequantizeLinear" in ops else 1.0)


def test_where_int8_is_slower_the_preflight_keeps_float_without_searching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HardSwish net on a CPU where its HardSwish islands cost more than int8 convs save: no int8 model is
    made, scored or timed (float16, a size option, is the one candidate), the verdict is keep_float, and the
    result says why. A second search with the same cache folder times no layer again."""
    auto_module = importlib.import_module("worker.engine.auto")
    made: list[str] = []
    real_quantize = auto_module.quantize

    def counting(model: Path, spec: Recipe, *args: Any, **kwargs: Any) -> QuantizationOutcome:
        made.append(str(spec.mode))
        return real_quantize(model, spec, *args, **kwargs)

    monkeypatch.setattr(auto_module, "quantize", counting)
    model = hardswish_net(tmp_path / "hs.onnx", channels=16, size=32, blocks=2)
    data = {"x": np.random.default_rng(0).normal(0, 1, (8, 1, 3, 32, 32)).astype(np.float32)}
    meter, kernels = OpsMeter(), hardswish_blocks()
    cache = tmp_path / "preflight-cache"
    _, _, search = _run(tmp_path, model, data, meter, kernels=kernels, preflight_cache=cache)
    assert made == ["fp16"], made
    assert [c["recipe"]["mode"] for c in search["candidates"]] == ["fp16"] and search["steps"] == []
    assert search["verdict"] == "keep_float" and search["headline"].startswith("keep float: the pre-flight")
    pre = search["preflight"]
    assert not pre["int8_helps"] and "int8 will not help here" in pre["verdict"], pre["verdict"]
    assert "Conv 1.5x" in pre["verdict"] and "blocks" in pre["verdict"], pre["verdict"]
    pruned = {p["name"]: p["predicted_speedup"] for p in pre["pruned"]}
    assert {"static QDQ, per-channel, MinMax", "static QOperator, per-channel, MinMax"} <= set(pruned)
    assert all(0 < speedup < 1 for speedup in pruned.values()), pruned
    assert pre["layers_cached"] == 0 and len(kernels.timed) == pre["layers"] > 0

    again = hardswish_blocks()
    _, _, second = _run(tmp_path, model, data, OpsMeter(), kernels=again, preflight_cache=cache)
    assert again.timed == [] and second["preflight"]["layers_cached"] == pre["layers"]
    assert second["preflight"]["verdict"] == pre["verdict"]


def test_qoperator_is_tried_beside_qdq_and_chosen_where_it_runs_faster(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "conv.onnx", size=16, hidden=16)
    data = {"input": np.random.default_rng(0).normal(0, 1, (16, 1, 3, 16, 16)).astype(np.float32)}
    _, _, search = _run(tmp_path, model, data, FormatMeter(), fidelity={"metric": "cosine", "min": 0.9})
    tried = {c["name"]: c for c in search["candidates"]}
    for method in ("MinMax", "Percentile"):
        qdq, qoperator = tried[f"static QDQ, per-channel, {method}"], tried[f"static QOperator, per-channel, {method}"]
        assert qdq["error"] is None and qoperator["error"] is None
        assert qoperator["recipe"] == {**qdq["recipe"], "format": "qoperator"}
        assert qoperator["predicted_speedup"] > 1  # fast_int8's layers
    assert search["verdict"] == "quantized"
    assert search["effective_recipe"]["format"] == "qoperator", search["chosen"]
    assert "QOperator" in search["chosen"]


def test_mixed_precision_searches_in_qoperator_format_ranked_on_its_qdq_twin(tmp_path: Path) -> None:
    """The sensitive first conv: every whole-model candidate misses the budget. The QOperator start (the faster)
    is ranked on its QDQ twin, whose ranking is made once, and its steps keep format qoperator with the
    sensitive node in float (nodes_to_exclude works in both formats)."""
    model = spiky_cnn(tmp_path / "cnn.onnx")
    _, _, search = _run(tmp_path, model, {"input": spiky_images(24)}, FormatMeter())
    steps = [s for s in search["steps"] if s["recipe"]["format"] == "qoperator"]
    assert steps and all(s["parent"].startswith("static QOperator") for s in steps)
    fitting = [s for s in steps if s["within_budget"]]
    assert fitting and all("first_conv" in (s["recipe"]["nodes_to_exclude"] or []) for s in fitting)
    assert search["effective_recipe"]["format"] == "qoperator" and search["chosen"] in {s["name"] for s in fitting}
    ranked = [entry["candidate"] for entry in search["sensitivity"]]
    assert len(ranked) == len(set(ranked)) and all("QOperator" not in name for name in ranked), ranked


@pytest.mark.parametrize(("s8s8", "offered"), [(3.0, True), (0.5, False)])
def test_s8s8_is_offered_only_where_the_preflight_measured_it_fast(tmp_path: Path, s8s8: float, offered: bool) -> None:
    model = conv_classifier(tmp_path / "conv.onnx", size=16, hidden=16)
    data = {"input": np.random.default_rng(0).normal(0, 1, (8, 1, 3, 16, 16)).astype(np.float32)}
    kernels = TableTimer({"qdq": 2.0, "qoperator": 2.0, "s8s8": s8s8, "dynamic": 2.0})
    _, _, search = _run(tmp_path, model, data, OpsMeter(), kernels=kernels)
    s8s8_trials = [c for c in search["candidates"] if c["recipe"]["activation_type"] == "int8"]
    assert bool(s8s8_trials) == offered, [c["name"] for c in search["candidates"]]
    if offered:
        assert s8s8_trials[0]["name"] == "static QDQ S8S8, per-channel, MinMax" and s8s8_trials[0]["error"] is None
    assert (search["preflight"]["speedups"]["s8s8"] > 1) == offered


def test_the_ranker_prefers_the_group_whose_return_to_float_costs_less_at_equal_damage() -> None:
    """The pre-flight's costs: returning the big conv to float gives up most of the int8 gain; the small one
    gains little from int8, and in float it spares the HardSwish before it a conversion: it saves time. Of equal
    damage the cheaper group goes first; without costs (objective size) damage alone decides, as before;
    confirmed damage precedes local error."""
    conv = Timing(float_ms=4.0, island_ms=4.4, int8_ms={"qdq": 1.0})
    small = Timing(float_ms=0.2, island_ms=0.3, int8_ms={"qdq": 0.18})
    act = Timing(float_ms=0.2, island_ms=0.8)
    nodes = {
        "big_conv": TimedNode("big_conv", "Conv", "big", (), ("act",)),
        "act": TimedNode("act", "HardSwish", "act", ("big_conv",), ("small_conv",)),
        "small_conv": TimedNode("small_conv", "Conv", "small", ("act",), ()),
    }
    result = PreflightResult("vnni", nodes, {"big": conv, "small": small, "act": act}, all_nodes=3)
    spec = Recipe(mode="static")
    cost = {name: result.exclusion_cost(spec, [name]) for name in nodes}
    assert cost["big_conv"] > 0 > cost["small_conv"]  # type: ignore[operator]
    scored = [(["big_conv"], 0.1, True), (["small_conv"], 0.1, True)]
    assert rank_groups(scored, lambda group: result.exclusion_cost(spec, group)) == [["small_conv"], ["big_conv"]]
    assert rank_groups(scored, lambda group: None) == [["big_conv"], ["small_conv"]]
    saves = [(["free"], 0.1, True), (["saves"], 0.1, True)]
    assert rank_groups(saves, lambda group: {"free": 0.0, "saves": -0.05}[group[0]]) == [["saves"], ["free"]]
    damage = [(["a"], 0.05, True), (["b"], 0.2, True), (["local"], 0.9, False)]
    assert rank_groups(damage, lambda group: None) == [["b"], ["a"], ["local"]]
    # A group with four times the damage outranks one that costs three times less: damage per cost.
    costs = {"cheap": 0.1, "dear": 0.3}
    assert rank_groups([(["cheap"], 0.1, True), (["dear"], 0.4, True)], lambda group: costs[group[0]]) == [
        ["dear"],
        ["cheap"],
    ]
