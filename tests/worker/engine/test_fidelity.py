"""Budgets per output kind: class and sequence scores by agreement, embeddings by mean cosine,
padding left out of token outputs, labels by top-1 drop, and the recipe's `fidelity` field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.recipe import FidelityMetric, FidelitySpec
from tests.onnx_models import conv_classifier, encoder_inputs, outlier_encoder
from worker.engine.data import model_inputs
from worker.engine.fidelity import FidelityEvaluator, OutputAccumulator, OutputKind, output_kind


def test_output_kinds() -> None:
    scores = np.zeros((2, 10), np.float32)
    assert output_kind(scores, token_model=False) == OutputKind.CLASSIFICATION
    assert output_kind(np.zeros((2, 7, 30), np.float32), token_model=False) == OutputKind.SEQUENCE
    # In a token model a [B, 384] output is a sentence embedding, not class scores.
    assert output_kind(np.zeros((2, 384), np.float32), token_model=True) == OutputKind.EMBEDDING
    assert output_kind(np.zeros((2, 1, 64, 64), np.float32), token_model=False) == OutputKind.DENSE


def test_sequence_agreement_is_per_position() -> None:
    ref = np.zeros((1, 4, 3), np.float32)
    ref[0, :, 0] = 1.0
    got = ref.copy()
    got[0, 3] = [0.0, 2.0, 0.0]  # one of four positions picks another class
    acc = OutputAccumulator("y", OutputKind.SEQUENCE)
    acc.add(ref, got, None)
    assert acc.value(FidelityMetric.AGREEMENT) == pytest.approx(0.75)


def test_one_value_per_sample_is_compared_over_the_samples() -> None:
    """A probability [B, 1] (a voice-activity detector's): one value's cosine is 1 whenever the signs
    agree, so two models that disagree on every sample would pass any cosine floor."""
    acc = OutputAccumulator("prob", OutputKind.REGRESSION)
    for ref, got in [(0.1, 0.9), (0.9, 0.1), (0.5, 0.5)]:
        acc.add(np.array([[ref]], np.float32), np.array([[got]], np.float32), None)
    assert acc.value(FidelityMetric.COSINE) == pytest.approx((0.09 + 0.09 + 0.25) / (0.01 + 0.81 + 0.25))
    same = OutputAccumulator("prob", OutputKind.REGRESSION)
    same.add(np.array([[0.3], [0.7]], np.float32), np.array([[0.3], [0.7]], np.float32), None)
    assert same.value(FidelityMetric.COSINE) == 1.0


def test_a_scalar_integer_input_does_not_make_a_token_model() -> None:
    from core.model import TensorSpec
    from worker.engine.fidelity import is_token_model

    audio = [TensorSpec("audio", "float32", ("batch", 512)), TensorSpec("sr", "int64", ())]
    assert not is_token_model(audio)  # a sample rate is no token
    assert is_token_model([TensorSpec("input_ids", "int64", ("batch", "seq"))])


def test_padding_positions_are_left_out_of_token_outputs() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 5, 8)).astype(np.float32)
    got = ref.copy()
    got[0, 3:] = rng.normal(size=(2, 8))  # garbage where the mask says padding
    mask = np.array([[1, 1, 1, 0, 0]])
    masked = OutputAccumulator("h", OutputKind.EMBEDDING)
    masked.add(ref, got, mask)
    unmasked = OutputAccumulator("h", OutputKind.EMBEDDING)
    unmasked.add(ref, got, None)
    assert masked.mean_cosine == pytest.approx(1.0)
    assert unmasked.mean_cosine is not None and unmasked.mean_cosine < 0.8


def _perturbed(model: Path, out: Path, scale: float) -> Path:
    """The model with its output multiplied by (1 + noise) through an extra Mul, for scoring."""
    m = onnx.load(str(model))
    name = m.graph.output[0].name
    for node in m.graph.node:
        for i, o in enumerate(node.output):
            if o == name:
                node.output[i] = name + "_pre"
    m.graph.initializer.append(helper.make_tensor("k", TensorProto.FLOAT, [], [scale]))
    m.graph.node.append(helper.make_node("Mul", [name + "_pre", "k"], [name]))
    m.graph.node.append(helper.make_node("Sin", [name + "_pre"], [name + "_sin"]))
    onnx.save(m, str(out))
    return out


def test_labels_decide_by_top1_drop_and_an_explicit_floor_adds_to_it(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((12, 1, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", input=x, __labels__=np.arange(12) % 4)
    data = DatasetSource(tmp_path / "d.npz", "npz")
    scaled = _perturbed(model, tmp_path / "scaled.onnx", 0.5)  # same argmax, cosine 1, SQNR 6 dB
    plain = FidelityEvaluator(model, data, model_inputs(model), None, 0.0).score(scaled)
    assert plain.accuracy_drop == 0.0 and plain.within_budget and plain.metric == "top1_drop"
    strict = FidelitySpec(metric=FidelityMetric.SQNR, min=20.0)
    scored = FidelityEvaluator(model, data, model_inputs(model), strict, 0.0).score(scaled)
    assert not scored.within_budget and scored.worst is not None and scored.worst.value == pytest.approx(6.02, 0.01)


def test_fidelity_outputs_must_exist(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).random((2, 1, 3, 8, 8), dtype=np.float32))
    evaluator = FidelityEvaluator(
        model, DatasetSource(tmp_path / "d.npz", "npz"), model_inputs(model), FidelitySpec(outputs=("nope",)), 0.01
    )
    with pytest.raises(RuleError) as info:
        evaluator.score(model)
    assert info.value.code == "invalid_recipe" and "nope" in info.value.message


def test_token_model_scores_mean_cosine_over_real_tokens(tmp_path: Path) -> None:
    model = outlier_encoder(tmp_path / "e.onnx")
    np.savez(tmp_path / "d.npz", **encoder_inputs(4))
    score = FidelityEvaluator(model, DatasetSource(tmp_path / "d.npz", "npz"), model_inputs(model), None, 0.01).score(
        model
    )
    (out,) = score.outputs
    assert out.kind == OutputKind.EMBEDDING and out.metric == FidelityMetric.COSINE
    assert out.value == pytest.approx(1.0) and score.within_budget
