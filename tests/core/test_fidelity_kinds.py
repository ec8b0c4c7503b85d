"""The recipe's `fidelity` per output (CONTRACT v3): a kind and its parameters, at the top level or per
output, validated with the field to change named from the recipe down; and stored results that name kinds
the v2 way still read."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import RuleError
from core.model import ModelFacts, TensorSpec
from core.recipe import OutputKindChoice, check_recipe_for_model, parse_recipe
from core.result import JobResult, upgrade_stored


def _refusal(fidelity: dict[str, Any]) -> RuleError:
    with pytest.raises(RuleError) as info:
        parse_recipe({"mode": "auto", "fidelity": fidelity})
    assert info.value.code == "invalid_recipe"
    return info.value


@pytest.mark.parametrize(
    ("fidelity", "field"),
    [
        ({"kind": "boxes"}, "fidelity.kind"),
        ({"kind": "detection", "detection": {"score_threshold": 1.5}}, "fidelity.detection.score_threshold"),
        ({"detection": {"iou_threshold": 0}}, "fidelity.detection.iou_threshold"),
        ({"detection": {"layout": "diagonal"}}, "fidelity.detection.layout"),
        ({"detection": {"box_columns": [0, 1, 2]}}, "fidelity.detection.box_columns"),
        ({"detection": {"box_columns": [0, 1, 1, 2]}}, "fidelity.detection.box_columns"),
        ({"detection": {"box_format": "polar"}}, "fidelity.detection.box_format"),
        ({"detection": {"objectness_column": -1}}, "fidelity.detection.objectness_column"),
        ({"detection": {"objectness_column": 2}}, "fidelity.detection.objectness_column"),
        ({"detection": {"class_columns": "all"}}, "fidelity.detection.class_columns"),
        ({"detection": {"class_columns": [85, 5]}}, "fidelity.detection.class_columns"),
        ({"detection": {"class_columns": [5, 85], "class_id_column": 5}}, "fidelity.detection.class_id_column"),
        ({"detection": {"objectness_column": None, "class_columns": None}}, "fidelity.detection.objectness_column"),
        ({"detection": {"nms": True}}, "fidelity.detection.nms"),
        ({"kind": "classification", "detection": {}}, "fidelity.detection"),
        ({"metric": "cosine", "min": 20}, "fidelity.min"),
        ({"per_output": {"boxes": {"kind": "boxes"}}}, "fidelity.per_output.boxes.kind"),
        ({"per_output": {"boxes": {"min": 3}}}, "fidelity.per_output.boxes.min"),
        ({"metric": "sqnr", "per_output": {"boxes": {"metric": "cosine", "min": 25}}}, "fidelity.per_output.boxes.min"),
        ({"per_output": {"boxes": {"kind": "embedding", "detection": {}}}}, "fidelity.per_output.boxes.detection"),
        ({"per_output": {"": {"kind": "detection"}}}, "fidelity.per_output"),
    ],
)
def test_a_bad_fidelity_field_is_refused_naming_it(fidelity: dict[str, Any], field: str) -> None:
    error = _refusal(fidelity)
    assert error.detail["field"].startswith(field), (error.detail, error.message)
    assert error.message.strip()


def test_a_per_output_floor_is_checked_against_the_metric_in_force() -> None:
    """A per-output floor of 25 is fine when the top-level metric (which it inherits) is SQNR in dB."""
    recipe = parse_recipe({"mode": "auto", "fidelity": {"metric": "sqnr", "per_output": {"boxes": {"min": 25}}}})
    assert recipe.fidelity is not None and recipe.fidelity.judging("boxes")[0].min == 25


def test_per_output_entries_override_the_top_level_and_say_where_the_kind_came_from() -> None:
    recipe = parse_recipe(
        {
            "mode": "compare",
            "reference_model_id": "ref",
            "fidelity": {
                "outputs": ["boxes", "scores"],
                "kind": "regression",
                "min": 0.95,
                "detection": {"score_threshold": 0.25},
                "per_output": {"boxes": {"kind": "detection", "min": 0.9}, "logits": {"metric": "cosine"}},
            },
        }
    )
    spec = recipe.fidelity
    assert spec is not None
    boxes, given = spec.judging("boxes")
    assert (boxes.kind, boxes.min, given) == (OutputKindChoice.DETECTION, 0.9, "fidelity.per_output.boxes.kind")
    assert boxes.detection is not None and boxes.detection.score_threshold == 0.25
    scores, given = spec.judging("scores")
    assert (scores.kind, scores.min, given) == (OutputKindChoice.REGRESSION, 0.95, "fidelity.kind")
    logits, given = spec.judging("logits")  # not in `outputs`: the top-level kind is not its
    assert (logits.kind, logits.metric, given) == (OutputKindChoice.AUTO, "cosine", None)
    assert parse_recipe(recipe.to_dict()) == recipe  # the stored recipe reads back the same


def test_per_output_names_must_be_outputs_of_the_model() -> None:
    facts = ModelFacts(
        opset=13,
        op_counts={"Conv": 1},
        node_names=("conv",),
        inputs=(TensorSpec("image", "float32", (1, 3, 8, 8)),),
        outputs=(TensorSpec("detections", "float32", (1, 256, 6)),),
    )
    recipe = parse_recipe({"mode": "static", "fidelity": {"per_output": {"boxes": {"kind": "detection"}}}})
    with pytest.raises(RuleError) as info:
        check_recipe_for_model(recipe, facts, has_calibration=True)
    assert info.value.detail["field"] == "fidelity.per_output" and info.value.detail["unknown"] == ["boxes"]
    fine = parse_recipe({"mode": "static", "fidelity": {"per_output": {"detections": {"kind": "detection"}}}})
    assert check_recipe_for_model(fine, facts, has_calibration=True) == []


def test_kinds_stored_by_v2_read_as_their_v3_names() -> None:
    metrics = {"size_bytes": 10}
    rows = [
        {"name": "logits", "kind": "class_scores", "metric": "agreement", "value": 1.0, "faithful": True},
        {"name": "ctc", "kind": "sequence_scores"},
        {"name": "hidden", "kind": "tokens"},
        {"name": "depth", "kind": "tensor"},
        {"name": "new", "kind": "detection", "kind_source": "given"},
    ]
    stored = {"original": metrics, "quantized": metrics, "comparison": {"outputs": rows, "fidelity": None}}
    result = JobResult.from_stored(stored)
    kinds = [(o.kind, o.kind_source) for o in result.comparison.outputs]
    assert kinds == [
        ("classification", "inferred"),
        ("sequence", "inferred"),
        ("embedding", "inferred"),
        ("regression", "inferred"),
        ("detection", "given"),
    ]
    assert (
        result.comparison.outputs[0].kind_reason
        == "read from its values by an earlier version (stored as class_scores)"
    )
    current = {"original": metrics, "quantized": metrics, "comparison": {"outputs": rows[4:], "fidelity": None}}
    assert upgrade_stored(current) is current  # results of this version are left as they are
